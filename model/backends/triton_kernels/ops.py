"""The decode kernels and the fused pointwise ops registered as torch custom ops, so that torch.compile
treats them as opaque (in-place) operations and can fuse the elementwise code around them.

Outside torch.compile the backend calls the plain launchers instead (`eager_or_op`): custom-op
dispatch costs tens of microseconds of host time per call, which an eager prefill of a few hundred
tokens (a video frame) pays hundreds of times per step.
"""

from __future__ import annotations

import torch

from model.backends.base import SplitKPartials
from model.backends.triton_kernels import pdl, pointwise
from model.backends.triton_kernels.conv import conv_decode
from model.backends.triton_kernels.gdn import gdn_decode
from model.backends.triton_kernels.swa import swa_decode
from model.layers import mrope_cos_sin, rope_inv_freq


def eager_or_op(op, launcher):
    """A callable that runs `op` while torch.compile traces and `launcher` (same signature) otherwise."""

    def call(*args):
        return op(*args) if torch.compiler.is_compiling() else launcher(*args)

    return call


@torch.library.custom_op("infinitevl::conv_decode", mutates_args=("conv_state",))
def conv_decode_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    conv_state: torch.Tensor,
    slot_ids: torch.Tensor,
    context_lens: torch.Tensor,
    norm_channels: int,
    norm_head_dim: int,
) -> torch.Tensor:
    """See conv.conv_decode."""
    return conv_decode(
        x, weight.contiguous(), conv_state, slot_ids, context_lens, norm_channels, norm_head_dim
    )


@conv_decode_op.register_fake
def _(x, weight, conv_state, slot_ids, context_lens, norm_channels, norm_head_dim):
    return torch.empty_like(x)


@torch.library.custom_op("infinitevl::gdn_decode", mutates_args=("state",))
def gdn_decode_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    slot_ids: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    qk_normalized: bool,
    neg_exp_a: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
) -> torch.Tensor:
    """See gdn.gdn_decode."""
    return gdn_decode(
        q, k, v, g, beta, state, slot_ids, context_lens, scale, qk_normalized, neg_exp_a, dt_bias
    )


@gdn_decode_op.register_fake
def _(q, k, v, g, beta, state, slot_ids, context_lens, scale, qk_normalized, neg_exp_a, dt_bias):
    return v.new_empty((q.shape[0], q.shape[1], v.shape[2]))


@torch.library.custom_op("infinitevl::swa_decode", mutates_args=("key_cache", "value_cache"))
def swa_decode_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_ids: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    num_sms: int,
) -> torch.Tensor:
    """See swa.swa_decode."""
    return swa_decode(q, k, v, key_cache, value_cache, slot_ids, context_lens, scale, num_sms)


@swa_decode_op.register_fake
def _(q, k, v, key_cache, value_cache, slot_ids, context_lens, scale, num_sms):
    return torch.empty_like(q)


# --- fused elementwise ops of the decoder block (pointwise.py) ---


@torch.library.custom_op("infinitevl::rms_norm", mutates_args=())
def rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """See pointwise.rms_norm (no residual)."""
    return pointwise.rms_norm(x, weight, eps)[0]


@rms_norm_op.register_fake
def _(x, weight, eps):
    return torch.empty_like(x)


