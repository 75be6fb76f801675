"""GPU backend: Triton kernels (and flash-linear-attention's chunked kernel) behind the kernel seam.

Same semantics as the torch backend (`model.backends.base.Backend`). Decode calls (`meta.is_decode`)
read only the device tensors of `BatchMeta` (slot_ids, context_lens), so they can be captured in a
CUDA graph; prefill calls also use the host mirrors to build small index tables.
This module imports triton and fla: the CPU path must never import it.
"""

from __future__ import annotations

import inspect
import os

import torch
import torch.nn.functional as F
from fla.ops.gated_delta_rule import chunk_gated_delta_rule

from model.backends.base import (
    GatedNormed,
    GateInputs,
    GDNDecodeInputs,
    SplitKPartials,
    gate_values,
    gated_norm_linear,
    linear_silu_mul,
    norm_linear,
)
from model.backends.gemm_table import DecodeGemmTable, default_table
from model.backends.triton_kernels.conv import conv_prefill, l2norm_args
from model.backends.triton_kernels.gdn import fused_decode_launch, gdn_recur_decode
from model.backends.triton_kernels.gemm import DECODE_GEMM_MAX_M, decode_gemm
from model.backends.triton_kernels.norm_gemm import NORM_GEMM_MAX_M, gated_norm_gemv, norm_gemm
from model.backends.triton_kernels.ops import (
    TritonPointwise,
    conv_decode_call,
    gdn_decode_call,
    swa_decode_call,
)
from model.backends.triton_kernels.swa import swa_decode, swa_prefill
from model.batch import BatchMeta, upload
from model.layers import apply_rope

# prefill launch parameters (H100 sweep: benchmarks/sweep_prefill_kernels.py, docs/benchmarks.md)
# (8K chunk at context 8K, 5ef1835: SWA 1.28 ms per layer, tied with 4 warps / 2 stages; conv 0.20 ms
# per layer at 32 x 256 vs 0.23 ms at 32 x 128)
SWA_BLOCK_M = 128  # queries per prefill attention program (the host tables are built for it)
SWA_PREFILL_LAUNCH = {"block_n": 64, "num_warps": 8, "num_stages": 3}
CONV_PREFILL_LAUNCH = {"block_t": 32, "block_c": 256}
FLA_CHUNK = 64  # chunk size of fla's chunked delta-rule kernel (its default)


def _fla_forward():
    """fla's forward of the chunked delta rule below its public wrapper (0.6: `chunk_gated_delta_rule_fwd`,
    returning (g, o, A, final_state, initial_state, g_input)), or None where this fla has no such
    function or it takes other arguments. The wrapper around it (dispatch, argument checks, the
    autograd Function with its saved tensors, the input guard) is host time on every prefill layer and
    does nothing for inference."""
    try:
        from fla.ops.gated_delta_rule.chunk import chunk_gated_delta_rule_fwd as fwd
    except ImportError:
        return None
    if _fla_has_other_backend():  # the public function would dispatch to it: do not bypass it
        return None
    params = inspect.signature(fwd).parameters
    positional = ("q", "k", "v", "g", "beta", "scale", "initial_state", "output_final_state")
    if tuple(params)[: len(positional)] != positional:
        return None
    if not {"cu_seqlens", "chunk_indices", "chunk_size"} <= params.keys():
        return None
    return torch.compiler.disable(fwd)  # opaque to torch.compile, as fla's public function is


def _fla_has_other_backend() -> bool:
    """Whether fla would run the chunked delta rule on another backend than its Triton kernels (0.6
    registers FlashQLA for Hopper and Blackwell, used where its package is installed), or cannot say."""
    try:
        from fla.backends import _load_operation_registry

        return _load_operation_registry("gated_delta_rule").get_active() is not None
    except Exception:  # an fla without this registry: do not assume the Triton path
        return True


FLA_FORWARD = _fla_forward()


