"""Registers, spills and shared memory of the folded-norm kernels for sm_90a, without a GPU: Triton
compiles each config for an H100 target and the ptxas it bundles reports (`ptxas -v`). Needs only
triton (e.g. the interpreter venv of .ci/kernels):

    /tmp/infinitevl-kernels-venv/bin/python benchmarks/ptxas_fold_kernels.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.backends.triton_kernels import norm_gemm as ng  # noqa: E402

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


def compile_sm90(kernel, types: dict, constexprs: dict, aligned: list[str], stages: int, warps: int = 4):
    sig = {name: types.get(name, "i32") for name in kernel.arg_names} | dict.fromkeys(constexprs, "constexpr")
    attrs = {(list(kernel.arg_names).index(a),): [["tt.divisibility", 16]] for a in aligned}
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)
    target = GPUTarget("cuda", 90, 32)
    opts = triton.compiler.make_backend(target).parse_options({"num_warps": warps, "num_stages": stages})
    return triton.compile(src, target=target, options=opts.__dict__)


def report(name: str, compiled) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(compiled.asm["ptx"])
        f.flush()
        err = subprocess.run(
            [str(PTXAS), "-v", "--gpu-name", "sm_90a", f.name, "-o", "/dev/null"],
            capture_output=True,
            text=True,
        ).stderr
    info = " ".join(
        line.split(":", 1)[-1].strip() for line in err.splitlines() if "registers" in line or "spill" in line
    )
    print(f"{name}: shared {compiled.metadata.shared} B; {info}")


def main() -> None:
    for bn, bk, stages, silu, splits in [
        (32, 256, 3, True, 4),
        (32, 256, 3, True, 8),
        (32, 256, 3, False, 4),
        (16, 256, 4, False, 4),
    ]:
        types = {"x_ptr": "*fp32", "eps": "fp32"} | dict.fromkeys(
            ["res_ptr", "nw_ptr", "w_ptr", "b_ptr", "s_ptr", "y_ptr"], "*bf16"
        )
        consts = dict(
            SPLITS=splits, HAS_RESIDUAL=True, STORE_S=True, HAS_BIAS=False, BLOCK_M=1, BLOCK_N=bn, BLOCK_K=bk
        )
        consts |= dict(NUM_STAGES=stages, FLATTEN=True, SILU_MUL=silu, ROUND_OUT=False, USE_PDL=True)
        aligned = [
            n for n in ng._norm_gemm_kernel.arg_names if n.endswith("_ptr") or n.startswith("stride")
        ] + ["K"]
        report(
            f"norm fold block_n {bn} block_k {bk} stages {stages} silu_mul {silu} splits {splits}",
            compile_sm90(ng._norm_gemm_kernel, types, consts, aligned, stages),
        )
    for bn in (64, 32, 16):
        types = {"nw_ptr": "*fp32", "y_ptr": "*fp32", "eps": "fp32"} | dict.fromkeys(
            ["o_ptr", "z_ptr", "w_ptr"], "*bf16"
        )
        consts = dict(DV=256, BLOCK_N=bn, NUM_STAGES=3, FLATTEN=True, USE_PDL=True)
        aligned = [
            n for n in ng._gated_norm_gemv_kernel.arg_names if n.endswith("_ptr") or n.startswith("stride")
        ]
        report(
            f"gated fold block_n {bn} stages 3",
            compile_sm90(ng._gated_norm_gemv_kernel, types, consts, aligned, 3),
        )


if __name__ == "__main__":
    main()
