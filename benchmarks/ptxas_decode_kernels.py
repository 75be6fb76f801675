"""Registers, spills and shared memory of the decode kernels this project added after the folded
norms, compiled for sm_90a without a GPU (see ptxas_fold_kernels.py): the one-launch GDN
recurrence at the launches `gdn.fused_decode_launch` and the step A/B tried, with the gated norm
in it or not, and the SWA decode split kernel with RoPE inside it or not and with the split
merge in its tail or not, and the M-RoPE table kernel with the embedding gather in it or not. A
kernel that Triton cannot compile for the H100 fails here first.

    /tmp/infinitevl-kernels-venv/bin/python benchmarks/ptxas_decode_kernels.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ptxas_fold_kernels import compile_sm90, report  # noqa: E402

from model.backends.triton_kernels import gdn, pointwise, swa  # noqa: E402


def aligned(kernel) -> list[str]:
    return [n for n in kernel.arg_names if n.endswith("_ptr") or n.startswith("stride")]


def main() -> None:
    kernel = gdn._gdn_recur_decode_kernel
    types = {"scale": "fp32", "eps": "fp32", "count_ptr": "*i32", "state_ptr": "*fp32"}
    types |= dict.fromkeys(["nea_ptr", "dtb_ptr", "normw_ptr"], "*fp32")
    types |= dict.fromkeys(["proj_ptr", "convw_ptr", "conv_ptr", "out_ptr"], "*bf16")
    types |= dict.fromkeys(["slot_ptr", "ctx_ptr"], "*i32")
    for bv, warps, norm in [(64, 4, True), (32, 4, True), (16, 1, True), (64, 4, False)]:
        consts = dict(DK=128, DV=256, BV=bv, NB=256 // bv, KC=4, BLOCK_DV=256, NORM=norm, USE_PDL=True)
        report(
            f"GDN recurrence bv {bv} warps {warps} norm {norm}",
            compile_sm90(kernel, types, consts, aligned(kernel), 1, warps),
        )
    kernel = swa._swa_decode_split_kernel
    types = {"qk_scale": "fp32", "slot_ptr": "*i32", "ctx_ptr": "*i32", "count_ptr": "*i32"}
    types |= dict.fromkeys(["m_ptr", "l_ptr", "acc_ptr"], "*fp32")
    names = ["q_ptr", "k_ptr", "v_ptr", "kc_ptr", "vc_ptr", "cos_ptr", "sin_ptr", "out_ptr"]
    types |= dict.fromkeys(names, "*bf16")
    # the 4B shape at batch 1: 8 query heads per kv head, 128 splits of 64 rows (64 of 128 rows)
    # (rope, tail, merge width BS, at most MAX_USED splits a row)
    for rope, tail, bs, most in [(0, 0, 128, 0), (1, 0, 128, 0), (0, 1, 128, 0), (1, 1, 32, 32)]:
        consts = dict(D=128, BG=16, BN=64, ROPE=rope, TAIL=tail, BGT=8, BS=bs, SC=4, MAX_USED=most)
        report(
            f"SWA decode split rope {rope} tail {tail} merge {bs} at most {most} splits",
            compile_sm90(kernel, types, consts | {"USE_PDL": True}, aligned(kernel), 3),
        )
    kernel = pointwise._mrope_cos_sin_kernel
    types = {"pos_ptr": "*i64", "inv_ptr": "*fp32", "ids_ptr": "*i64"}
    types |= dict.fromkeys(["cos_ptr", "sin_ptr", "table_ptr", "h_ptr"], "*bf16")
    for embed in (False, True):
        consts = dict(S0=16, S01=40, HALF=64, BLOCK_F=64, BLOCK_R=16, EMBED=embed, BLOCK_H=2048, USE_PDL=True)
        report(
            f"M-RoPE tables, embedding gather {embed}",
            compile_sm90(kernel, types, consts, aligned(kernel), 3),
        )


if __name__ == "__main__":
    main()
