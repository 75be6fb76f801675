# Sourced by the device campaign scripts: installs the carried wheels (.whl/, downloaded beforehand by
# benchmarks/fetch_device_wheels.sh), sets PYTHONPATH, records
# the device, and defines `left` (seconds left of a ${BUDGET:-570} s budget since sourcing).
OUT=${OUT:-/tmp/out}
COMMIT=${COMMIT:-unknown}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD:$PWD/benchmarks PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
t0=$(date +%s)
left() { echo $(( ${BUDGET:-570} - ($(date +%s) - t0) )); }
