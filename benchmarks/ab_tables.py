# ruff: noqa: B023  (closures are called at once, inside the loop that binds their variables)
"""Whole-step A/B of several candidate decode GEMM table changes in one process: the shipped table and
each candidate merged into it (`DecodeGemmTable.extended`), graph-captured decode steps at context 1K
(or the `--contexts` given), in rounds (every table once per round), median per table.

Isolated kernel timings did not carry over to the step three times in a row on the H100 (a fold fed
more split-K partials than its tune, more programs than SMs; docs/benchmarks.md), so table changes
are chosen here, in the step. Candidates come from a JSON {"candidates": {name: [entries]}} and/or
from tune outputs (`--from-tune`: tune_norm_gemm.py, tune_gemv.py, tune_gated_norm.py JSONs), whose
every entry gives one candidate per config it lists (the best and its runners-up). A candidate in
the JSON may also be {"table": [entries], "attrs": {backend attribute: value}}: backend switches
(e.g. {"fused_gdn_decode": false}, {"fused_gdn_launch": {"bv": 32, "num_warps": 2}}) set for its
steps, with or without table entries.

    python benchmarks/ab_tables.py --out DIR [--batches 1] [--contexts 1024] [--rounds 3]
        [--candidates FILE] [--from-tune A.json,B.json] [--max-programs 132]      (GPU)
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

RUNNER_UP_KEYS = ("next_best",)  # lists of (µs, config) in the tune outputs
BEST_KEYS = ("config", "folded_config", "gemv_config")


def candidates_from_tune(doc: dict, max_programs: int | None = None) -> dict[str, list[dict]]:
    """One single-entry candidate per distinct config of each tuned entry (its best, its runners-up),
    named "<name>/<op>/<config>"; configs with more programs than `max_programs` are left out."""
    out: dict[str, list[dict]] = {}
    for e in doc["table"]:
        configs = [e[k] for k in BEST_KEYS if e.get(k)]
        for key in RUNNER_UP_KEYS:
            configs += [c for _, c in e.get(key, [])]
        seen = []
        for cfg in configs:
            if cfg in seen or (max_programs and cfg.get("num_programs", 0) > max_programs):
                continue
            seen.append(cfg)
            entry = {k: e[k] for k in ("op", "N", "K", "bias", "max_m") if k in e} | {"config": cfg}
            label = ",".join(f"{k}={v}" for k, v in sorted(cfg.items()))
            out[f"{e.get('name', e['N'])}/{e.get('op', 'linear')}/{label}"] = [entry]
    return out


def split_candidate(cand: list[dict] | dict) -> tuple[list[dict], dict]:
    """(table entries, backend attributes) of a candidate: a list of entries, or {"table", "attrs"}."""
    if isinstance(cand, list):
        return cand, {}
    unknown = set(cand) - {"table", "attrs"}
    if unknown:
        raise ValueError(f"candidate keys {sorted(unknown)}: expected 'table' and/or 'attrs'")
    return cand.get("table", []), cand.get("attrs", {})


def load_candidates(
    paths: list[str], tune_paths: list[str], max_programs: int | None
) -> dict[str, list[dict] | dict]:
    cands: dict[str, list[dict] | dict] = {}
    for p in paths:
        cands |= json.loads(Path(p).read_text())["candidates"]
    for p in tune_paths:
        cands |= candidates_from_tune(json.loads(Path(p).read_text()), max_programs)
    return cands


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--batches", default="1")
    ap.add_argument("--contexts", default="1024", help="context lengths, comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--candidates", default="", help='JSON {"candidates": {name: [table entries]}}, comma-separated'
    )
    ap.add_argument("--from-tune", default="", help="tune outputs ({'table': [...]}), comma-separated")
    ap.add_argument("--max-programs", type=int, default=None, help="leave out configs with more programs")
    args = ap.parse_args()
    split = [p for p in args.candidates.split(",") if p], [p for p in args.from_tune.split(",") if p]
    cands = load_candidates(*split, args.max_programs)
    if not cands:
        raise SystemExit("no candidates: give --candidates or --from-tune")
    batches = [int(b) for b in args.batches.split(",")]
    run(cands, batches, args.rounds, Path(args.out), [int(c) for c in args.contexts.split(",")])


def run(
    cands: dict[str, list[dict] | dict], batches: list[int], rounds: int, out: Path, contexts: list[int]
) -> None:
    import torch
    from bench_gpu import build_model, decode_floor_s, decode_inputs, load_cfg, random_state
    from profile_decode import graph_ms_with

    cfg = load_cfg()
    model = build_model(cfg)
    state = random_state(cfg, max(batches))
    shipped = model.backend.gemm_table
    variants = {"shipped": (shipped, {})}
    for name, cand in cands.items():
        entries, attrs = split_candidate(cand)
        variants[name] = (shipped.extended(entries) if entries else shipped, attrs)
    rows = []
    with torch.inference_mode():
        for batch, ctx in ((b, c) for c in contexts for b in batches):
            ids, pos, meta = decode_inputs(batch, ctx)

            def step():
                return model.compute_logits(model.forward(ids, pos, meta, state))

            times: dict[str, list[float]] = {name: [] for name in variants}
            for _ in range(rounds):
                for name, (table, attrs) in variants.items():
                    times[name].append(graph_ms_with(model, step, gemm_table=table, **attrs))
            floor_ms = decode_floor_s(batch, ctx) * 1e3
            base = statistics.median(times["shipped"])
            for name, ms in sorted(times.items(), key=lambda kv: statistics.median(kv[1])):
                med = statistics.median(ms)
                row = {"batch": batch, "context": ctx, "table": name, "ms": ms, "median_ms": med}
                rows.append(row | {"ratio": med / floor_ms})
                label = f"b{batch}" + (f" ctx {ctx}" if ctx != 1024 else "")
                print(f"{label} {med:.3f} ms ({med / floor_ms:.3f}) {med - base:+.3f} {name}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ab_tables.json").write_text(
        json.dumps({"device": torch.cuda.get_device_name(), "candidates": cands, "rows": rows}, indent=1)
    )


if __name__ == "__main__":
    main()
