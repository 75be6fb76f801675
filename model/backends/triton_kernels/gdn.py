"""Gated delta rule, one decode token per row, updating pool-resident states in place.

State layout (per layer): [num_slots + 1, H, d_k, d_v], key-major, fp32 (or bf16); each program owns
one (row, head, d_v block) tile of its slot's state: it reads it once, writes it once, and nothing
else of the state is touched, so no whole-state copy happens per step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from model.backends.triton_kernels import pdl
from model.backends.triton_kernels.pointwise import gate_math


@triton.jit
def _gdn_decode_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, state_ptr, out_ptr, slot_ptr, ctx_ptr,
    nea_ptr, dtb_ptr,
    H, stride_q, stride_qh, stride_k, stride_kh, stride_v, stride_vh, stride_g, stride_beta,
    stride_s_slot, stride_s_h, stride_o, stride_oh, scale,
    DK: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr, QK_NORMALIZED: tl.constexpr,
    RAW_GATES: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    pdl.prologue(USE_PDL)
    pid = tl.program_id(0)
    b = (pid // H).to(tl.int64)
    h = (pid % H).to(tl.int64)
    offs_k = tl.arange(0, DK)
    offs_v = tl.program_id(1) * BV + tl.arange(0, BV)
    mv = offs_v < DV
    slot = tl.load(slot_ptr + b).to(tl.int64)
    has_ctx = tl.load(ctx_ptr + b) > 0

    s_ptrs = state_ptr + slot * stride_s_slot + h * stride_s_h + offs_k[:, None] * DV + offs_v[None, :]
    s = tl.load(s_ptrs, mask=mv[None, :] & has_ctx, other=0.0).to(tl.float32)  # [DK, BV]

    q = tl.load(q_ptr + b * stride_q + h * stride_qh + offs_k).to(tl.float32)
    k = tl.load(k_ptr + b * stride_k + h * stride_kh + offs_k).to(tl.float32)
    v = tl.load(v_ptr + b * stride_v + h * stride_vh + offs_v, mask=mv, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + b * stride_g + h).to(tl.float32)
    beta = tl.load(beta_ptr + b * stride_beta + h).to(tl.float32)
    if RAW_GATES:  # g_ptr / beta_ptr hold the a / b projections: the gates of pointwise.gdn_gates
        g, beta = gate_math(g, beta, tl.load(dtb_ptr + h), tl.load(nea_ptr + h))
        beta = beta.to(beta_ptr.dtype.element_ty).to(tl.float32)  # rounded, as the gates kernel stores it
    if QK_NORMALIZED:
        q = q * scale
    else:
        q = q / tl.sqrt(tl.sum(q * q) + 1e-6) * scale
        k = k / tl.sqrt(tl.sum(k * k) + 1e-6)

    s = s * tl.exp(g)
    u = beta * (v - tl.sum(s * k[:, None], axis=0))  # [BV]
    s = s + k[:, None] * u[None, :]
    o = tl.sum(s * q[:, None], axis=0)
    tl.store(out_ptr + b * stride_o + h * stride_oh + offs_v, o.to(out_ptr.dtype.element_ty), mask=mv)
    tl.store(s_ptrs, s.to(state_ptr.dtype.element_ty), mask=mv[None, :])


def decode_launch(rows_heads: int) -> dict:
    """d_v block and warps per (row, head) count: small batches take small tiles (more programs to
    fill the SMs), large ones large tiles (H100 sweep at d_k 128, d_v 256: sweep_gdn_decode.py)."""
    if rows_heads < 128:
        return {"bv": 16, "num_warps": 1}
    if rows_heads < 512:
        return {"bv": 32, "num_warps": 4}
    return {"bv": 64 if rows_heads < 2048 else 128, "num_warps": 4}


def gdn_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    slot_ids: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    qk_normalized: bool = False,
    neg_exp_a: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    launch: dict | None = None,
) -> torch.Tensor:
    """q, k [B, H, d_k], v [B, H, d_v], g/beta [B, H]; state [S+1, H, d_k, d_v] updated in place.
    q and k are L2-normalised here unless qk_normalized. With neg_exp_a and dt_bias ([H] fp32), g and
    beta are the raw a and b projections and the kernel computes the gates (base.gate_values).
    launch: {"bv": ..., "num_warps": ...} instead of `decode_launch` (benchmarks/sweep_gdn_decode.py)."""
    raw_gates = neg_exp_a is not None
    if raw_gates != (dt_bias is not None):
        raise ValueError("gdn_decode: give both neg_exp_a and dt_bias, or neither")
    num_rows, num_heads, dk = q.shape
    dv = v.shape[-1]
    if dk & (dk - 1):
        raise ValueError(f"d_k {dk} must be a power of two for the Triton path")
    if (
        state.stride(3) != 1
        or state.stride(2) != dv
        or q.stride(2) != 1
        or k.stride(2) != 1
        or v.stride(2) != 1
    ):
        raise ValueError("gdn_decode expects unit stride on head dims and a contiguous [d_k, d_v] state")
    if g.stride(1) != 1 or beta.stride(1) != 1:
        raise ValueError("gdn_decode expects g and beta with unit head stride")
    out = torch.empty((num_rows, num_heads, dv), dtype=v.dtype, device=v.device)
    params = launch or decode_launch(num_rows * num_heads)
    bv = min(params["bv"], triton.next_power_of_2(dv))
    grid = (num_rows * num_heads, triton.cdiv(dv, bv))
    _gdn_decode_kernel[grid](
        q, k, v, g, beta, state, out, slot_ids, context_lens,
        neg_exp_a if raw_gates else g, dt_bias if raw_gates else g,  # placeholders without raw gates
        num_heads, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        g.stride(0), beta.stride(0), state.stride(0), state.stride(1), out.stride(0), out.stride(1), scale,
        DK=dk, DV=dv, BV=bv, QK_NORMALIZED=qk_normalized, RAW_GATES=raw_gates, num_warps=params["num_warps"],
        **pdl.launch_kwargs(),
    )  # fmt: skip
    return out
