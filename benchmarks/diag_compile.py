"""Diagnostic: does torch.compile of the decode forward (Triton custom ops inside) match eager?

Tiny checkpoint on the GPU, no CUDA graphs: one decode step eager vs compiled on cloned states.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.batch import BatchMeta  # noqa: E402
from model.loader import load_model  # noqa: E402
from model.state import StateTensors, allocate_state  # noqa: E402
from model.tiny import write_tiny_checkpoint  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@torch.inference_mode()
def main() -> None:
    ckpt = write_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny")
    model = load_model(ckpt, dtype=torch.bfloat16, device="cuda", backend="triton")
    text = model.config.text
    state = allocate_state(text, 4, torch.float32, model.dtype, "cuda")
    for t in (state.recurrent, state.conv, state.key, state.value):
        t.normal_(0, 0.1)
    slots, ctx = [0, 2, 3], [5, 40, 17]
    meta = BatchMeta.build(slots, [1, 1, 1], ctx, "cuda")
    ids = torch.tensor([3, 4, 5], device="cuda")
    pos = torch.tensor(ctx, device="cuda").expand(3, -1).contiguous()

    def clone(s: StateTensors) -> StateTensors:
        return StateTensors(*(x.clone() for x in (s.recurrent, s.conv, s.key, s.value)))

    s_eager = clone(state)
    ref = model.forward(ids, pos, meta, s_eager)
    for dyn in (False, True):
        fn = torch.compile(model.forward, dynamic=dyn)
        s_c = clone(state)
        out = fn(ids, pos, meta, s_c)
        errs = {n: rel(getattr(s_c, n), getattr(s_eager, n)) for n in ("recurrent", "conv", "key", "value")}
        print(f"dynamic={dyn}: hidden rel err {rel(out, ref):.2e}; states {errs}", flush=True)
        # a second call on a fresh clone: does the compiled graph read the state it is given?
        s_c2 = clone(state)
        out2 = fn(ids, pos, meta, s_c2)
        print(f"  second call: hidden rel err {rel(out2, ref):.2e}", flush=True)
    # per-layer: compile one GDN mixer alone
    layer = model.model.layers[1]
    x = torch.randn(3, text.hidden_size, dtype=model.dtype, device="cuda")
    sa, sb = clone(state), clone(state)
    i = layer.state_index
    ya = layer.self_attn(x, meta, sa.conv[i], sa.recurrent[i], model.backend)
    yb = torch.compile(layer.self_attn)(x, meta, sb.conv[i], sb.recurrent[i], model.backend)
    print(
        f"GDN mixer alone: out {rel(yb, ya):.2e}, conv {rel(sb.conv, sa.conv):.2e}, rec {rel(sb.recurrent, sa.recurrent):.2e}"
    )


if __name__ == "__main__":
    main()
