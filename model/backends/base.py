"""The kernel seam: the three stateful operations of the text decoder.

The model code calls only these; the torch backend (exact spec math, CPU and GPU) is the oracle and
a GPU backend replaces it without touching the model. Every method works on a packed batch described
by `BatchMeta` and reads/writes pool rows `meta.slot_ids` of the per-layer state views it is given
(in place). A sequence whose `context_lens` is 0 starts from zero state whatever the row holds.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F

from model.batch import BatchMeta


class GateInputs(NamedTuple):
    """What the Gated DeltaNet gates are computed from, for a backend that computes them inside its
    delta-rule kernel (`Backend.gates_in_delta_rule`)."""

    a: torch.Tensor  # [N, H] model dtype, any row stride: the a projection
    b: torch.Tensor  # [N, H]: the b projection
    neg_exp_a: torch.Tensor  # [H] fp32: -exp(A_log)
    dt_bias: torch.Tensor  # [H] fp32


class SplitKPartials(NamedTuple):
    """A product x W^T left as the fp32 partial sums of its K splits, for the residual-add RMSNorm that
    consumes it to add up in its own launch (`Backend.linear` with `partial=True`): the split-K
    reduction kernel goes away. Added in split order and rounded once to `dtype`, the partials give
    exactly the tensor `linear` would have returned."""

    partials: torch.Tensor  # [S, M, N] fp32
    dtype: torch.dtype  # the product's dtype (x's)

    def total(self) -> torch.Tensor:
        """The [M, N] product in `dtype`, summed in split order as the fused norm sums it."""
        acc = torch.zeros_like(self.partials[0])
        for part in self.partials:
            acc += part
        return acc.to(self.dtype)


class GDNDecodeInputs(NamedTuple):
    """What a backend's one-step decode recurrence of a Gated DeltaNet layer reads besides the layer's
    conv and recurrent state (`Backend.gdn_decode`)."""

    proj: torch.Tensor  # [N, 2 H d_k + 2 H d_v + 2 H] the input projection: q|k|v|a|b|z
    conv_weight: torch.Tensor  # [2 H d_k + H d_v, K] the q|k|v depthwise kernels
    head_dims: tuple[int, int, int]  # (H, d_k, d_v)
    neg_exp_a: torch.Tensor  # [H] fp32: -exp(A_log)
    dt_bias: torch.Tensor  # [H] fp32
    norm_weight: torch.Tensor  # [d_v] fp32: the gated output norm's weight
    eps: float  # the gated output norm's eps


class GatedNormed(NamedTuple):
    """A Gated DeltaNet layer's mixer output already through its gated output norm ([N, H * d_v],
    from `Backend.gdn_decode`): only the output projection is left."""

    out: torch.Tensor


def gate_values(gates: GateInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference gates: g = -exp(A_log) softplus(a + dt_bias) [N, H] fp32 (a model-dtype a plus
    the fp32 dt_bias promotes exactly to the fp32 sum) and beta = sigmoid(b) [N, H] in b's dtype."""
    return F.softplus(gates.a + gates.dt_bias) * gates.neg_exp_a, torch.sigmoid(gates.b)


