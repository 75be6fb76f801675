"""Piecewise CUDA graphs for the steps that carry prefill rows (on wherever decode graphs are captured;
`--no-piecewise-graphs` turns them off).

A decode step replays one CUDA graph (serving.cuda_graph); a step with prefill rows runs eagerly, and
on the GPU its launch holds the host for tens of ms (hundreds of kernels enqueued from Python), which
is what the inter-token latency tails under load are made of (docs/benchmarks.md). Here the stateless
parts of such a step run as CUDA graphs captured for a fixed number of tokens, and only the stateful
parts run eagerly on the step's own tokens:

    segment 0:      M-RoPE tables, layer 0's input norm and input projection       (graph)
    mix 0:          layer 0's short conv + delta rule, or windowed attention         (eager, T tokens)
    segment k:      layer k-1's output projection, post-attention norm and MLP,
                    layer k's input norm and input projection                       (graph)
    ...
    segment L:      layer L-1's tail and the final norm                             (graph)

Each graph is captured for a padded size S (`sizes`) and reads and writes static buffers: a step of
T <= S tokens copies its embeddings and positions into rows :T, the mixes read rows :T of the
projection buffers and write their outputs into rows :T of the mix buffers, and the hidden states
of rows :T are the result. The padding rows carry stale values through row-wise operations only
(GEMMs, norms, activations), so they never reach a real row, and no stateful kernel sees them.

Layers of one kind share their buffers: a segment reads the previous layer's projection (the output
gate of Gated DeltaNet) before it writes the next one, in stream order. All graphs share one memory
pool; the largest size is captured first. `capture=False` runs the segments eagerly on the same
buffers (the plumbing, testable on a CPU).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from model.batch import BatchMeta
from model.state import StateTensors

logger = logging.getLogger(__name__)

DEFAULT_SIZES = (64, 128, 256, 512, 1024, 2048)
# the largest step captured by default: the default step token budget (measured on the H100: a
# 2048-token prefill step enqueues in about 42 ms through the graphs against 66 ms eagerly)
DEFAULT_MAX_TOKENS = DEFAULT_SIZES[-1]


def capture_sizes(max_num_batched_tokens: int, max_tokens: int = DEFAULT_MAX_TOKENS) -> list[int]:
    """Padded step sizes to capture: powers of two from 64 up to the largest step, which is
    min(the token budget of a step, max_tokens) and is captured itself (no step is larger than the
    budget, so a larger size would only cost memory)."""
    top = min(max_num_batched_tokens, max_tokens)
    if top < 1:
        raise ValueError(f"piecewise graphs need a positive largest size, got {top}")
    sizes, s = [], DEFAULT_SIZES[0]
    while s < top:
        sizes.append(s)
        s *= 2
    return [*sizes, top]


class PiecewiseGraphRunner:
    """Runs model.forward for steps of up to max(sizes) tokens as L + 1 graph replays (one per padded
    size) with the L stateful mixes between them; see the module docstring. One instance per model and
    state pool; `forward` is not re-entrant (the buffers are shared by every call)."""

    def __init__(
        self,
        model: torch.nn.Module,
        state: StateTensors,
        device: torch.device | str,
        sizes: tuple[int, ...] | list[int] = DEFAULT_SIZES,
        capture: bool = True,
    ) -> None:
        """Allocates the static buffers for max(sizes) tokens and captures (or, with capture=False,
        prepares to run eagerly) the segments of every size."""
        if not sizes or min(sizes) < 1:
            raise ValueError(f"piecewise graph sizes must be positive, got {sizes}")
        self.model = model
        self.state = state
        self.device = torch.device(device)
        self.sizes = sorted(set(sizes))
        self.capture = capture and self.device.type == "cuda"
        text = model.config.text
        self.layers = list(model.model.layers)
        self.backend = model.backend
        s, dt = self.sizes[-1], model.dtype
        dev = self.device
        gdn = next((layer.self_attn for layer in self.layers if layer.is_linear), None)
        swa = next((layer.self_attn for layer in self.layers if not layer.is_linear), None)
        # inputs
        self.embeds = torch.zeros(s, text.hidden_size, dtype=dt, device=dev)
        self.positions = torch.zeros(3, s, dtype=torch.int64, device=dev)
        # carried between a segment and the next: the residual stream, the mixers' inputs and outputs
        self.residual = torch.zeros(s, text.hidden_size, dtype=dt, device=dev)
        self.hidden = torch.zeros(s, text.hidden_size, dtype=dt, device=dev)
        self.proj = self.gdn_mid = self.qkv = self.swa_mid = None
        if gdn is not None:
            self.proj = torch.zeros(s, sum(gdn.split_sizes), dtype=dt, device=dev)
            self.gdn_mid = torch.zeros(s, gdn.num_heads, gdn.head_v_dim, dtype=dt, device=dev)
        if swa is not None:
            heads = swa.num_heads + 2 * swa.num_kv_heads
            self.qkv = torch.zeros(s, heads, swa.head_dim, dtype=dt, device=dev)
            self.swa_mid = torch.zeros(s, swa.num_heads, swa.head_dim, dtype=dt, device=dev)
            self._swa_heads = (swa.num_heads, swa.num_kv_heads)
        self.rope = (
            torch.zeros(s, text.head_dim, dtype=dt, device=dev),
            torch.zeros(s, text.head_dim, dtype=dt, device=dev),
        )
        self._graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        if self.capture:
            self._capture_all()

    # --- the segments -------------------------------------------------------------------------------

    def _mixer_in(self, layer, n: int) -> tuple[torch.Tensor, ...]:
        """Rows :n of the static buffers that hold `layer`'s mixer inputs."""
        if layer.is_linear:
            return (self.proj[:n],)
        hq, hkv = self._swa_heads
        qkv = self.qkv[:n]
        return qkv[:, :hq], qkv[:, hq : hq + hkv], qkv[:, hq + hkv :]

    def _mid(self, layer, n: int) -> torch.Tensor:
        return self.gdn_mid[:n] if layer.is_linear else self.swa_mid[:n]

    def _store_head(self, layer, n: int, mixer_in: tuple[torch.Tensor, ...], residual: torch.Tensor) -> None:
        """Copies a head's outputs into the static buffers (rows :n) that `_mixer_in` reads."""
        for buffer, value in zip(self._mixer_in(layer, n), mixer_in, strict=True):
            buffer.copy_(value)
        self.residual[:n].copy_(residual)

    def _segment(self, k: int, n: int) -> Callable[[], None]:
        """Segment k for n rows: layer k-1's tail (k > 0), then layer k's head (k < L) or the final norm."""
        backend, layers = self.backend, self.layers

        def run() -> None:
            if k == 0:
                cos, sin = self.model.rope_tables(self.positions[:, :n], self.embeds.dtype)
                self.rope[0][:n].copy_(cos)
                self.rope[1][:n].copy_(sin)
                h, residual = self.embeds[:n], None
            else:
                prev = layers[k - 1]
                h, residual = prev.tail(
                    self._mid(prev, n), self._mixer_in(prev, n), self.residual[:n], backend
                )
            if k == len(layers):
                self.hidden[:n].copy_(self.model.final_norm(h, residual))
                return
            layer = layers[k]
            mixer_in, residual = layer.head(h, residual, (self.rope[0][:n], self.rope[1][:n]), backend)
            self._store_head(layer, n, mixer_in, residual)

        return run

    # --- capture and run ----------------------------------------------------------------------------

    def _capture_all(self) -> None:
        from model.backends.triton_kernels import pdl  # CUDA only: eager launches as a capture makes them

        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        with torch.inference_mode():
            for n in reversed(self.sizes):
                segments = [self._segment(k, n) for k in range(len(self.layers) + 1)]
                stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(stream), pdl.warmup():
                    for seg in segments:  # compile and autotune before the capture
                        seg()
                torch.cuda.current_stream(self.device).wait_stream(stream)
                torch.cuda.synchronize(self.device)
                graphs = []
                for seg in segments:
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g, pool=pool):
                        seg()
                    graphs.append(g)
                self._graphs[n] = graphs
        torch.cuda.synchronize(self.device)
        logger.info(
            "piecewise CUDA graphs captured for %s tokens (%d segments each)",
            self.sizes,
            len(self.layers) + 1,
        )

    def can_run(self, num_tokens: int) -> bool:
        return 0 < num_tokens <= self.sizes[-1]

    def padded_size(self, num_tokens: int) -> int:
        return next(s for s in self.sizes if s >= num_tokens)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [3, T] int64
        meta: BatchMeta,
        inputs_embeds: torch.Tensor | None = None,  # [T, hidden]
    ) -> torch.Tensor:
        """model.forward's final-norm hidden states [T, hidden] (rows :T of a static buffer, valid until
        the next call); updates the state rows of meta.slot_ids in place."""
        t = input_ids.shape[0]
        n = self.padded_size(t)
        embeds = self.model.embed(input_ids) if inputs_embeds is None else inputs_embeds
        self.embeds[:t].copy_(embeds)
        self.positions[:, :t].copy_(positions)
        run = self._graphs[n] if self.capture else [self._segment(k, n) for k in range(len(self.layers) + 1)]
        step = (lambda g: g.replay()) if self.capture else (lambda f: f())
        step(run[0])
        for k, layer in enumerate(self.layers):
            mid = layer.mix(self._mixer_in(layer, t), meta, self.state, self.backend)
            self._mid(layer, t).copy_(mid)
            step(run[k + 1])
        return self.hidden[:t]