class TritonBackend:
    """Kernel seam on CUDA: in-place pool updates by slot index, no per-step state gathers in decode."""

    name = "triton"

    def __init__(self, device: torch.device | str = "cuda") -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda":
            self.num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        elif os.environ.get("TRITON_INTERPRET") == "1":  # kernel logic tests in Triton's CPU interpreter
            self.num_sms = 4
        else:
            raise ValueError(f"TritonBackend needs a CUDA device, got {self.device}")
        self._host_cache: dict[tuple, dict[str, torch.Tensor]] = {}
        # fused norms/gates/activations/RoPE; set to None to run the model's plain-PyTorch code instead
        self.pointwise: TritonPointwise | None = TritonPointwise()
        # decode-batch GEMMs where the persistent Triton GEMM beat cuBLAS on this GPU; empty: all cuBLAS
        self.gemm_table: DecodeGemmTable = default_table(self.device)
        # output projections with split-K table entries leave their partial sums to the residual-add
        # RMSNorm after them (no reduction kernel); False: linear always reduces (A/B switch)
        self.split_k_into_norm = True
        # prefill calls fla's forward below its public wrapper where this fla has it (bit-identical
        # to the wrapper on the H100; a 256-token prefill step enqueues in 41 ms instead of 59.5,
        # docs/benchmarks.md); False: always the public function (A/B switch)
        self.fla_direct = True
        # decode: a GDN layer's short conv, gates and delta rule in one launch (`gdn_decode`), and its
        # gated output norm in it too; False: the separate launches (A/B switches)
        self.fused_gdn_decode = True
        self.fused_gdn_norm = True
        # its launch ({"bv": ..., "num_warps": ...}, at every batch); None: gdn.fused_decode_launch
        self.fused_gdn_launch: dict | None = None
        # decode: the attention kernel rotates q and k (`rope_in_attention`) instead of the rope
        # kernel, 9 launches fewer a step (H200: -35 us at batch 1, -44 us at batch 64; the GPU tests
        # pass, within bf16 noise of the rope kernel; docs/benchmarks.md); False: the rope kernel
        self.rope_in_swa = True
        # decode: the SWA split kernel's last split to finish merges the splits (no reduce launch),
        # and the window splits are at least swa_min_split rows (a multiple of 64: fewer, longer
        # splits leave the merge less to read). Built and checked in Triton's interpreter only; off
        # until benchmarks/gpu_check_session.sh has tested and timed them on a GPU
        self.swa_reduce_tail = False
        self.swa_min_split = 64
        # with swa_reduce_tail: spread a row's keys over at most this many splits (0: no bound), so
        # that the merge reads little at long contexts while short ones keep 64-row splits
        self.swa_tail_max_splits = 0
        # decode: the embedding gather in the rope-table launch (`embed_with_rope_tables`); built and
        # checked in the interpreter only, off until timed on a GPU
        self.embed_in_rope_tables = False
        # the fused decode kernel's per-(row, head) arrival counters, zero between launches; a larger
        # batch gets a new buffer and the older ones stay alive for the graphs captured with them
        self._arrival_counters: list[torch.Tensor] = []

    # --- host-built index tables for prefill (cached for the meta of the current call) ---

    def _tables(self, meta: BatchMeta, window: int | None = None) -> dict[str, torch.Tensor]:
        key = (meta.seq_lens_cpu, meta.context_lens_cpu, meta.slot_ids_cpu, window)
        hit = self._host_cache.get(key)
        if hit is not None:
            return hit
        if len(self._host_cache) > 8:
            self._host_cache.clear()
        tables = _prefill_tables(meta, window, self.device)
        self._host_cache[key] = tables
        return tables

    # --- seam ---

    def _gemm_config(self, x: torch.Tensor, weight: torch.Tensor, has_bias: bool, op: str) -> dict | None:
        """`gemm_table`'s launch parameters for x [M, K] times weight when M is a decode batch (0 < M
        <= DECODE_GEMM_MAX_M) and both have unit stride on K; None sends the product to cuBLAS."""
        if x.dim() != 2 or not 0 < x.shape[0] <= DECODE_GEMM_MAX_M or torch.compiler.is_compiling():
            return None
        if x.stride(1) != 1 or weight.stride(1) != 1:
            return None
        return self.gemm_table.lookup(x.shape[0], weight.shape[0], weight.shape[1], has_bias, op=op)

    def linear(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        partial: bool = False,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor | SplitKPartials:
        """F.linear, or the persistent Triton GEMM for the (shape, batch) pairs of `gemm_table`. With
        `partial` (and `split_k_into_norm`), a split-K entry's partial sums are returned unreduced,
        for the next fused RMSNorm to add up: one launch less per output projection. With `out`, the
        Triton GEMM stores the rounded product widened (the LM head: no bf16 logits pass)."""
        cfg = self._gemm_config(x, weight, bias is not None, "linear")
        if cfg is None:
            y = F.linear(x, weight, bias)
            return y if out is None else out.copy_(y)
        if out is not None:
            return decode_gemm(x, weight, bias, out=out, **cfg)
        defer = partial and self.split_k_into_norm and self.pointwise is not None
        y = decode_gemm(x, weight, bias, reduce=not defer, **cfg)
        return SplitKPartials(y, x.dtype) if y.dim() == 3 else y

    def linear_silu_mul(self, x: torch.Tensor, gate_up_weight: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up in one persistent GEMM where `gemm_table` has a "silu_mul" config for the
        shape and batch, else the gate|up product (linear) and the silu_mul kernel."""
        cfg = self._gemm_config(x, gate_up_weight, False, "silu_mul")
        if cfg is not None:
            return decode_gemm(x, gate_up_weight, None, silu_mul=True, **cfg)
        return linear_silu_mul(self, x, gate_up_weight)

    def norm_linear(
        self,
        x: torch.Tensor | SplitKPartials,
        residual: torch.Tensor | None,
        norm_weight: torch.Tensor,
        eps: float,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        silu_mul: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual-add norm folded into the GEMV (`norm_gemm`, one launch) where `gemm_table` has
        a "norm_linear" / "norm_silu_mul" entry for the shape and batch; else the norm's launch and
        the product's own path."""
        rows = x.partials if isinstance(x, SplitKPartials) else x  # [S, M, K] or [M, K]
        m = rows.shape[-2]
        cfg = None
        unit = all(t is None or t.stride(-1) == 1 for t in (rows, residual, weight, bias))
        if (
            0 < m <= NORM_GEMM_MAX_M
            and unit
            and self.pointwise is not None
            and not torch.compiler.is_compiling()
        ):
            op = "norm_silu_mul" if silu_mul else "norm_linear"
            cfg = self.gemm_table.lookup(m, weight.shape[0], weight.shape[1], bias is not None, op=op)
        if cfg is None:
            return norm_linear(self, x, residual, norm_weight, eps, weight, bias, silu_mul)
        return norm_gemm(x, residual, norm_weight, eps, weight, bias, silu_mul, **cfg)

    def gated_norm_linear(
        self,
        o: torch.Tensor,
        z: torch.Tensor,
        norm_weight: torch.Tensor,
        eps: float,
        weight: torch.Tensor,
        partial: bool = False,
    ) -> torch.Tensor | SplitKPartials:
        """The gated norm folded into the output projection's GEMV (`gated_norm_gemv`, one row) where
        `gemm_table` has a "gated_norm_linear" entry for the shape at batch 1; else the gated norm's
        launch and `linear`. With `partial` (and `split_k_into_norm`) split-K partials stay unreduced
        for the next norm."""
        cfg = None
        dv = o.shape[-1]
        foldable = o.shape[0] == 1 and not dv & (dv - 1) and self.pointwise is not None
        unit = o.stride(-1) == 1 and z.stride(-1) == 1 and weight.stride(-1) == 1
        if foldable and unit and not torch.compiler.is_compiling():
            n, k = weight.shape
            cfg = self.gemm_table.lookup(1, n, k, False, op="gated_norm_linear")
        if cfg is None:
            return gated_norm_linear(self, o, z, norm_weight, eps, weight, partial)
        y = gated_norm_gemv(o, z, norm_weight, eps, weight, **cfg)
        if isinstance(y, SplitKPartials) and not (partial and self.split_k_into_norm):
            return y.total()
        return y

    def qk_l2norm_in_conv(self, meta: BatchMeta) -> bool:
        """Prefill: the conv epilogue normalises q and k, so fla skips its l2norm pass (1.3% of an 8K
        chunk). Decode: the delta-rule kernel normalises in registers, which the norm in the conv
        epilogue would only slow down (0.5-0.7% at batch 64-128, benchmarks/ab_qk_norm.py)."""
        return not meta.is_decode

    def rope_in_attention(self, meta: BatchMeta) -> bool:
        """Decode with `rope_in_swa`: the attention kernel rotates q and k (no rope launch). Else,
        and in prefill and while torch.compile traces: the rope kernel before the attention."""
        return meta.is_decode and self.rope_in_swa and not torch.compiler.is_compiling()

    def embed_with_rope_tables(self, meta: BatchMeta) -> bool:
        """Decode with `embed_in_rope_tables` and the Triton pointwise ops: one launch for the
        embedding gather and the rope tables."""
        return meta.is_decode and self.embed_in_rope_tables and self.pointwise is not None

    def gates_in_delta_rule(self, meta: BatchMeta) -> bool:
        """Decode: the delta-rule kernel computes g and beta from a and b (no gates kernel, one launch
        less per GDN layer). Prefill: the gates kernel feeds fla's chunked kernel."""
        return meta.is_decode

    def short_conv(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        meta: BatchMeta,
        conv_state: torch.Tensor,
        split_sizes: list[int] | None = None,
        l2norm_head_dim: int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """silu(causal depthwise conv) [N, C] (or its parts, q and k L2-normalised in the kernel's
        epilogue with l2norm_head_dim); conv_state rows meta.slot_ids updated in place. Prefill
        writes the parts contiguously (no copies before fla's chunked kernel)."""
        if meta.is_decode:
            norm_ch, norm_hd = l2norm_args(split_sizes, l2norm_head_dim)
            out = conv_decode_call(x, weight, conv_state, meta.slot_ids, meta.context_lens, norm_ch, norm_hd)
            return out if split_sizes is None else out.split(split_sizes, dim=1)
        t = self._tables(meta)
        return conv_prefill(
            x, weight, conv_state, t["tok_seq"], meta.cu_seqlens, meta.slot_ids, meta.context_lens,
            **CONV_PREFILL_LAUNCH, split_sizes=split_sizes, l2norm_head_dim=l2norm_head_dim,
        )  # fmt: skip

    def gated_delta_rule(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        g: torch.Tensor | None,
        beta: torch.Tensor | None,
        meta: BatchMeta,
        state: torch.Tensor,
        qk_normalized: bool = False,
        gates: GateInputs | None = None,
    ) -> torch.Tensor:
        """Delta-rule output [N, H, d_v]; state rows meta.slot_ids updated in place."""
        scale = q.shape[-1] ** -0.5
        if meta.is_decode:  # with gate inputs the kernel computes g and beta from a and b
            g_in, beta_in, nea, dtb = gates if gates is not None else (g, beta, None, None)
            return gdn_decode_call(
                q, k, v, g_in, beta_in, state, meta.slot_ids, meta.context_lens, scale, qk_normalized,
                nea, dtb,
            )  # fmt: skip
        if gates is not None:
            g, beta = self.pointwise.gdn_gates(*gates) if self.pointwise else gate_values(gates)
        return self._gdn_prefill(q, k, v, g, beta, meta, state, scale, qk_normalized)

    def _gdn_prefill(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        g: torch.Tensor,
        beta: torch.Tensor,
        meta: BatchMeta,
        state: torch.Tensor,
        scale: float,
        qk_normalized: bool,
    ) -> torch.Tensor:
        t = self._tables(meta)
        h0 = state.index_select(0, meta.slot_ids).float()  # [B, H, d_k, d_v]: one gather per chunk
        # fresh sequences start from zero whatever the row holds (NaN included: no multiply by 0)
        h0 = torch.where(t["has_ctx"].view(-1, 1, 1, 1), h0, 0.0)
        qkvgb = (q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), g.float().unsqueeze(0), beta.unsqueeze(0))
        if self.fla_direct and qk_normalized and FLA_FORWARD is not None:
            # what the wrapper would do for these inputs: contiguous tensors, chunk indices given
            _, o, _, ht, _, _ = FLA_FORWARD(
                *(x.contiguous() for x in qkvgb),
                scale,
                h0.contiguous(),
                True,
                cu_seqlens=t["cu_long"],
                chunk_indices=t["chunk_indices"],
                chunk_size=FLA_CHUNK,
            )
        else:
            o, ht = chunk_gated_delta_rule(
                *qkvgb,
                scale=scale,
                initial_state=h0,
                output_final_state=True,
                use_qk_l2norm_in_kernel=not qk_normalized,
                cu_seqlens=t["cu_long"],
                cu_seqlens_cpu=t["cu_cpu"],
                chunk_indices=t["chunk_indices"],
                chunk_size=FLA_CHUNK,
            )
        state.index_copy_(0, meta.slot_ids, ht.to(state.dtype))
        return o.squeeze(0).to(v.dtype)

    def gdn_decode(
        self,
        inputs: GDNDecodeInputs,
        meta: BatchMeta,
        conv_state: torch.Tensor,
        state: torch.Tensor,
        gated_norm: bool,
    ) -> torch.Tensor | GatedNormed | None:
        """Decode: conv, gates, delta rule (and with gated_norm the gated norm) in one launch
        (`gdn_recur_decode`); None while torch.compile traces (the separate custom ops), with
        `fused_gdn_decode` off, or at batches where the separate launches are faster
        (`gdn.fused_decode_launch`, unless `fused_gdn_launch` sets the launch)."""
        if not (meta.is_decode and self.fused_gdn_decode) or torch.compiler.is_compiling():
            return None
        num_heads, _, dv = inputs.head_dims
        rows = inputs.proj.shape[0]
        launch = self.fused_gdn_launch or fused_decode_launch(rows * num_heads)
        if launch is None:
            return None  # the separate launches are faster at this batch
        norm = gated_norm and self.fused_gdn_norm
        out = gdn_recur_decode(
            inputs.proj, inputs.conv_weight.contiguous(), conv_state, state, meta.slot_ids, meta.context_lens,
            inputs.neg_exp_a, inputs.dt_bias, inputs.head_dims, self._counters(rows * num_heads),
            inputs.norm_weight if norm else None, inputs.eps, launch,
        )  # fmt: skip
        return GatedNormed(out.view(rows, num_heads * dv)) if norm else out

    def _counters(self, n: int) -> torch.Tensor:
        """An int32 buffer of at least n zeros for the fused decode kernel's arrival counters."""
        if not self._arrival_counters or self._arrival_counters[-1].numel() < n:
            size = max(4096, 1 << (n - 1).bit_length())
            self._arrival_counters.append(torch.zeros(size, dtype=torch.int32, device=self.device))
        return self._arrival_counters[-1]

    def sliding_window_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: BatchMeta,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        scale: float,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Windowed causal attention [N, Hq, D]; the ring rows of meta.slot_ids get the new keys.
        With rope, decode rotates q and k inside the attention kernel; elsewhere the rope kernel
        rotates them (in place) first."""
        in_kernel = rope is not None and meta.is_decode and not torch.compiler.is_compiling()
        if rope is not None and not in_kernel:  # the rope kernel first, in place
            for x in (q, k):
                if self.pointwise is not None:
                    self.pointwise.rope(x, *rope)
                else:
                    x.copy_(apply_rope(x, *rope))
        if meta.is_decode:
            args = (q, k, v, key_cache, value_cache, meta.slot_ids, meta.context_lens, scale, self.num_sms)
            if torch.compiler.is_compiling():
                return swa_decode_call(*args)  # the custom op: no tail, 64-row splits
            tail = self.swa_reduce_tail
            counters = self._counters(q.shape[0] * key_cache.shape[2]) if tail else None
            max_used = self.swa_tail_max_splits if tail else 0
            return swa_decode(*args, rope if in_kernel else None, counters, self.swa_min_split, max_used)
        window = key_cache.shape[1]
        t = self._tables(meta, window)
        out = swa_prefill(
            q, k, v, key_cache, value_cache, t["blk_seq"], t["blk_start"], meta.cu_seqlens,
            meta.slot_ids, meta.context_lens, scale, SWA_BLOCK_M, **SWA_PREFILL_LAUNCH,
        )  # fmt: skip
        # ring write after the attention read the old ring: the last min(T, W) keys of each sequence
        flat_k = key_cache.view(-1, *key_cache.shape[2:])
        flat_v = value_cache.view(-1, *value_cache.shape[2:])
        flat_k.index_copy_(0, t["ring_dst"], k.index_select(0, t["ring_src"]))
        flat_v.index_copy_(0, t["ring_dst"], v.index_select(0, t["ring_src"]))
        return out


def _prefill_tables(
    meta: BatchMeta, window: int | None, device: torch.device, block_m: int = SWA_BLOCK_M
) -> dict[str, torch.Tensor]:
    """Small per-call index tables built on the host from the *_cpu mirrors (prefill only); the
    attention query blocks are `block_m` rows."""
    seq_lens = torch.tensor(meta.seq_lens_cpu, dtype=torch.int64)
    ctx_lens = torch.tensor(meta.context_lens_cpu, dtype=torch.int64)
    slots = torch.tensor(meta.slot_ids_cpu, dtype=torch.int64)
    num_seqs = seq_lens.shape[0]
    cu = torch.zeros(num_seqs + 1, dtype=torch.int64)
    torch.cumsum(seq_lens, 0, out=cu[1:])
    seq_idx = torch.arange(num_seqs)
    tok_seq = torch.repeat_interleave(seq_idx, seq_lens)  # [N]
    host: dict[str, torch.Tensor] = {
        "tok_seq": tok_seq.to(torch.int32),
        "has_ctx": ctx_lens > 0,
        "cu_long": cu,
    }
    if window is None:  # the conv / delta-rule tables
        # fla's (sequence, chunk) index of every chunk: built here because fla's own helper copies it
        # to the device synchronously, which would stall the host until all queued GPU work is done
        chunks = (seq_lens + FLA_CHUNK - 1) // FLA_CHUNK
        chunk_seq = torch.repeat_interleave(seq_idx, chunks)
        chunk_local = torch.arange(chunk_seq.shape[0]) - (torch.cumsum(chunks, 0) - chunks)[chunk_seq]
        host["chunk_indices"] = torch.stack([chunk_seq, chunk_local], 1)
    else:  # the sliding-window attention tables
        blocks = (seq_lens + block_m - 1) // block_m
        blk_seq = torch.repeat_interleave(seq_idx, blocks)
        first_blk = torch.cumsum(blocks, 0) - blocks
        blk_start = cu[blk_seq] + (torch.arange(blk_seq.shape[0]) - first_blk[blk_seq]) * block_m
        local = torch.arange(tok_seq.shape[0]) - cu[tok_seq]  # token index inside its sequence
        keep = local >= seq_lens[tok_seq] - window  # the last min(T, W) tokens reach the ring
        src = torch.nonzero(keep).flatten()
        dst = slots[tok_seq[src]] * window + (ctx_lens[tok_seq[src]] + local[src]) % window
        host["blk_seq"] = blk_seq.to(torch.int32)
        host["blk_start"] = blk_start
        host["ring_src"] = src
        host["ring_dst"] = dst
    out = {n: upload(t, device) for n, t in host.items()}
    out["cu_cpu"] = host["cu_long"]
    return out