def linear_silu_mul(backend: Backend, x: torch.Tensor, gate_up_weight: torch.Tensor) -> torch.Tensor:
    """The unfused MLP activation, the reference of `Backend.linear_silu_mul`: the gate|up product,
    then silu(gate) * up (the backend's fused op, or plain PyTorch without pointwise ops)."""
    gate_up = backend.linear(x, gate_up_weight)
    if backend.pointwise is not None:
        return backend.pointwise.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def add_rms_norm(
    ops: PointwiseOps | None,
    x: torch.Tensor | SplitKPartials,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(s) * weight, s) with s = residual + x, the residual stream in the model dtype (s = x
    without a residual; split-K partials are added up first): the fused kernel of `ops`, or the
    plain code (spec 4.2: normalise in fp32, round to the model dtype, then multiply by the weight)."""
    if ops is not None:
        return ops.rms_norm(x, weight, eps, residual)
    if isinstance(x, SplitKPartials):
        x = x.total()
    s = x if residual is None else residual + x
    return F.rms_norm(s, (s.shape[-1],), None, eps) * weight, s


def norm_linear(
    backend: Backend,
    x: torch.Tensor | SplitKPartials,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    silu_mul: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference of `Backend.norm_linear`, two steps: the residual-add norm, then the product
    (`linear`, or `linear_silu_mul` of an MLP's gate|up weight)."""
    normed, s = add_rms_norm(backend.pointwise, x, residual, norm_weight, eps)
    if silu_mul:
        return backend.linear_silu_mul(normed, weight), s
    return backend.linear(normed, weight, bias), s


def gated_norm_linear(
    backend: Backend,
    o: torch.Tensor,
    z: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    partial: bool = False,
) -> torch.Tensor | SplitKPartials:
    """The reference of `Backend.gated_norm_linear`, two steps: the gated norm (the backend's fused
    op, or plain PyTorch: fp32 inside, rounded once), then the output projection (`linear`)."""
    if backend.pointwise is not None:
        normed = backend.pointwise.gated_rms_norm(o, z, norm_weight, eps)
    else:
        n, h, dv = o.shape
        normed = gated_rms_norm(o, z.view(n, h, dv), norm_weight, eps).reshape(n, h * dv)
    return backend.linear(normed, weight, partial=partial)


