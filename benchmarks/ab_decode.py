# ruff: noqa: B023  (closures are called at once, inside the loop that binds their variables)
"""A/B of decode-path switches of the Triton backend, on one GPU in one process: the gates computed
inside the delta-rule kernel (`gates`: `gates_in_delta_rule`), the linear entries of the tuned decode
GEMM table (`table`), its fused gate|up + silu_mul entries (`silu`), programmatic dependent launch of
the Triton kernels (`pdl`, triton_kernels/pdl.py), the M-RoPE cos/sin tables in one launch
(`mrope`: off runs the plain code's dozen small kernels at the head of the step), the LM head's fp32
logits stored by its GEMM (`fp32logits`: off writes bf16 logits and widens them in a copy), GEMM table
entries measured since (`extra`: the entries of `--extra-table`, a JSON with a "table" list, merged
into the shipped table, e.g. from sweep_decode_pipelines.py), the split-K partial sums of the output projections
added up inside the next residual-add RMSNorm instead of by a reduction kernel (`splitnorm`:
`split_k_into_norm`), the block norms folded into the GEMVs after them (`fold`: off drops the
table's norm_linear / norm_silu_mul entries), a GDN layer's short conv, gates and delta rule in one
decode launch (`gdnfused`: `fused_gdn_decode`), its gated output norm in that launch too (`gdnnorm`:
`fused_gdn_norm`; off: the norm's own launch, or its fold into the output projection where the
table has one) and decoder weights that cuBLAS multiplies stored
transposed (`transposed`: [in, out] storage read through a `.t()` view, cuBLAS's "NN" kernels; the
MLP gate|up, which the Triton GEMM reads row-major, and the LM head keep their layout). Graph-captured
steps at context 1K for every on/off combination of the chosen switches, in rounds (every
combination once per round, three rounds), median per combination.

    python benchmarks/ab_decode.py --out DIR [--batches 1,8,64,128]
        [--switches gates,table,silu,pdl,mrope,fp32logits,splitnorm,transposed,extra,fold,gdnfused,gdnnorm]
        [--old-table PATH] [--extra-table PATH]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import statistics
from contextlib import contextmanager
from pathlib import Path

import torch
from bench_gpu import build_model, decode_floor_s, decode_inputs, load_cfg, random_state
from exp_transposed_weights import set_layout
from profile_decode import graph_ms_with

from model.backends.gemm_table import DecodeGemmTable
from model.backends.triton_kernels import pdl
from model.layers import mrope_cos_sin

SWITCHES = (
    "gates",
    "table",
    "silu",
    "pdl",
    "mrope",
    "fp32logits",
    "splitnorm",
    "transposed",
    "extra",
    "fold",
    "gdnfused",
    "gdnnorm",
)


def backend_attrs(
    on: dict[str, bool],
    table: DecodeGemmTable,
    old_table: DecodeGemmTable | None = None,
    pointwise=None,
    extra: list[dict] | None = None,
) -> dict:
    """Backend attributes that turn switches off (an absent key keeps the backend's own choice);
    `table` is the backend's own GEMM table; with `old_table`, "table" off means that table instead
    of no linear entries; `pointwise` is the backend's own fused ops; `extra`: table entries merged
    in where "extra" is on."""
    attrs: dict = {}
    if not on.get("mrope", True):
        attrs["pointwise"] = copy.copy(pointwise)
        attrs["pointwise"].mrope_cos_sin = mrope_cos_sin  # the plain code
    if not on.get("gates", True):
        attrs["gates_in_delta_rule"] = lambda meta: False
    if not on.get("table", True):
        table = old_table if old_table is not None else table.without("linear")
    if not on.get("silu", True):
        table = table.without("silu_mul")
    if not on.get("fold", True):  # the block norms' own launches (no norm_gemm)
        table = table.without("norm_linear").without("norm_silu_mul")
    if on.get("extra", False) and extra:
        table = table.extended(extra)
    if not on.get("splitnorm", True):
        attrs["split_k_into_norm"] = False
    if not on.get("gdnfused", True):
        attrs["fused_gdn_decode"] = False
    if not on.get("gdnnorm", True):
        attrs["fused_gdn_norm"] = False
    attrs["gemm_table"] = table
    return attrs


@contextmanager
def transposed(model, enabled: bool):
    """Inside the block, the decoder weights that cuBLAS multiplies (all but the MLP gate|up) stored
    [in, out] and read through a `.t()` view (exp_transposed_weights.set_layout)."""
    if not enabled:
        yield
        return
    saved: dict = {}
    set_layout(model, True, saved, gate_up=False)
    try:
        yield
    finally:
        set_layout(model, False, saved, gate_up=False)
        torch.cuda.empty_cache()


@contextmanager
def pdl_set(enabled: bool | None):
    """Inside the block, kernels are launched (and graphs captured) with PDL on or off (None: as is)."""
    saved = pdl.ENABLED
    if enabled is not None:
        pdl.ENABLED = enabled
    try:
        yield
    finally:
        pdl.ENABLED = saved


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--batches", default="1,8,64,128")
    ap.add_argument("--switches", default="gates,table")
    ap.add_argument(
        "--old-table", help="GEMM table JSON that `table` off stands for (default: no linear entries)"
    )
    ap.add_argument("--extra-table", help='JSON with a "table" list of GEMM table entries (switch `extra`)')
    args = ap.parse_args()
    old_table = DecodeGemmTable.load(Path(args.old_table)) if args.old_table else None
    batches = [int(b) for b in args.batches.split(",")]
    names = args.switches.split(",")
    if not set(names) <= set(SWITCHES):
        raise SystemExit(f"--switches: choose from {SWITCHES}")
    cfg = load_cfg()
    model = build_model(cfg)
    state = random_state(cfg, max(batches))
    combos = list(itertools.product((False, True), repeat=len(names)))
    table = model.backend.gemm_table
    extra = json.loads(Path(args.extra_table).read_text())["table"] if args.extra_table else None
    pointwise = model.backend.pointwise
    rows = []
    for batch in batches:
        ids, pos, meta = decode_inputs(batch, 1024)

        fp32_logits = [True]

        def step():
            hidden = model.forward(ids, pos, meta, state)
            if fp32_logits[0]:
                return model.compute_logits(hidden)
            return model.backend.linear(hidden, model.model.embed_tokens.weight).float()  # before c330a4a

        times: dict[tuple[bool, ...], list[float]] = {c: [] for c in combos}
        for _ in range(3):
            for c in combos:
                on = dict(zip(names, c, strict=True))
                fp32_logits[0] = on.get("fp32logits", True)
                with pdl_set(on.get("pdl")), transposed(model, on.get("transposed", False)):
                    times[c].append(
                        graph_ms_with(model, step, **backend_attrs(on, table, old_table, pointwise, extra))
                    )
        floor_ms = decode_floor_s(batch, 1024) * 1e3
        for c, ms in times.items():
            med = statistics.median(ms)
            row = {"batch": batch, **dict(zip(names, c, strict=True)), "ms": ms, "median_ms": med}
            row["ratio"] = med / floor_ms
            rows.append(row)
            flags = " ".join(f"{n}={v}" for n, v in zip(names, c, strict=True))
            print(f"b{batch} {flags}: {med:.3f} ms ({row['ratio']:.3f})", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ab_decode.json").write_text(
        json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1)
    )


if __name__ == "__main__":
    main()
