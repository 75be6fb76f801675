"""Text-decoder building blocks of InfiniteVL (spec sections 4.2-4.7).

Module and parameter names follow the checkpoint (`self_attn.q_proj`, `o_norm`, `A_log`, ...), so a
decoder layer's state dict maps one-to-one onto `model.layers.{i}.*`. The stateful parts (short conv,
delta-rule recurrence, windowed attention over the slot ring) are delegated to a `Backend`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.backends.base import Backend
from model.batch import BatchMeta
from model.config import TextConfig


class RMSNorm(nn.Module):
    """Spec 4.2: normalise in fp32, cast back to the input dtype, then multiply by the weight."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class MLP(nn.Module):
    """SwiGLU MLP without biases (spec 4.3)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# ---------------------------------------------------------------------------------------------------
# Multimodal RoPE (spec 4.6)


def mrope_cos_sin(
    positions: torch.Tensor,
    head_dim: int,
    theta: float,
    mrope_section: tuple[int, ...],
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [N, head_dim] in `dtype` for position triples `positions` [3, N] (t, h, w).

    Frequency slot f (of head_dim/2) takes its position from axis t, h or w by contiguous sections of
    `mrope_section`; angles are computed in fp32 and cast to the model dtype (as the reference does).
    """
    half = head_dim // 2
    if sum(mrope_section) != half:
        raise ValueError(f"mrope_section {mrope_section} must sum to head_dim/2 = {half}")
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim
    inv_freq = 1.0 / (theta**exponent)  # [half] fp32
    # slot f takes axis 0 (t), 1 (h) or 2 (w); built from host ints (no host->device copy, no sync:
    # this function runs inside captured CUDA graphs)
    pos_f = positions.float()
    pos = torch.cat([pos_f[a : a + 1].expand(n, -1) for a, n in enumerate(mrope_section)], dim=0)  # [half, N]
    angles = pos.transpose(0, 1) * inv_freq  # [N, half] fp32
    angles = torch.cat([angles, angles], dim=-1)  # rotate_half pairs f with f + half
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split rotation of x [N, H, D] with cos/sin [N, D]; arithmetic in x's dtype."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


# ---------------------------------------------------------------------------------------------------
# Sliding-window attention mixer (spec 4.4)


class SlidingWindowAttention(nn.Module):
    """GQA attention with q/k/v biases, M-RoPE on new tokens and a per-slot ring of the last W keys."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        q_dim = self.num_heads * self.head_dim
        kv_dim = self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, q_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=True)
        self.o_proj = nn.Linear(q_dim, cfg.hidden_size, bias=False)
        self.scale = self.head_dim**-0.5

    def forward(
        self,
        x: torch.Tensor,  # [N, hidden]
        rope: tuple[torch.Tensor, torch.Tensor],  # cos, sin [N, head_dim] model dtype
        meta: BatchMeta,
        key_cache: torch.Tensor,  # [num_slots + 1, W, Hkv, D]
        value_cache: torch.Tensor,
        backend: Backend,
    ) -> torch.Tensor:
        n = x.shape[0]
        q = self.q_proj(x).view(n, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(n, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(n, self.num_kv_heads, self.head_dim)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = backend.sliding_window_attention(q, k, v, meta, key_cache, value_cache, self.scale)
        return self.o_proj(out.reshape(n, -1))


# ---------------------------------------------------------------------------------------------------
# Gated DeltaNet mixer (spec 4.7)


def _depthwise_conv(channels: int, kernel: int) -> nn.Conv1d:
    # only the weight [C, 1, K] is used (by the backend's short_conv); it maps onto `*_conv1d.weight`
    return nn.Conv1d(channels, channels, kernel, groups=channels, bias=False)


class GatedDeltaNet(nn.Module):
    """Gated DeltaNet mixer: projections, short conv, gates, delta-rule recurrence, gated output norm."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_linear_heads
        self.head_k_dim = cfg.linear_head_dim
        self.head_v_dim = cfg.linear_value_dim
        self.norm_eps = cfg.norm_eps
        key_dim = self.num_heads * self.head_k_dim
        value_dim = self.num_heads * self.head_v_dim
        hidden = cfg.hidden_size
        self.q_proj = nn.Linear(hidden, key_dim, bias=False)
        self.k_proj = nn.Linear(hidden, key_dim, bias=False)
        self.v_proj = nn.Linear(hidden, value_dim, bias=False)
        self.a_proj = nn.Linear(hidden, self.num_heads, bias=False)
        self.b_proj = nn.Linear(hidden, self.num_heads, bias=False)
        self.A_log = nn.Parameter(torch.zeros(self.num_heads))
        self.dt_bias = nn.Parameter(torch.zeros(self.num_heads))
        self.q_conv1d = _depthwise_conv(key_dim, cfg.conv_size)
        self.k_conv1d = _depthwise_conv(key_dim, cfg.conv_size)
        self.v_conv1d = _depthwise_conv(value_dim, cfg.conv_size)
        self.g_proj = nn.Linear(hidden, value_dim, bias=False)
        self.o_norm = RMSNorm(self.head_v_dim, eps=cfg.norm_eps)
        self.o_proj = nn.Linear(value_dim, hidden, bias=False)

    def conv_weight(self) -> torch.Tensor:
        """The q|k|v depthwise kernels concatenated: [conv_dim, K]; column K-1 multiplies the newest token."""
        parts = (self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight)
        return torch.cat([w.squeeze(1) for w in parts], dim=0)

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """g [N, H] fp32 log-decay (-exp(A_log) * softplus(a + dt_bias)) and beta [N, H] model dtype."""
        a = self.a_proj(x).float()
        g = -torch.exp(self.A_log.float()) * F.softplus(a + self.dt_bias.float())
        beta = torch.sigmoid(self.b_proj(x))
        return g, beta

    def gated_norm(self, o: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Per-head RMSNorm of o [N, H, d_v] times weight and silu(z); fp32 inside, model dtype out."""
        o32 = o.float()
        o32 = o32 * torch.rsqrt(o32.pow(2).mean(-1, keepdim=True) + self.norm_eps)
        y = o32 * self.o_norm.weight.float() * F.silu(z.float())
        return y.to(o.dtype)

    def forward(
        self,
        x: torch.Tensor,  # [N, hidden]
        meta: BatchMeta,
        conv_state: torch.Tensor,  # [num_slots + 1, conv_dim, K]
        recurrent_state: torch.Tensor,  # [num_slots + 1, H, d_k, d_v]
        backend: Backend,
    ) -> torch.Tensor:
        n = x.shape[0]
        stream = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)  # [N, conv_dim]
        mixed = backend.short_conv(stream, self.conv_weight(), meta, conv_state)
        key_dim = self.num_heads * self.head_k_dim
        q = mixed[:, :key_dim].reshape(n, self.num_heads, self.head_k_dim)
        k = mixed[:, key_dim : 2 * key_dim].reshape(n, self.num_heads, self.head_k_dim)
        v = mixed[:, 2 * key_dim :].reshape(n, self.num_heads, self.head_v_dim)
        g, beta = self.gates(x)
        o = backend.gated_delta_rule(q, k, v, g, beta, meta, recurrent_state)
        z = self.g_proj(x).view(n, self.num_heads, self.head_v_dim)
        return self.o_proj(self.gated_norm(o, z).reshape(n, -1))
