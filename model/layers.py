"""Text-decoder building blocks of InfiniteVL (spec sections 4.2-4.7).

Module and parameter names follow the checkpoint (`self_attn.q_proj`, `o_norm`, `A_log`, ...), so a
decoder layer's state dict maps one-to-one onto `model.layers.{i}.*`. The stateful parts (short conv,
delta-rule recurrence, windowed attention over the slot ring) are delegated to a `Backend`.

Projection fusion: after the weights are in place, `fuse_projections()` concatenates the input
projections of a block (GDN q|k|v|a|b|g, SWA q|k|v with biases, MLP gate|up) into one tensor and
re-points each checkpoint-named Linear's `.weight`/`.bias` at its slice of it (a view: no second
copy), so one GEMM replaces several and the state dict keeps its names and shapes. The fused
tensors are non-persistent buffers. Invariants: call it again after `.to()` (moving re-allocates
parameters and buffers separately, breaking the views) and after changing `A_log`, `dt_bias` or
`o_norm.weight` in place (their fp32 derivatives are cached); in-place writes to the projection
weights go through the views and need nothing. Forward works unfused too (separate GEMMs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.backends.base import (
    Backend,
    GatedNormed,
    GateInputs,
    GDNDecodeInputs,
    PointwiseOps,
    SplitKPartials,
    add_rms_norm,
    gate_values,
    gated_rms_norm,
)
from model.batch import BatchMeta
from model.config import TextConfig


class RMSNorm(nn.Module):
    """Spec 4.2: normalise in fp32, cast back to the input dtype, then multiply by the weight."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # rms_norm without a weight normalises in fp32 and returns x's dtype (the cast happens
        # before the weight multiply, as the spec requires); one fused kernel on CUDA
        return F.rms_norm(x, (x.shape[-1],), None, self.eps) * self.weight

    def add_forward(
        self, x: torch.Tensor | SplitKPartials, residual: torch.Tensor | None, ops: PointwiseOps | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(s), s) with s = residual + x, the residual stream in x's dtype (s = x when residual
        is None); one fused kernel when the backend has pointwise ops, which also adds up x when it
        is a projection's split-K partials (`Backend.linear` with `partial`)."""
        return add_rms_norm(ops, x, residual, self.weight, self.eps)


@torch.no_grad()
def _fuse_rows(owners: list[nn.Module], attr: str, fused: torch.Tensor | None) -> torch.Tensor:
    """Concatenate `owner.<attr>` of every owner along dim 0 and re-point each at its row slice.

    Returns `fused` unchanged when the parameters already are its slices, in order (idempotent).
    """
    params = [getattr(m, attr) for m in owners]
    if fused is not None and _are_slices_of(params, fused):
        return fused
    fused = torch.cat([p.detach() for p in params], dim=0)
    start = 0
    for owner, p in zip(owners, params, strict=True):
        rows = p.shape[0]
        setattr(owner, attr, nn.Parameter(fused[start : start + rows], requires_grad=p.requires_grad))
        start += rows
    return fused


def _are_slices_of(params: list[torch.Tensor], fused: torch.Tensor) -> bool:
    if fused.device.type == "meta" or any(p.device != fused.device for p in params):
        return False
    base, row_bytes = fused.data_ptr(), fused[0].numel() * fused.element_size()
    offset = 0
    for p in params:
        if p.data_ptr() != base + offset * row_bytes or p.dtype != fused.dtype:
            return False
        offset += p.shape[0]
    return offset == fused.shape[0]


def _project(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    parts: list[nn.Linear],
    backend: Backend,
) -> torch.Tensor:
    """x through the concatenated Linears `parts`: one GEMM when fused, else one per part."""
    if weight is not None:
        return backend.linear(x, weight, bias)
    return torch.cat([backend.linear(x, p.weight, p.bias) for p in parts], dim=-1)


