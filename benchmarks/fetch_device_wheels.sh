#!/usr/bin/env bash
# Download, on this machine (PyPI reachable), the wheels the lent GPU machine lacks (it has torch, triton
# and transformers but no internet) into .whl/ (git-ignored), for `run(..., carry=[".whl"])`;
# benchmarks/device_setup.sh installs them there with --no-deps. The device runs CPython 3.12 on x86_64.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d .whl \
  "fastapi==0.165.0" opentelemetry-api importlib-metadata zipp lazy-importer "starlette==1.10.*" uvicorn \
  h11 sse-starlette "pydantic==2.14.4" "pydantic-core==2.50.5" annotated-types typing-inspection \
  "typing-extensions==4.16.*" av "flash-linear-attention==0.6.0" "fla-core==0.6.0" einops
ls .whl
