"""The kernel seam: the three stateful operations of the text decoder.

The model code calls only these; the torch backend (exact spec math, CPU and GPU) is the oracle and
a GPU backend replaces it without touching the model. Every method works on a packed batch described
by `BatchMeta` and reads/writes pool rows `meta.slot_ids` of the per-layer state views it is given
(in place). A sequence whose `context_lens` is 0 starts from zero state whatever the row holds.
"""

from __future__ import annotations

from typing import Protocol

import torch

from model.batch import BatchMeta


class Backend(Protocol):
    name: str

    def short_conv(
        self,
        x: torch.Tensor,  # [N, C] model dtype, pre-convolution projected stream (q|k|v concatenated)
        weight: torch.Tensor,  # [C, K] depthwise causal kernel; column K-1 multiplies the current token
        meta: BatchMeta,
        conv_state: torch.Tensor,  # [num_slots + 1, C, K] this layer's view, updated in place
    ) -> torch.Tensor:  # [N, C] model dtype, silu(conv(x)), fp32 accumulation
        ...

    def gated_delta_rule(
        self,
        q: torch.Tensor,  # [N, H, d_k] model dtype, before L2 normalisation
        k: torch.Tensor,  # [N, H, d_k]
        v: torch.Tensor,  # [N, H, d_v]
        g: torch.Tensor,  # [N, H] fp32 log-decay (<= 0)
        beta: torch.Tensor,  # [N, H] write strength in (0, 1)
        meta: BatchMeta,
        state: torch.Tensor,  # [num_slots + 1, H, d_k, d_v] this layer's view, updated in place
    ) -> torch.Tensor:  # [N, H, d_v] model dtype; q/k L2-normalised (eps 1e-6), scale d_k**-0.5
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
    ) -> torch.Tensor:  # [N, Hq, D]; query at absolute index i sees keys max(0, i-W+1) .. i
        ...