def gated_rms_norm(o: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The plain GDN gated output norm: per-head RMSNorm of o [N, H, d_v] times weight (fp32 [d_v])
    and silu(z) [N, H, d_v], fp32 inside, rounded once to o's dtype."""
    y = F.rms_norm(o.float(), (o.shape[-1],), weight.float(), eps)  # (o * rsqrt) * w in fp32
    gate = F.silu(z.float())
    if o.dtype == y.dtype:
        return y * gate
    out = torch.empty(o.shape, dtype=o.dtype, device=o.device)
    return torch.mul(y, gate, out=out)  # fp32 product rounded once to the model dtype on store


class PointwiseOps(Protocol):
    """Fused elementwise steps of the decoder block and the vision tower; each equals the plain-PyTorch
    code for the same step (model.layers, transformers' vision blocks) up to reduction order. A backend
    without them leaves `pointwise` None."""

    def rms_norm(
        self,
        x: torch.Tensor | SplitKPartials,  # [N, D], or a deferred product (summed first, as linear would)
        weight: torch.Tensor,
        eps: float,
        residual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # (rmsnorm(s) * weight, s), s = residual + x (or x)
        ...

    def gated_rms_norm(
        self,
        o: torch.Tensor,  # [N, H, d_v] delta-rule output
        z: torch.Tensor,  # [N, H * d_v] output gate (any row stride)
        weight: torch.Tensor,  # [d_v] fp32
        eps: float,
    ) -> torch.Tensor:  # [N, H * d_v] o's dtype: rmsnorm(o) * weight * silu(z), fp32 inside
        ...

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:  # [N, 2 I] -> silu(gate) * up [N, I]
        ...

    def gdn_gates(
        self,
        a: torch.Tensor,  # [N, H] (any row stride)
        b: torch.Tensor,  # [N, H]
        neg_exp_a: torch.Tensor,  # [H] fp32, -exp(A_log)
        dt_bias: torch.Tensor,  # [H] fp32
    ) -> tuple[torch.Tensor, torch.Tensor]:  # g [N, H] fp32 log-decay, beta [N, H] b's dtype
        ...

    def rope(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:  # x [N, heads, D] rotated; may be x itself, overwritten
        ...

    def vision_rope(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,  # cos/sin [N, D] fp32, D even
    ) -> torch.Tensor:  # x [N, heads, D] rotated in fp32 and rounded once (the vision tower's rotary)
        ...

    def mrope_cos_sin(
        self,
        positions: torch.Tensor,  # [3, N] int64 (t, h, w)
        head_dim: int,
        theta: float,
        mrope_section: tuple[int, ...],
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # cos/sin [N, head_dim]: model.layers.mrope_cos_sin
        ...

    def embed_mrope_cos_sin(
        self,
        input_ids: torch.Tensor,  # [N]
        table: torch.Tensor,  # [V, hidden] embedding weight
        positions: torch.Tensor,  # [3, N] int64 (t, h, w)
        head_dim: int,
        theta: float,
        mrope_section: tuple[int, ...],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # (table[input_ids], cos, sin in table.dtype)
        ...


class Backend(Protocol):
    name: str
    pointwise: PointwiseOps | None  # fused elementwise ops, or None for the model's own code

    def linear(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        partial: bool = False,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor | SplitKPartials:
        """F.linear(x, weight, bias): every projection of the text decoder and the LM head. With
        `partial`, the caller hands the result only to `RMSNorm.add_forward` (an output projection
        before the residual add), so a backend may return the product's split-K partial sums for the
        fused norm to add up; without it, always a tensor. With `out` (fp32 [N, out_features], the LM
        head's logits), the product rounded to x's dtype is written into out, widened, and out returned."""
        ...

    def linear_silu_mul(
        self,
        x: torch.Tensor,  # [N, K]
        gate_up_weight: torch.Tensor,  # [2 I, K]: gate rows, then up rows
    ) -> torch.Tensor:  # silu(gate) * up [N, I], gate and up rounded to x's dtype first (linear_silu_mul)
        ...

    def norm_linear(
        self,
        x: torch.Tensor | SplitKPartials,  # [N, K] block output (or an output projection's partials)
        residual: torch.Tensor | None,  # [N, K] residual stream before x is added; None: s = x
        norm_weight: torch.Tensor,  # [K] the RMSNorm's weight
        eps: float,
        weight: torch.Tensor,  # [out, K], or an MLP's gate|up [2 I, K] with silu_mul
        bias: torch.Tensor | None = None,  # [out] (not with silu_mul)
        silu_mul: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # (product [N, out] or silu(gate) * up [N, I], residual stream)
        """A pre-norm block's residual-add RMSNorm and the projection after it (`norm_linear`). A
        backend may fold the norm into the GEMM: the residual stream stays bit-identical, the
        product may differ in bf16 roundings of the normalised activations."""
        ...

    def gated_norm_linear(
        self,
        o: torch.Tensor,  # [N, H, d_v] the delta-rule output
        z: torch.Tensor,  # [N, H * d_v] the output gate (a column slice of the input projection)
        norm_weight: torch.Tensor,  # [d_v] fp32
        eps: float,
        weight: torch.Tensor,  # [out, H * d_v] the output projection
        partial: bool = False,  # the output goes straight to a residual-add norm (`linear`)
    ) -> torch.Tensor | SplitKPartials:
        """A GDN layer's gated output norm, rmsnorm(o) * norm_weight * silu(z) per head rounded once,
        and the output projection after it (`gated_norm_linear`); a backend may fold the norm into
        the GEMV (each K block one head: the same roundings)."""
        ...

    def qk_l2norm_in_conv(self, meta: BatchMeta) -> bool:
        """Whether the model should ask short_conv for L2-normalised q and k for this call (and tell
        gated_delta_rule so): both backends implement the two flags; a backend says yes where its
        kernels gain from it (one pass over q and k less)."""
        ...

    def gates_in_delta_rule(self, meta: BatchMeta) -> bool:
        """Whether the model should hand gated_delta_rule the gate inputs (`gates`) instead of g and
        beta: both backends accept either; a backend says yes where its kernel computes the gates on
        the fly (one launch less per layer)."""
        ...

    def short_conv(
        self,
        x: torch.Tensor,  # [N, C] model dtype, pre-convolution projected stream (q|k|v concatenated)
        weight: torch.Tensor,  # [C, K] depthwise causal kernel; column K-1 multiplies the current token
        meta: BatchMeta,
        conv_state: torch.Tensor,  # [num_slots + 1, C, K] this layer's view, updated in place
        split_sizes: list[int] | None = None,  # channel widths to return separately (q|k|v)
        l2norm_head_dim: int | None = None,  # with split_sizes: parts 0 and 1 L2-normalised per head
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:  # [N, C] model dtype, silu(conv(x)), fp32 accumulation;
        ...  # with split_sizes, one [N, width] tensor per part (contiguous where the backend prefers);
        # with l2norm_head_dim, each head of that many channels of q and k is x / sqrt(sum(x^2) + 1e-6)

    def gated_delta_rule(
        self,
        q: torch.Tensor,  # [N, H, d_k] model dtype, before L2 normalisation (unless qk_normalized)
        k: torch.Tensor,  # [N, H, d_k]
        v: torch.Tensor,  # [N, H, d_v]
        g: torch.Tensor | None,  # [N, H] fp32 log-decay (<= 0); None with `gates`
        beta: torch.Tensor | None,  # [N, H] write strength in (0, 1); None with `gates`
        meta: BatchMeta,
        state: torch.Tensor,  # [num_slots + 1, H, d_k, d_v] this layer's view, updated in place
        qk_normalized: bool = False,  # q and k come L2-normalised (short_conv's l2norm_head_dim)
        gates: GateInputs | None = None,  # instead of g and beta: g, beta = gate_values(gates)
    ) -> torch.Tensor:  # [N, H, d_v] model dtype; q/k L2-normalised (eps 1e-6), scale d_k**-0.5
        ...

    def gdn_decode(
        self,
        inputs: GDNDecodeInputs,
        meta: BatchMeta,  # a decode call (one token per row)
        conv_state: torch.Tensor,  # [num_slots + 1, conv_dim, K] updated in place
        state: torch.Tensor,  # [num_slots + 1, H, d_k, d_v] updated in place
        gated_norm: bool,  # the caller takes a GatedNormed back
    ) -> torch.Tensor | GatedNormed | None:
        """The decode step of a GDN layer's recurrence in the backend's own fused form: what
        short_conv, the gates and gated_delta_rule give ([N, H, d_v]), or with gated_norm, where the
        backend fuses it too, the gated output norm after them (GatedNormed). None: the backend has
        no such step for this call, and the model runs the separate steps."""
        ...

    def sliding_window_attention(
        self,
        q: torch.Tensor,  # [N, Hq, D] post-RoPE
        k: torch.Tensor,  # [N, Hkv, D] post-RoPE
        v: torch.Tensor,  # [N, Hkv, D]
        meta: BatchMeta,
        key_cache: torch.Tensor,  # [num_slots + 1, W, Hkv, D] ring: token p at row p % W; updated in place
        value_cache: torch.Tensor,
        scale: float,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,  # cos, sin [N, D]: q and k before RoPE
    ) -> torch.Tensor:  # [N, Hq, D]; query at absolute index i sees keys max(0, i-W+1) .. i
        ...  # with rope the backend rotates q and k first (model.layers.apply_rope's roundings)

    def rope_in_attention(self, meta: BatchMeta) -> bool:
        """Whether the model should hand sliding_window_attention q and k before RoPE, with the
        rope tables: both backends accept either; a backend says yes where its attention kernel
        rotates them on the fly (one launch less per attention layer)."""
        ...

    def embed_with_rope_tables(self, meta: BatchMeta) -> bool:
        """Whether the model should take the token embeddings and the rope tables from one call
        (`PointwiseOps.embed_mrope_cos_sin`, one launch) rather than the embedding op and
        `mrope_cos_sin`."""
        ...
