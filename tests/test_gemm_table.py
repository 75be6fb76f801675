"""The decode GEMM table (model.backends.gemm_table): bucket lookup, validation, the shipped sm90 table."""

from __future__ import annotations

import json

import pytest
import torch

from model.backends.gemm_table import NORM_GEMM_MAX_M, OPS, TABLE_SM90, DecodeGemmTable, default_table


def test_lookup_takes_the_smallest_bucket_that_holds_the_batch() -> None:
    a, b = {"block_n": 64}, {"block_n": 128, "num_warps": 8}
    table = DecodeGemmTable(
        [
            {"N": 10, "K": 20, "max_m": 64, "config": b},
            {"N": 10, "K": 20, "max_m": 8, "config": a},
            {"N": 10, "K": 20, "max_m": 16, "config": None},  # cuBLAS won there
            {"N": 10, "K": 20, "bias": True, "max_m": 8, "config": b},
        ]
    )
    assert len(table) == 4
    assert table.lookup(1, 10, 20, False) == a
    assert table.lookup(8, 10, 20, False) == a
    assert table.lookup(9, 10, 20, False) is None
    assert table.lookup(17, 10, 20, False) == b
    assert table.lookup(64, 10, 20, False) == b
    assert table.lookup(65, 10, 20, False) is None  # past the last bucket
    assert table.lookup(1, 10, 20, True) == b
    assert table.lookup(1, 20, 10, False) is None  # another shape


def test_ops_are_looked_up_apart() -> None:
    lin, fused = {"block_n": 64}, {"block_n": 32}
    table = DecodeGemmTable(
        [
            {"N": 10, "K": 20, "max_m": 8, "config": lin},  # "op" defaults to linear
            {"op": "silu_mul", "N": 10, "K": 20, "max_m": 4, "config": fused},
        ]
    )
    assert table.lookup(2, 10, 20, False) == lin
    assert table.lookup(2, 10, 20, False, op="silu_mul") == fused
    assert table.lookup(8, 10, 20, False, op="silu_mul") is None
    plain = table.without("silu_mul")
    assert len(plain) == 1 and plain.lookup(2, 10, 20, False, op="silu_mul") is None
    assert plain.lookup(2, 10, 20, False) == lin
    with pytest.raises(ValueError, match="op 'gelu'"):
        DecodeGemmTable([{"op": "gelu", "N": 1, "K": 1, "max_m": 1, "config": None}])


def test_extended_replaces_or_adds_buckets_and_keeps_the_rest() -> None:
    a, b, c = {"block_n": 64}, {"block_n": 128}, {"block_n": 32, "num_stages": 8}
    table = DecodeGemmTable(
        [
            {"N": 10, "K": 20, "max_m": 1, "config": None},
            {"N": 10, "K": 20, "max_m": 64, "config": a},
            {"N": 30, "K": 20, "max_m": 8, "config": b},
        ]
    )
    more = table.extended(
        [
            {"N": 10, "K": 20, "max_m": 1, "config": c},  # replaces the batch-1 bucket
            {"N": 10, "K": 20, "max_m": 8, "config": b},  # a new bucket between the two
            {"N": 50, "K": 20, "max_m": 4, "config": a},  # a new shape
        ]
    )
    assert len(more) == 5 and len(table) == 3  # the original is left as it was
    assert more.lookup(1, 10, 20, False) == c and table.lookup(1, 10, 20, False) is None
    assert more.lookup(4, 10, 20, False) == b and more.lookup(9, 10, 20, False) == a
    assert more.lookup(8, 30, 20, False) == b and more.lookup(2, 50, 20, False) == a


def test_unknown_launch_keys_are_rejected() -> None:
    with pytest.raises(ValueError, match="block_q"):
        DecodeGemmTable([{"N": 1, "K": 1, "max_m": 1, "config": {"block_q": 3}}])


def test_norm_ops_take_the_fold_kernels_launch_keys() -> None:
    """The folded-norm ops ("norm_linear", "norm_silu_mul") take norm_gemm's launch parameters, not
    decode_gemm's split-K or TMA switches, and are looked up apart from the plain products."""
    fold = {"block_n": 32, "block_k": 128, "num_stages": 5, "num_warps": 4, "num_programs": 115}
    table = DecodeGemmTable(
        [
            {"op": "norm_silu_mul", "N": 10, "K": 20, "max_m": 1, "config": fold},
            {"op": "norm_linear", "N": 10, "K": 20, "bias": True, "max_m": 1, "config": fold},
        ]
    )
    assert table.lookup(1, 10, 20, False, op="norm_silu_mul") == fold
    assert table.lookup(1, 10, 20, False, op="silu_mul") is None
    assert table.lookup(1, 10, 20, True, op="norm_linear") == fold
    assert table.lookup(1, 10, 20, False, op="norm_linear") is None
    assert len(table.without("norm_linear").without("norm_silu_mul")) == 0
    with pytest.raises(ValueError, match="split_k"):
        DecodeGemmTable([{"op": "norm_linear", "N": 1, "K": 1, "max_m": 1, "config": {"split_k": 2}}])


def test_cpu_gets_an_empty_table() -> None:
    assert len(default_table(torch.device("cpu"))) == 0


def test_shipped_sm90_table_is_well_formed() -> None:
    with open(TABLE_SM90, encoding="utf-8") as f:
        data = json.load(f)
    table = DecodeGemmTable.load(TABLE_SM90)
    assert len(table) == len(data["entries"]) > 0
    for e in data["entries"]:
        assert 1 <= e["max_m"] <= 128
        cfg = e["config"]
        if cfg is not None:
            assert set(cfg) <= set(OPS[e.get("op", "linear")])
            assert e["N"] > 0 and e["K"] % cfg.get("block_k", 128) == 0
        op = e.get("op", "linear")
        assert op in OPS
        if op.startswith("norm_"):  # the folded norm: measured against the norm's launch + product
            assert e["max_m"] <= NORM_GEMM_MAX_M
            assert cfg is None or e["folded_us"] < e["two_launches_us"]
            continue
        base_us = e["cublas_us"] if op == "linear" else e["unfused_us"]
        assert cfg is None or e["triton_us"] < base_us