class MLP(nn.Module):
    """SwiGLU MLP without biases (spec 4.3)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.register_buffer("gate_up_weight", None, persistent=False)  # [2 * inter, hidden] once fused

    def fuse_projections(self) -> None:
        """gate_proj|up_proj into one weight that the two Linears view (see module docstring)."""
        self.gate_up_weight = _fuse_rows([self.gate_proj, self.up_proj], "weight", self.gate_up_weight)

    def forward(
        self, x: torch.Tensor, backend: Backend, partial: bool = False
    ) -> torch.Tensor | SplitKPartials:
        """partial: the output goes straight to a residual-add norm (`Backend.linear`'s `partial`)."""
        if self.gate_up_weight is not None:  # fused: the backend may keep gate|up out of memory
            act = backend.linear_silu_mul(x, self.gate_up_weight)
        else:
            gate = backend.linear(x, self.gate_proj.weight)
            act = F.silu(gate) * backend.linear(x, self.up_proj.weight)
        return self.down(act, backend, partial)

    def down(
        self, act: torch.Tensor, backend: Backend, partial: bool = False
    ) -> torch.Tensor | SplitKPartials:
        """The down projection of the activation silu(gate) * up [N, intermediate]."""
        return backend.linear(act, self.down_proj.weight, partial=partial)


# ---------------------------------------------------------------------------------------------------
# Multimodal RoPE (spec 4.6)


def rope_inv_freq(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """The rotary frequencies [head_dim / 2] fp32: 1 / theta^(2 f / head_dim)."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (theta**exponent)


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
    inv_freq = rope_inv_freq(head_dim, theta, positions.device)
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
        self.register_buffer("qkv_weight", None, persistent=False)  # [q_dim + 2 kv_dim, hidden] once fused
        self.register_buffer("qkv_bias", None, persistent=False)

    def _parts(self) -> list[nn.Linear]:
        return [self.q_proj, self.k_proj, self.v_proj]

    def fuse_projections(self) -> None:
        """q|k|v weights and biases into one GEMM's operands that the Linears view."""
        self.qkv_weight = _fuse_rows(self._parts(), "weight", self.qkv_weight)
        self.qkv_bias = _fuse_rows(self._parts(), "bias", self.qkv_bias)

    def forward(
        self,
        x: torch.Tensor,  # [N, hidden]
        rope: tuple[torch.Tensor, torch.Tensor],  # cos, sin [N, head_dim] model dtype
        meta: BatchMeta,
        key_cache: torch.Tensor,  # [num_slots + 1, W, Hkv, D]
        value_cache: torch.Tensor,
        backend: Backend,
        partial: bool = False,  # the output goes straight to a residual-add norm (Backend.linear)
    ) -> torch.Tensor | SplitKPartials:
        q, k, v = self.project(x, rope, backend)
        out = self.attend(q, k, v, meta, key_cache, value_cache, backend)
        return self.finish(out, backend, partial)

    def project(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        backend: Backend,
        rotate: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [N, Hq, D] and k [N, Hkv, D] rotated (unless not `rotate`: then `attend` gets the rope
        tables), v [N, Hkv, D]: row-strided views, unit stride on D (the stateless part before the
        attention)."""
        qkv = _project(x, self.qkv_weight, self.qkv_bias, self._parts(), backend)  # [N, (Hq + 2 Hkv) * D]
        return self.heads(qkv, rope, backend, rotate)

    def heads(
        self,
        qkv: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        backend: Backend,
        rotate: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`project` from the fused q|k|v product [N, (Hq + 2 Hkv) * D] on (the decoder block may
        compute the product together with its norm, Backend.norm_linear)."""
        n, hq, d = qkv.shape[0], self.num_heads, self.head_dim
        qk_dim = (hq + self.num_kv_heads) * d
        # rotate q and k heads together (one set of elementwise kernels); rows keep stride qkv.shape[1]
        qk = qkv[:, :qk_dim].view(n, hq + self.num_kv_heads, d)
        if rotate:
            qk = apply_rope(qk, *rope) if backend.pointwise is None else backend.pointwise.rope(qk, *rope)
        q, k = qk[:, :hq], qk[:, hq:]  # head-strided views, unit stride on D
        v = qkv[:, qk_dim:].view(n, self.num_kv_heads, d)
        return q, k, v

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: BatchMeta,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        backend: Backend,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,  # q and k not rotated yet
    ) -> torch.Tensor:
        """The windowed attention over the slot rings [N, Hq, D] (the stateful part; rings updated)."""
        return backend.sliding_window_attention(q, k, v, meta, key_cache, value_cache, self.scale, rope)

    def finish(
        self, out: torch.Tensor, backend: Backend, partial: bool = False
    ) -> torch.Tensor | SplitKPartials:
        """The output projection of the attention output [N, Hq, D]."""
        return backend.linear(out.reshape(out.shape[0], -1), self.o_proj.weight, partial=partial)


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
        # once fused: [2 key_dim + 2 value_dim + 2 H, hidden] (q|k|v|a|b|g rows) and [conv_dim, 1, K]
        self.register_buffer("in_proj_weight", None, persistent=False)
        self.register_buffer("conv_weight_fused", None, persistent=False)
        # once fused: -exp(A_log), dt_bias and o_norm.weight in fp32 [H], [H], [d_v] (cached copies)
        self.register_buffer("neg_exp_a", None, persistent=False)
        self.register_buffer("dt_bias_f32", None, persistent=False)
        self.register_buffer("o_norm_weight_f32", None, persistent=False)
        # column widths of the projected stream: conv stream q|k|v, a, b, z
        self.split_sizes = [2 * key_dim + value_dim, self.num_heads, self.num_heads, value_dim]

    def _parts(self) -> list[nn.Linear]:
        return [self.q_proj, self.k_proj, self.v_proj, self.a_proj, self.b_proj, self.g_proj]

    def fuse_projections(self) -> None:
        """One weight for q|k|v|a|b|g and one for the three conv kernels, viewed by the modules;
        fp32 copies of the gate and norm constants."""
        self.in_proj_weight = _fuse_rows(self._parts(), "weight", self.in_proj_weight)
        convs = [self.q_conv1d, self.k_conv1d, self.v_conv1d]
        self.conv_weight_fused = _fuse_rows(convs, "weight", self.conv_weight_fused)
        with torch.no_grad():
            self.neg_exp_a = -torch.exp(self.A_log.float())
            self.dt_bias_f32 = self.dt_bias.float().clone()
            self.o_norm_weight_f32 = self.o_norm.weight.float().clone()

    def conv_weight(self) -> torch.Tensor:
        """The q|k|v depthwise kernels concatenated: [conv_dim, K]; column K-1 multiplies the newest token."""
        if self.conv_weight_fused is not None:
            return self.conv_weight_fused.squeeze(1)
        parts = (self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight)
        return torch.cat([w.squeeze(1) for w in parts], dim=0)

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """g [N, H] fp32 log-decay (-exp(A_log) * softplus(a + dt_bias)) and beta [N, H] model dtype."""
        return self.gates_from(self.a_proj(x), self.b_proj(x))

    def gates_from(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`gates` from the projections a, b [N, H] (model dtype, any row stride)."""
        if self.neg_exp_a is not None:
            return gate_values(GateInputs(a, b, self.neg_exp_a, self.dt_bias_f32))
        g = F.softplus(a.float() + self.dt_bias.float()) * -torch.exp(self.A_log.float())
        return g, torch.sigmoid(b)

    def gated_norm(self, o: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Per-head RMSNorm of o [N, H, d_v] times weight and silu(z); fp32 inside, model dtype out."""
        w = self.o_norm_weight_f32 if self.o_norm_weight_f32 is not None else self.o_norm.weight.float()
        return gated_rms_norm(o, z, w, self.norm_eps)

    def forward(
        self,
        x: torch.Tensor,  # [N, hidden]
        meta: BatchMeta,
        conv_state: torch.Tensor,  # [num_slots + 1, conv_dim, K]
        recurrent_state: torch.Tensor,  # [num_slots + 1, H, d_k, d_v]
        backend: Backend,
        partial: bool = False,  # the output goes straight to a residual-add norm (Backend.linear)
    ) -> torch.Tensor | SplitKPartials:
        proj = self.project(x, backend)
        o = self.recur(proj, meta, conv_state, recurrent_state, backend, gated_norm=True)
        return self.finish(o, proj, backend, partial)

    def project(self, x: torch.Tensor, backend: Backend) -> torch.Tensor:
        """The input projection q|k|v|a|b|g [N, sum(split_sizes)] (the stateless part before the
        recurrence)."""
        return _project(x, self.in_proj_weight, None, self._parts(), backend)

    def recur(
        self,
        proj: torch.Tensor,  # [N, sum(split_sizes)] (any row stride, unit stride on channels)
        meta: BatchMeta,
        conv_state: torch.Tensor,
        recurrent_state: torch.Tensor,
        backend: Backend,
        gated_norm: bool = False,  # the caller's `finish` takes the output already normed (GatedNormed)
    ) -> torch.Tensor | GatedNormed:
        """Short conv, gates and the delta rule: the output o [N, H, d_v] before the gated norm (the
        stateful part; conv and recurrent state rows updated). In decode a backend may do it all in
        one fused step (`Backend.gdn_decode`), with gated_norm the gated norm as well."""
        if meta.is_decode and self.neg_exp_a is not None:  # the fused step needs the fp32 constants
            dims = (self.num_heads, self.head_k_dim, self.head_v_dim)
            inputs = GDNDecodeInputs(
                proj,
                self.conv_weight(),
                dims,
                self.neg_exp_a,
                self.dt_bias_f32,
                self.o_norm_weight_f32,
                self.norm_eps,
            )
            fused = backend.gdn_decode(inputs, meta, conv_state, recurrent_state, gated_norm)
            if fused is not None:
                return fused
        n = proj.shape[0]
        # column slices: rows keep stride proj.shape[1], unit stride on channels
        stream, a, b, _ = proj.split(self.split_sizes, dim=-1)
        key_dim = self.num_heads * self.head_k_dim
        value_dim = self.num_heads * self.head_v_dim
        norm_dim = self.head_k_dim if backend.qk_l2norm_in_conv(meta) else None
        q, k, v = backend.short_conv(
            stream, self.conv_weight(), meta, conv_state, [key_dim, key_dim, value_dim], norm_dim
        )
        q = q.view(n, self.num_heads, self.head_k_dim)  # row-strided or contiguous: unit stride on d
        k = k.view(n, self.num_heads, self.head_k_dim)
        v = v.view(n, self.num_heads, self.head_v_dim)
        ops = backend.pointwise if self.neg_exp_a is not None else None  # fused ops need the fp32 constants
        gates = None
        if self.neg_exp_a is not None and backend.gates_in_delta_rule(meta):
            g = beta = None  # the backend's delta-rule kernel computes them from the gate inputs
            gates = GateInputs(a, b, self.neg_exp_a, self.dt_bias_f32)
        elif ops is not None:
            g, beta = ops.gdn_gates(a, b, self.neg_exp_a, self.dt_bias_f32)
        else:
            g, beta = self.gates_from(a, b)
        return backend.gated_delta_rule(q, k, v, g, beta, meta, recurrent_state, norm_dim is not None, gates)

    def finish(
        self, o: torch.Tensor | GatedNormed, proj: torch.Tensor, backend: Backend, partial: bool = False
    ) -> torch.Tensor | SplitKPartials:
        """The gated output norm of o [N, H, d_v] with z from the projection (unless `recur` did it),
        then the output projection."""
        if isinstance(o, GatedNormed):
            return backend.linear(o.out, self.o_proj.weight, partial=partial)
        n = o.shape[0]
        z = proj[:, proj.shape[1] - self.split_sizes[-1] :]
        ops = backend.pointwise if self.neg_exp_a is not None else None
        if ops is not None:  # the backend may fold the gated norm into the projection's GEMV
            return backend.gated_norm_linear(
                o, z, self.o_norm_weight_f32, self.norm_eps, self.o_proj.weight, partial=partial
            )
        normed = self.gated_norm(o, z.view(n, self.num_heads, self.head_v_dim)).reshape(n, -1)
        return backend.linear(normed, self.o_proj.weight, partial=partial)
