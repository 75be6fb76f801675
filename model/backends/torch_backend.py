"""Plain-PyTorch backend: the exact math of the architecture spec, on CPU or GPU.

It is the oracle for faster backends. Every sequence of a packed batch is processed on its own rows
(no padding ever enters the conv or the recurrence); its state row is read only when its
`context_lens` is positive, so a fresh sequence starts from zero whatever the pool row holds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
from model.batch import BatchMeta

# Queries per block in sliding-window attention: bounds the score matrix to [H, block, block + W - 1].
_ATTN_QUERY_BLOCK = 1024


def _spans(meta: BatchMeta) -> list[tuple[int, int, int, int]]:
    """(start, end, slot, context_len) of every sequence, from host-side metadata."""
    out = []
    start = 0
    for n, slot, ctx in zip(meta.seq_lens_cpu, meta.slot_ids_cpu, meta.context_lens_cpu, strict=True):
        out.append((start, start + n, slot, ctx))
        start += n
    return out


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim (fp32 in, fp32 out)."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


class TorchBackend:
    """Backend protocol implementation in plain PyTorch (see model/backends/base.py)."""

    name = "torch"
    pointwise = None  # the model's own plain-PyTorch elementwise code is the reference

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)

    # -- short convolution ------------------------------------------------------------------------

    def gates_in_delta_rule(self, meta: BatchMeta) -> bool:
        return False

    def rope_in_attention(self, meta: BatchMeta) -> bool:
        return False

    def embed_with_rope_tables(self, meta: BatchMeta) -> bool:
        return False

    def gdn_decode(
        self,
        inputs: GDNDecodeInputs,
        meta: BatchMeta,
        conv_state: torch.Tensor,
        state: torch.Tensor,
        gated_norm: bool,
    ) -> torch.Tensor | GatedNormed | None:
        return None  # the separate steps are the reference

    def linear(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        partial: bool = False,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        y = F.linear(x, weight, bias)  # one kernel: never split partials, whatever `partial` allows
        return y if out is None else out.copy_(y)

    def linear_silu_mul(self, x: torch.Tensor, gate_up_weight: torch.Tensor) -> torch.Tensor:
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
        return norm_linear(self, x, residual, norm_weight, eps, weight, bias, silu_mul)

    def gated_norm_linear(
        self,
        o: torch.Tensor,
        z: torch.Tensor,
        norm_weight: torch.Tensor,
        eps: float,
        weight: torch.Tensor,
        partial: bool = False,
    ) -> torch.Tensor | SplitKPartials:
        return gated_norm_linear(self, o, z, norm_weight, eps, weight, partial)

    def qk_l2norm_in_conv(self, meta: BatchMeta) -> bool:
        return False  # normalising inside gated_delta_rule keeps q and k in fp32

    def short_conv(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        meta: BatchMeta,
        conv_state: torch.Tensor,
        split_sizes: list[int] | None = None,
        l2norm_head_dim: int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        out = self._short_conv(x, weight, meta, conv_state)
        if split_sizes is None:
            if l2norm_head_dim is not None:
                raise ValueError("l2norm_head_dim needs split_sizes (it normalises parts 0 and 1)")
            return out
        parts = list(out.split(split_sizes, dim=1))
        if l2norm_head_dim is not None:
            for i in (0, 1):
                heads = parts[i].float().unflatten(1, (-1, l2norm_head_dim))
                parts[i] = l2_normalize(heads).flatten(1).to(x.dtype)
        return tuple(parts)

    def _short_conv(self, x, weight, meta, conv_state) -> torch.Tensor:
        if meta.is_decode:
            return self._conv_step_batched(x, weight, meta, conv_state)
        out = torch.empty_like(x)
        kernel = weight.shape[1]
        w32 = weight.float()  # [C, K]
        for start, end, slot, ctx in _spans(meta):
            seq = x[start:end].transpose(0, 1)  # [C, T]
            if ctx > 0:
                prev = conv_state[slot].to(x.dtype)  # [C, K], column K-1 newest
            else:
                prev = torch.zeros(x.shape[1], kernel, dtype=x.dtype, device=x.device)
            stream = torch.cat([prev, seq], dim=1)  # [C, K + T]
            windows = stream[:, 1:].float().unfold(1, kernel, 1)  # [C, T, K]: inputs t-K+1 .. t
            y = (windows * w32[:, None, :]).sum(-1).transpose(0, 1)  # [T, C]
            out[start:end] = F.silu(y).to(x.dtype)
            conv_state[slot] = stream[:, -kernel:].to(conv_state.dtype)
        return out

    def _conv_step_batched(self, x, weight, meta, conv_state) -> torch.Tensor:
        """One token per sequence: shift each slot's window left, append x, convolve."""
        slots = meta.slot_ids.to(conv_state.device)
        fresh = (meta.context_lens.to(conv_state.device) == 0).view(-1, 1, 1)
        prev = conv_state.index_select(0, slots).masked_fill(fresh, 0.0)  # [B, C, K]
        window = torch.cat([prev[:, :, 1:].to(x.dtype), x[:, :, None]], dim=2)  # [B, C, K]
        y = (window.float() * weight.float()).sum(-1)
        conv_state.index_copy_(0, slots, window.to(conv_state.dtype))
        return F.silu(y).to(x.dtype)

    # -- gated delta rule -------------------------------------------------------------------------

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
        if gates is not None:
            g, beta = gate_values(gates)
        scale = q.shape[-1] ** -0.5
        qn = (q.float() if qk_normalized else l2_normalize(q.float())) * scale
        kn = k.float() if qk_normalized else l2_normalize(k.float())
        v32, g32, b32 = v.float(), g.float(), beta.float()
        out = torch.empty(v.shape, dtype=torch.float32, device=v.device)
        if meta.is_decode:
            self._delta_step_batched(qn, kn, v32, g32, b32, meta, state, out)
            return out.to(v.dtype)
        for start, end, slot, ctx in _spans(meta):
            s = state[slot].float() if ctx > 0 else state.new_zeros(state.shape[1:], dtype=torch.float32)
            for t in range(start, end):
                s = _delta_step(s, qn[t], kn[t], v32[t], g32[t], b32[t], out[t])
            state[slot] = s.to(state.dtype)
        return out.to(v.dtype)

    def _delta_step_batched(self, qn, kn, v32, g32, b32, meta, state, out) -> None:
        """One token per sequence: all sequences advance together (rows gathered by slot)."""
        slots = meta.slot_ids.to(state.device)
        fresh = (meta.context_lens.to(state.device) == 0).view(-1, 1, 1, 1)
        s = state.index_select(0, slots).float().masked_fill(fresh, 0.0)  # [B, H, d_k, d_v]
        s = _delta_step(s, qn, kn, v32, g32, b32, out)
        state.index_copy_(0, slots, s.to(state.dtype))

    # -- sliding-window attention -----------------------------------------------------------------

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
        if rope is not None:
            from model.layers import apply_rope  # (model.layers imports this package)

            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        window = key_cache.shape[1]
        out = torch.empty_like(q)
        for start, end, slot, ctx in _spans(meta):
            num_old = min(ctx, window - 1)
            old_pos = torch.arange(ctx - num_old, ctx, device=k.device)
            keys = torch.cat([key_cache[slot, old_pos % window].to(k.dtype), k[start:end]], dim=0)
            values = torch.cat([value_cache[slot, old_pos % window].to(v.dtype), v[start:end]], dim=0)
            out[start:end] = _window_attend(q[start:end], keys, values, ctx - num_old, ctx, window, scale)
            num_new = end - start
            keep = min(window, num_new)
            new_pos = torch.arange(ctx + num_new - keep, ctx + num_new, device=k.device)
            key_cache[slot, new_pos % window] = k[end - keep : end].to(key_cache.dtype)
            value_cache[slot, new_pos % window] = v[end - keep : end].to(value_cache.dtype)
        return out


