"""Why a long prefill's host enqueue takes as long as its GPU time: (1) every host-device sync in one
8K chunk at context 8K, with the Python stack that caused it (torch's sync debug mode); (2) cProfile
of one chunk's enqueue (GPU synchronised before, so syncs inside show up as time in the syncing call).

    python benchmarks/diag_prefill_host.py --out DIR
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch
from bench_gpu import build_model, chunk_inputs, load_cfg, random_state


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--chunk", type=int, default=8192)
    args = ap.parse_args()
    cfg = load_cfg()
    model = build_model(cfg)
    state = random_state(cfg, 2)
    n = args.chunk

    def chunk():
        ids, pos, meta = chunk_inputs(n, 8192)
        hidden = model.forward(ids, pos, meta, state)
        return model.compute_logits(hidden[meta.logits_indices])

    chunk()
    chunk()
    torch.cuda.synchronize()

    stacks: Counter[str] = Counter()

    def record(message, category, filename, lineno, file=None, line=None):  # noqa: ARG001
        frames = [f for f in traceback.extract_stack()[:-1] if "warnings" not in f.filename]
        stacks["\n".join(f"{f.filename}:{f.lineno} {f.name}" for f in frames[-8:])] += 1

    saved = warnings.showwarning
    warnings.showwarning = record
    warnings.simplefilter("always")
    torch.cuda.set_sync_debug_mode("warn")
    chunk()
    torch.cuda.set_sync_debug_mode("default")
    warnings.showwarning = saved
    torch.cuda.synchronize()
    syncs = [{"count": c, "stack": s} for s, c in stacks.most_common()]
    print(f"syncs in one chunk: {sum(stacks.values())} from {len(stacks)} places")
    for row in syncs[:12]:
        print(f"-- {row['count']}x\n{row['stack']}")

    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    chunk()
    prof.disable()
    enqueue = (time.perf_counter() - t0) * 1e3
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) * 1e3
    tables = {}
    for key in ("cumulative", "tottime"):
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(35)
        tables[key] = buf.getvalue()
        print(tables[key][-9000:])
    print(f"enqueue {enqueue:.1f} ms (under cProfile), wall {wall:.1f} ms")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"syncs": syncs, "enqueue_ms_cprofile": enqueue, "wall_ms": wall, "cprofile": tables}
    (out / "diag_prefill_host.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
