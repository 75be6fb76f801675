"""The decode kernels registered as torch custom ops, so that torch.compile treats them as opaque
(in-place) operations and can fuse the elementwise code around them into one compiled graph."""

from __future__ import annotations

import torch

from model.backends.triton_kernels.conv import conv_decode
from model.backends.triton_kernels.gdn import gdn_decode
from model.backends.triton_kernels.swa import swa_decode


@torch.library.custom_op("infinitevl::conv_decode", mutates_args=("conv_state",))
def conv_decode_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    conv_state: torch.Tensor,
    slot_ids: torch.Tensor,
    context_lens: torch.Tensor,
) -> torch.Tensor:
    """See conv.conv_decode."""
    return conv_decode(x, weight.contiguous(), conv_state, slot_ids, context_lens)


@conv_decode_op.register_fake
def _(x, weight, conv_state, slot_ids, context_lens):
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
) -> torch.Tensor:
    """See gdn.gdn_decode."""
    return gdn_decode(q, k, v, g, beta, state, slot_ids, context_lens, scale)


@gdn_decode_op.register_fake
def _(q, k, v, g, beta, state, slot_ids, context_lens, scale):
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