def _delta_step(
    s: torch.Tensor,  # [..., H, d_k, d_v] fp32 state S_{t-1}
    q: torch.Tensor,  # [..., H, d_k] fp32, normalised and scaled
    k: torch.Tensor,  # [..., H, d_k] fp32, normalised
    v: torch.Tensor,  # [..., H, d_v] fp32
    g: torch.Tensor,  # [..., H] fp32 log-decay
    beta: torch.Tensor,  # [..., H] fp32
    out: torch.Tensor,  # [..., H, d_v] fp32, written
) -> torch.Tensor:
    """S_t = a S + k (beta (v - (a S)^T k))^T with a = exp(g); o_t = S_t^T q. Returns S_t."""
    s = s * torch.exp(g)[..., None, None]
    recalled = (k[..., None, :] @ s).squeeze(-2)  # S^T k
    delta = (v - recalled) * beta[..., None]
    s = s + k[..., :, None] * delta[..., None, :]
    out.copy_((q[..., None, :] @ s).squeeze(-2))
    return s


def _window_attend(
    q: torch.Tensor,  # [T, Hq, D] queries at absolute indices first_query ..
    keys: torch.Tensor,  # [L, Hkv, D] keys at absolute indices first_key ..
    values: torch.Tensor,  # [L, Hkv, D]
    first_key: int,
    first_query: int,
    window: int,
    scale: float,
) -> torch.Tensor:
    """Causal windowed attention: query i sees keys max(0, i-W+1) .. i. fp32 softmax; q's dtype out."""
    num_q, num_heads, _ = q.shape
    group = num_heads // keys.shape[1]
    k32 = keys.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, L, D]
    v32 = values.float().repeat_interleave(group, dim=1).transpose(0, 1)
    key_pos = torch.arange(first_key, first_key + keys.shape[0], device=q.device)
    out = torch.empty_like(q)
    for b0 in range(0, num_q, _ATTN_QUERY_BLOCK):
        b1 = min(num_q, b0 + _ATTN_QUERY_BLOCK)
        q_pos = torch.arange(first_query + b0, first_query + b1, device=q.device)
        lo = max(0, first_query + b0 - window + 1 - first_key)
        hi = first_query + b1 - first_key  # keys beyond the block's last query are never visible
        kp = key_pos[lo:hi]
        visible = (kp[None, :] <= q_pos[:, None]) & (kp[None, :] > q_pos[:, None] - window)
        scores = (q[b0:b1].float().transpose(0, 1) @ k32[:, lo:hi].transpose(1, 2)) * scale  # [Hq, t, l]
        scores = scores.masked_fill(~visible[None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[b0:b1] = (probs @ v32[:, lo:hi]).transpose(0, 1).to(q.dtype)
    return out