@torch.library.custom_op("infinitevl::add_rms_norm", mutates_args=())
def add_rms_norm_op(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """See pointwise.rms_norm (with residual): (normalised, new residual)."""
    return pointwise.rms_norm(x, weight, eps, residual)


@add_rms_norm_op.register_fake
def _(x, residual, weight, eps):
    return torch.empty_like(x), torch.empty_like(x)


@torch.library.custom_op("infinitevl::gated_rms_norm", mutates_args=())
def gated_rms_norm_op(o: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """See pointwise.gated_rms_norm."""
    return pointwise.gated_rms_norm(o, z, weight, eps)


@gated_rms_norm_op.register_fake
def _(o, z, weight, eps):
    return o.new_empty((o.shape[0], o.shape[1] * o.shape[2]))


@torch.library.custom_op("infinitevl::silu_mul", mutates_args=())
def silu_mul_op(gate_up: torch.Tensor) -> torch.Tensor:
    """See pointwise.silu_mul."""
    return pointwise.silu_mul(gate_up)


@silu_mul_op.register_fake
def _(gate_up):
    return gate_up.new_empty((gate_up.shape[0], gate_up.shape[1] // 2))


@torch.library.custom_op("infinitevl::gdn_gates", mutates_args=())
def gdn_gates_op(
    a: torch.Tensor, b: torch.Tensor, neg_exp_a: torch.Tensor, dt_bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """See pointwise.gdn_gates."""
    return pointwise.gdn_gates(a, b, neg_exp_a, dt_bias)


@gdn_gates_op.register_fake
def _(a, b, neg_exp_a, dt_bias):
    return a.new_empty(a.shape, dtype=torch.float32), b.new_empty(b.shape)


@torch.library.custom_op("infinitevl::rope_", mutates_args=("x",))
def rope_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """See pointwise.rope_ (in place)."""
    pointwise.rope_(x, cos, sin)


@rope_op.register_fake
def _(x, cos, sin):
    return None


@torch.library.custom_op("infinitevl::rope_fp32_", mutates_args=("x",))
def rope_fp32_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """See pointwise.rope_fp32_ (in place)."""
    pointwise.rope_fp32_(x, cos, sin)


@rope_fp32_op.register_fake
def _(x, cos, sin):
    return None


class TritonPointwise:
    """The `PointwiseOps` of the Triton backend (see model.backends.base)."""

    def __init__(self) -> None:
        self._inv_freq: dict[tuple, torch.Tensor] = {}  # rotary frequencies by (device, head_dim, theta)

    def rms_norm(
        self,
        x: torch.Tensor | SplitKPartials,
        weight: torch.Tensor,
        eps: float,
        residual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return _rms_norm(x, weight, eps, residual)

    def gated_rms_norm(
        self, o: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> torch.Tensor:
        return _gated_rms_norm(o, z, weight, eps)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return _silu_mul(gate_up)

    def gdn_gates(
        self, a: torch.Tensor, b: torch.Tensor, neg_exp_a: torch.Tensor, dt_bias: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return _gdn_gates(a, b, neg_exp_a, dt_bias)

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        _rope(x, cos, sin)
        return x

    def vision_rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        _rope_fp32(x, cos, sin)
        return x

    def mrope_cos_sin(
        self,
        positions: torch.Tensor,
        head_dim: int,
        theta: float,
        mrope_section: tuple[int, ...],
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One launch for the plain code's dozen kernels; the plain code itself while torch.compile
        traces (it fuses them) and, before the frequencies are cached, inside a CUDA-graph capture
        (a tensor made there would live in the graph's pool)."""
        inv_freq = self._kernel_inv_freq(positions, head_dim, theta)
        if inv_freq is None:
            return mrope_cos_sin(positions, head_dim, theta, mrope_section, dtype)
        return pointwise.mrope_cos_sin(positions, inv_freq, tuple(mrope_section), dtype)

    def embed_mrope_cos_sin(
        self,
        input_ids: torch.Tensor,
        table: torch.Tensor,
        positions: torch.Tensor,
        head_dim: int,
        theta: float,
        mrope_section: tuple[int, ...],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The embedding gather and the cos/sin tables (in the table's dtype) in one launch; where
        `mrope_cos_sin` takes the plain code, the embedding op and that."""
        inv_freq = self._kernel_inv_freq(positions, head_dim, theta)
        if inv_freq is None or table.stride(1) != 1:
            cos, sin = self.mrope_cos_sin(positions, head_dim, theta, mrope_section, table.dtype)
            return torch.nn.functional.embedding(input_ids, table), cos, sin
        cos, sin, h = pointwise.mrope_cos_sin(
            positions, inv_freq, tuple(mrope_section), table.dtype, (input_ids, table)
        )
        return h, cos, sin

    def _kernel_inv_freq(self, positions: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor | None:
        """The cached rotary frequencies for the table kernel, or None where the plain code runs
        instead (see mrope_cos_sin)."""
        if torch.compiler.is_compiling() or positions.stride(1) != 1:
            return None
        key = (positions.device, head_dim, float(theta))
        inv_freq = self._inv_freq.get(key)
        if inv_freq is None:
            if pdl.capturing():
                return None
            inv_freq = self._inv_freq[key] = rope_inv_freq(head_dim, theta, positions.device)
        return inv_freq


def _rms_norm_ops(
    x: torch.Tensor | SplitKPartials, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """pointwise.rms_norm through the custom ops (which may not return an alias of an input, nor take
    split partials: the backend defers no reduction while compiling, but a caller's partials are
    summed here rather than refused)."""
    if isinstance(x, SplitKPartials):
        x = x.total()
    if residual is None:
        return rms_norm_op(x, weight, eps), x
    return add_rms_norm_op(x, residual, weight, eps)


conv_decode_call = eager_or_op(conv_decode_op, lambda x, w, *rest: conv_decode(x, w.contiguous(), *rest))
gdn_decode_call = eager_or_op(gdn_decode_op, gdn_decode)
swa_decode_call = eager_or_op(swa_decode_op, swa_decode)
_rms_norm = eager_or_op(_rms_norm_ops, pointwise.rms_norm)
_gated_rms_norm = eager_or_op(gated_rms_norm_op, pointwise.gated_rms_norm)
_silu_mul = eager_or_op(silu_mul_op, pointwise.silu_mul)
_gdn_gates = eager_or_op(gdn_gates_op, pointwise.gdn_gates)
_rope = eager_or_op(rope_op, pointwise.rope_)
_rope_fp32 = eager_or_op(rope_fp32_op, pointwise.rope_fp32_)
