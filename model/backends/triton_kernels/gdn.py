"""Gated delta rule, one decode token per row, updating pool-resident states in place (and the whole
decode mixer after the input projection in one kernel: `gdn_decode_fused`).

State layout (per layer): [num_slots + 1, H, d_k, d_v], key-major, fp32 (or bf16); each program owns
one (row, head, d_v block) tile of its slot's state: it reads it once, writes it once, and nothing
else of the state is touched, so no whole-state copy happens per step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gdn_decode_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, state_ptr, out_ptr, slot_ptr, ctx_ptr,
    H, stride_q, stride_qh, stride_k, stride_kh, stride_v, stride_vh, stride_g, stride_beta,
    stride_s_slot, stride_s_h, stride_o, stride_oh, scale,
    DK: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr,
):  # fmt: skip
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
    q = q / tl.sqrt(tl.sum(q * q) + 1e-6) * scale
    k = k / tl.sqrt(tl.sum(k * k) + 1e-6)

    s = s * tl.exp(g)
    u = beta * (v - tl.sum(s * k[:, None], axis=0))  # [BV]
    s = s + k[:, None] * u[None, :]
    o = tl.sum(s * q[:, None], axis=0)
    tl.store(out_ptr + b * stride_o + h * stride_oh + offs_v, o.to(out_ptr.dtype.element_ty), mask=mv)
    tl.store(s_ptrs, s.to(state_ptr.dtype.element_ty), mask=mv[None, :])


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
) -> torch.Tensor:
    """q, k [B, H, d_k], v [B, H, d_v], g/beta [B, H]; state [S+1, H, d_k, d_v] updated in place."""
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
    bv = 32 if num_rows * num_heads < 512 else 64  # small batches: more programs to fill the SMs
    bv = min(bv, triton.next_power_of_2(dv))
    grid = (num_rows * num_heads, triton.cdiv(dv, bv))
    _gdn_decode_kernel[grid](
        q, k, v, g, beta, state, out, slot_ids, context_lens,
        num_heads, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        g.stride(0), beta.stride(0), state.stride(0), state.stride(1), out.stride(0), out.stride(1), scale,
        DK=dk, DV=dv, BV=bv, num_warps=4,
    )  # fmt: skip
    return out


# --- the whole decode mixer after the input projection, one program per (row, head) ---


@triton.jit
def _conv_channels(row_ptr, w_ptr, cs_ptr, ch, stride_cs_c, has_ctx, K: tl.constexpr):
    """silu(causal conv) of channels `ch` for one token (rounded to the model dtype, returned in fp32);
    shifts those channels' conv state in place (the caller owns them: no other program touches them)."""
    cols = tl.arange(0, K)
    base = cs_ptr + ch[:, None] * stride_cs_c
    is_new = cols == K - 1  # new column k is old column k + 1; the last one is the current input
    sv = tl.load(base + (cols + 1)[None, :], mask=(~is_new & has_ctx)[None, :], other=0.0)
    xv = tl.load(row_ptr + ch)
    new = tl.where(is_new[None, :], xv[:, None].to(tl.float32), sv.to(tl.float32))
    w = tl.load(w_ptr + ch[:, None] * K + cols[None, :]).to(tl.float32)
    acc = tl.sum(new * w, axis=1)
    y = acc * tl.sigmoid(acc)
    tl.debug_barrier()  # every old column read before the shifted state is written
    tl.store(base + cols[None, :], new.to(cs_ptr.dtype.element_ty))
    return y.to(row_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _gdn_decode_fused_kernel(
    p_ptr, cw_ptr, cs_ptr, state_ptr, nea_ptr, dtb_ptr, nw_ptr, y_ptr, slot_ptr, ctx_ptr,
    H, KEY_DIM, C, stride_p, stride_cs_slot, stride_cs_c, stride_s_slot, stride_s_h, stride_y, scale, eps,
    DK: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr, K: tl.constexpr,
):  # fmt: skip
    # one program per (row, head): it owns the head's conv channels and state, so nothing races
    pid = tl.program_id(0)
    b = (pid // H).to(tl.int64)
    h = (pid % H).to(tl.int64)
    slot = tl.load(slot_ptr + b).to(tl.int64)
    has_ctx = tl.load(ctx_ptr + b) > 0
    row = p_ptr + b * stride_p  # q|k|v conv stream, a, b, z columns of this token
    cs = cs_ptr + slot * stride_cs_slot
    y_row = y_ptr + b * stride_y + h * DV
    offs_k = tl.arange(0, DK)
    dt = p_ptr.dtype.element_ty
    q = _conv_channels(row, cw_ptr, cs, h * DK + offs_k, stride_cs_c, has_ctx, K)
    k = _conv_channels(row, cw_ptr, cs, KEY_DIM + h * DK + offs_k, stride_cs_c, has_ctx, K)
    q = q / tl.sqrt(tl.sum(q * q) + 1e-6) * scale
    k = k / tl.sqrt(tl.sum(k * k) + 1e-6)
    # gates as pointwise.gdn_gates: g fp32, beta rounded to the model dtype
    x = tl.load(row + C + h).to(tl.float32) + tl.load(dtb_ptr + h)
    softplus = tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))
    decay = tl.exp(softplus * tl.load(nea_ptr + h))
    bb = tl.load(row + C + H + h).to(tl.float32)
    beta = (1.0 / (1.0 + tl.exp(-bb))).to(dt).to(tl.float32)
    # delta rule as _gdn_decode_kernel, one [DK, BV] block of the head's state at a time; the output
    # (rounded to the model dtype, as the unfused path stores it) goes to y, its sum of squares kept
    sum_sq = 0.0
    for j in tl.static_range(DV // BV):
        offs_v = j * BV + tl.arange(0, BV)
        v = _conv_channels(row, cw_ptr, cs, 2 * KEY_DIM + h * DV + offs_v, stride_cs_c, has_ctx, K)
        s_ptrs = state_ptr + slot * stride_s_slot + h * stride_s_h + offs_k[:, None] * DV + offs_v[None, :]
        s = tl.load(s_ptrs, mask=(offs_k[:, None] >= 0) & has_ctx, other=0.0).to(tl.float32)
        s = s * decay
        u = beta * (v - tl.sum(s * k[:, None], axis=0))
        s = s + k[:, None] * u[None, :]
        o = tl.sum(s * q[:, None], axis=0).to(dt)
        tl.store(s_ptrs, s.to(state_ptr.dtype.element_ty))
        tl.store(y_row + offs_v, o)
        of = o.to(tl.float32)
        sum_sq += tl.sum(of * of)
    # gated output norm as pointwise.gated_rms_norm, over the head's whole output
    inv = 1.0 / tl.sqrt(sum_sq / DV + eps)
    tl.debug_barrier()  # every output block stored before any is read back
    for j in tl.static_range(DV // BV):
        offs_v = j * BV + tl.arange(0, BV)
        o = tl.load(y_row + offs_v).to(tl.float32)
        z = tl.load(row + C + 2 * H + h * DV + offs_v).to(tl.float32)
        y = o * inv * tl.load(nw_ptr + offs_v) * (z / (1.0 + tl.exp(-z)))
        tl.store(y_row + offs_v, y.to(y_ptr.dtype.element_ty))


def gdn_decode_fused(
    proj: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_state: torch.Tensor,
    state: torch.Tensor,
    neg_exp_a: torch.Tensor,
    dt_bias: torch.Tensor,
    norm_weight: torch.Tensor,
    slot_ids: torch.Tensor,
    context_lens: torch.Tensor,
    head_k_dim: int,
    head_v_dim: int,
    eps: float,
) -> torch.Tensor:
    """Short conv, gates, delta rule and gated output norm of one decode token per row.

    proj [B, C + 2 H + H d_v]: the fused input projection (q|k|v conv stream, a, b, z columns), unit
    column stride; conv_weight [C, K] contiguous; conv_state [S+1, C, K] and state [S+1, H, d_k, d_v]
    updated in place at rows slot_ids; neg_exp_a, dt_bias [H] and norm_weight [d_v] fp32.
    Returns [B, H * d_v] in proj's dtype: the input of the output projection.
    """
    num_rows = proj.shape[0]
    num_heads = neg_exp_a.shape[0]
    num_ch, k = conv_weight.shape
    key_dim = num_heads * head_k_dim
    if num_ch != 2 * key_dim + num_heads * head_v_dim:
        raise ValueError(f"conv width {num_ch} does not match {num_heads} heads of {head_k_dim}/{head_v_dim}")
    if any(d & (d - 1) for d in (head_k_dim, head_v_dim, k)):
        raise ValueError("head dims and the conv size must be powers of two for the fused decode kernel")
    if proj.stride(1) != 1 or not conv_weight.is_contiguous() or conv_state.stride(2) != 1:
        raise ValueError("gdn_decode_fused expects unit column strides and a contiguous conv weight")
    if state.stride(3) != 1 or state.stride(2) != head_v_dim:
        raise ValueError("gdn_decode_fused expects a contiguous [d_k, d_v] state per head")
    y = torch.empty((num_rows, num_heads * head_v_dim), dtype=proj.dtype, device=proj.device)
    bv = min(head_v_dim, 64)
    if num_rows:
        _gdn_decode_fused_kernel[(num_rows * num_heads,)](
            proj, conv_weight, conv_state, state, neg_exp_a, dt_bias, norm_weight, y, slot_ids, context_lens,
            num_heads, key_dim, num_ch, proj.stride(0), conv_state.stride(0), conv_state.stride(1),
            state.stride(0), state.stride(1), y.stride(0), head_k_dim**-0.5, eps,
            DK=head_k_dim, DV=head_v_dim, BV=bv, K=k, num_warps=4,
        )  # fmt: skip
    return y
