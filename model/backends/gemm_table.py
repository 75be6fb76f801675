"""Which decode GEMMs take the persistent Triton GEMM (triton_kernels/gemm.py) instead of cuBLAS.

A `DecodeGemmTable` maps an op, a weight shape (N, K, has bias) and a batch bucket to the launch
parameters that beat cuBLAS there. Ops: "linear" (y = x W^T + b) and "silu_mul" (an MLP's gate|up
weight, N = 2 I: the fused silu(gate) * up against cuBLAS or the table's linear followed by the
silu_mul kernel), both `decode_gemm`'s; "norm_linear" and "norm_silu_mul": the same products with
the residual-add RMSNorm before them folded in (`triton_kernels/norm_gemm.py`, its own launch
parameters), against the norm's launch plus the product's own path; "gated_norm_linear": a GDN
layer's gated output norm folded into its output projection, at batch 1; `decode_gemm_sm90.json` holds the table measured on an H100 by
benchmarks/tune_decode_gemm.py (the 4B shapes). Anything not in it goes to cuBLAS. No triton import
here: the table is plain data, tested on CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TABLE_SM90 = Path(__file__).with_name("decode_gemm_sm90.json")
# decode_gemm's launch parameters
LAUNCH_KEYS = (
    "block_n", "block_k", "split_k", "num_stages", "num_warps", "num_programs", "flatten", "gemv", "tma",
    "warp_specialize",
)  # fmt: skip
NORM_GEMM_MAX_M = 16  # rows the folded norm holds in one tile; larger batches keep the norm's launch
NORM_LAUNCH_KEYS = ("block_n", "block_k", "num_stages", "num_warps", "num_programs", "flatten")  # norm_gemm's
OPS = {
    "linear": LAUNCH_KEYS,
    "silu_mul": LAUNCH_KEYS,
    "norm_linear": NORM_LAUNCH_KEYS,
    "norm_silu_mul": NORM_LAUNCH_KEYS,
    # the GDN gated norm folded into the output projection (norm_gemm.gated_norm_gemv): K blocks are heads
    "gated_norm_linear": ("block_n", "split_k", "num_stages", "num_warps", "num_programs", "flatten"),
}


class DecodeGemmTable:
    """Launch parameters of `decode_gemm` per (op, N, K, has bias) and batch bucket; None means the
    unfused path (cuBLAS).

    JSON: {"entries": [{"op": "linear", "N": n, "K": k, "bias": false, "max_m": m, "config": {...}},
    ...]} ("op" defaults to "linear"); a batch of M rows uses the entry with the smallest max_m >= M,
    if that entry has a config.
    """

    def __init__(self, entries: list[dict]) -> None:
        self._by_shape: dict[tuple[str, int, int, bool], list[tuple[int, dict | None]]] = {}
        for e in entries:
            op = e.get("op", "linear")
            if op not in OPS:
                raise ValueError(f"decode GEMM table: unknown op {op!r}")
            cfg = e.get("config")
            if cfg is not None:
                unknown = set(cfg) - set(OPS[op])
                if unknown:
                    raise ValueError(f"decode GEMM table: unknown launch keys {sorted(unknown)}")
            key = (op, int(e["N"]), int(e["K"]), bool(e.get("bias", False)))
            self._by_shape.setdefault(key, []).append((int(e["max_m"]), cfg))
        for buckets in self._by_shape.values():
            buckets.sort(key=lambda b: b[0])

    @classmethod
    def load(cls, path: Path) -> DecodeGemmTable:
        with open(path, encoding="utf-8") as f:
            return cls(json.load(f)["entries"])

    def without(self, op: str) -> DecodeGemmTable:
        """The same table with no entries for `op` (A/B switches)."""
        kept = DecodeGemmTable([])
        kept._by_shape = {key: b for key, b in self._by_shape.items() if key[0] != op}
        return kept

    def extended(self, entries: list[dict]) -> DecodeGemmTable:
        """The same table with `entries` (JSON entries) merged in: an entry replaces the bucket of the
        same op, shape and max_m, or adds one (configs measured since, tried against this table)."""
        merged = DecodeGemmTable([])
        merged._by_shape = {key: list(b) for key, b in self._by_shape.items()}
        for key, buckets in DecodeGemmTable(entries)._by_shape.items():
            mine = {max_m: cfg for max_m, cfg in merged._by_shape.get(key, [])}
            mine.update(dict(buckets))
            merged._by_shape[key] = sorted(mine.items(), key=lambda b: b[0])
        return merged

    def __len__(self) -> int:
        return sum(len(b) for b in self._by_shape.values())

    def lookup(self, m: int, n: int, k: int, has_bias: bool, op: str = "linear") -> dict | None:
        for max_m, cfg in self._by_shape.get((op, n, k, has_bias), ()):
            if m <= max_m:
                return cfg
        return None


def default_table(device: torch.device) -> DecodeGemmTable:
    """The tuned table on Hopper (compute capability 9.x), an empty one (all cuBLAS) elsewhere."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9 and TABLE_SM90.exists():
        return DecodeGemmTable.load(TABLE_SM90)
    return DecodeGemmTable([])
