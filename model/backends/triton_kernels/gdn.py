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
from model.backends.triton_kernels.conv import conv_token
from model.backends.triton_kernels.pointwise import gate_math, gated_norm_math


@triton.jit
def _delta_rule(s, q, k, v, g, beta):
    """One token of the gated delta rule on a state tile s [DK, BV] (fp32): decay, the delta write
    with the L2-normalised key k [DK] and value block v [BV], the read with the scaled query q [DK].
    Returns (new tile, output block [BV])."""
    s = s * tl.exp(g)
    u = beta * (v - tl.sum(s * k[:, None], axis=0))  # [BV]
    s = s + k[:, None] * u[None, :]
    return s, tl.sum(s * q[:, None], axis=0)


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

    s, o = _delta_rule(s, q, k, v, g, beta)
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


def fused_decode_launch(rows_heads: int) -> dict | None:
    """The one-launch recurrence's d_v block and warps by (row, head) count, or None where the three
    separate launches were faster. Whole-step A/B (ab_tables.py, docs/benchmarks.md): at batch 1
    (16 row-heads) 64-wide blocks with 4 warps beat the delta-rule kernel's 16 / 1 warp (every
    program convolves its head's q and k, so fewer, wider programs pay that less often) and at batch
    8 as well (H200); at batch 64 the separate launches were 0.3% faster (H100)."""
    if rows_heads < 512:
        return {"bv": 64, "num_warps": 4}
    return None


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


# --- the whole recurrence of one decode token per row in one launch (conv, gates, delta rule, norm) ---


@triton.jit
def _gdn_recur_decode_kernel(
    proj_ptr, convw_ptr, conv_ptr, state_ptr, out_ptr, slot_ptr, ctx_ptr, nea_ptr, dtb_ptr, normw_ptr,
    count_ptr,
    H, stride_p, stride_c_slot, stride_c_c, stride_s_slot, stride_s_h, stride_o, scale, eps,
    DK: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr, NB: tl.constexpr, KC: tl.constexpr,
    BLOCK_DV: tl.constexpr, NORM: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    # program (row b, head h, d_v block j) of NB = cdiv(DV, BV). The projected row is q|k|v (the conv
    # stream, 2 H DK + H DV channels) | a (H) | b (H) | z (H DV). Each program convolves the head's q
    # and k (every program of the head alike) and its own v block, writes its own v conv-state block
    # and its state tile. The head's last program to finish (a per-(row, head) arrival counter) writes
    # the q and k conv state, which all NB programs read, and with NORM applies the gated output norm
    # to the whole head's output, which the other programs have stored by then.
    pdl.prologue(USE_PDL)
    pid = tl.program_id(0)
    b = (pid // H).to(tl.int64)
    h = (pid % H).to(tl.int64)
    key_dim = H * DK
    conv_dim = 2 * key_dim + H * DV
    offs_k = tl.arange(0, DK)
    offs_v = tl.program_id(1) * BV + tl.arange(0, BV)
    mv = offs_v < DV
    mk = offs_k < DK
    slot = tl.load(slot_ptr + b).to(tl.int64)
    has_ctx = tl.load(ctx_ptr + b) > 0
    row = proj_ptr + b * stride_p
    conv_row = conv_ptr + slot * stride_c_slot
    q, q_new, q_ptrs = conv_token(row, convw_ptr, conv_row, h * DK + offs_k, mk, has_ctx, stride_c_c, KC)
    k, k_new, k_ptrs = conv_token(
        row, convw_ptr, conv_row, key_dim + h * DK + offs_k, mk, has_ctx, stride_c_c, KC
    )
    v, v_new, v_ptrs = conv_token(
        row, convw_ptr, conv_row, 2 * key_dim + h * DV + offs_v, mv, has_ctx, stride_c_c, KC
    )
    dt = out_ptr.dtype.element_ty  # the conv outputs are rounded as the conv kernel stores them
    q = q.to(dt).to(tl.float32)
    k = k.to(dt).to(tl.float32)
    v = v.to(dt).to(tl.float32)

    s_ptrs = state_ptr + slot * stride_s_slot + h * stride_s_h + offs_k[:, None] * DV + offs_v[None, :]
    s = tl.load(s_ptrs, mask=mv[None, :] & has_ctx, other=0.0).to(tl.float32)  # [DK, BV]
    a = tl.load(row + conv_dim + h).to(tl.float32)
    beta = tl.load(row + conv_dim + H + h).to(tl.float32)
    g, beta = gate_math(a, beta, tl.load(dtb_ptr + h), tl.load(nea_ptr + h))
    beta = beta.to(proj_ptr.dtype.element_ty).to(tl.float32)  # rounded, as the gates kernel stores it
    q = q / tl.sqrt(tl.sum(q * q) + 1e-6) * scale
    k = k / tl.sqrt(tl.sum(k * k) + 1e-6)

    s, o = _delta_rule(s, q, k, v, g, beta)
    o_row = out_ptr + b * stride_o + h * DV
    tl.store(o_row + offs_v, o.to(dt), mask=mv)
    tl.store(s_ptrs, s.to(state_ptr.dtype.element_ty), mask=mv[None, :])
    tl.debug_barrier()  # every conv-state read and output store of this program comes first
    tl.store(v_ptrs, v_new.to(conv_ptr.dtype.element_ty), mask=mv[:, None])
    last = True
    if NB > 1:
        count = count_ptr + b * H + h
        last = tl.atomic_add(count, 1, sem="acq_rel") == NB - 1
    if last:
        if NB > 1:
            tl.store(count, 0)  # ready for the next launch, which starts after this one has finished
        tl.store(q_ptrs, q_new.to(conv_ptr.dtype.element_ty), mask=mk[:, None])
        tl.store(k_ptrs, k_new.to(conv_ptr.dtype.element_ty), mask=mk[:, None])
        if NORM:  # the head's whole output, from L2 (".cg": not this SM's L1)
            tl.debug_barrier()
            offs_d = tl.arange(0, BLOCK_DV)
            md = offs_d < DV
            of = tl.load(o_row + offs_d, mask=md, other=0.0, cache_modifier=".cg").to(tl.float32)
            z = tl.load(row + conv_dim + 2 * H + h * DV + offs_d, mask=md, other=0.0).to(tl.float32)
            w = tl.load(normw_ptr + offs_d, mask=md, other=0.0).to(tl.float32)
            y = gated_norm_math(of, z, w, eps, DV)
            tl.debug_barrier()  # every thread has its values before any is overwritten
            tl.store(o_row + offs_d, y.to(dt), mask=md)


def gdn_recur_decode(
    proj: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_state: torch.Tensor,
    state: torch.Tensor,
    slot_ids: torch.Tensor,
    context_lens: torch.Tensor,
    neg_exp_a: torch.Tensor,
    dt_bias: torch.Tensor,
    head_dims: tuple[int, int, int],
    counters: torch.Tensor,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    launch: dict | None = None,
) -> torch.Tensor:
    """One decode token per row through the short conv (+SiLU), the gates, the L2-normalised delta
    rule and, with norm_weight, the gated output norm: one launch for what conv_decode, gdn_decode
    and the gated-norm kernel do in three, with the same roundings.

    proj [B, 2 H d_k + 2 H d_v + 2 H] (unit stride on columns): the input projection's q|k|v|a|b|z;
    conv_weight [2 H d_k + H d_v, K]; conv_state [S+1, same, K] and state [S+1, H, d_k, d_v] updated
    in place at rows slot_ids; head_dims (H, d_k, d_v); counters int32 [>= B H], all zero (they are
    zero again when the launch ends). Returns [B, H, d_v]: the delta-rule output, or with norm_weight
    (fp32 [d_v]) rmsnorm(o) * norm_weight * silu(z) per head. launch: {"bv", "num_warps"}, by default
    `fused_decode_launch` (or `decode_launch` where that says the separate launches are faster)."""
    num_heads, dk, dv = head_dims
    num_rows = proj.shape[0]
    conv_dim, kc = conv_weight.shape
    if dk & (dk - 1) or kc & (kc - 1):
        raise ValueError(f"d_k {dk} and the conv width {kc} must be powers of two for the Triton path")
    if conv_dim != num_heads * (2 * dk + dv) or proj.shape[1] != conv_dim + num_heads * (dv + 2):
        raise ValueError(
            f"proj {tuple(proj.shape)} / conv weight {tuple(conv_weight.shape)} do not match {head_dims}"
        )
    if proj.stride(1) != 1 or not conv_weight.is_contiguous() or conv_state.stride(2) != 1:
        raise ValueError("gdn_recur_decode expects unit stride on channels and a contiguous conv weight")
    if conv_state.shape[1:] != (conv_dim, kc):
        raise ValueError(f"conv_state {tuple(conv_state.shape)} does not match the conv weight")
    if state.shape[1:] != (num_heads, dk, dv) or state.stride(3) != 1 or state.stride(2) != dv:
        raise ValueError("gdn_recur_decode expects a contiguous [H, d_k, d_v] state row")
    if counters.dtype != torch.int32 or counters.numel() < num_rows * num_heads:
        raise ValueError(f"counters: int32 with at least {num_rows * num_heads} entries")
    out = torch.empty((num_rows, num_heads, dv), dtype=proj.dtype, device=proj.device)
    params = launch or fused_decode_launch(num_rows * num_heads) or decode_launch(num_rows * num_heads)
    bv = min(params["bv"], triton.next_power_of_2(dv))
    nb = triton.cdiv(dv, bv)
    if num_rows:
        _gdn_recur_decode_kernel[(num_rows * num_heads, nb)](
            proj, conv_weight, conv_state, state, out, slot_ids, context_lens, neg_exp_a, dt_bias,
            norm_weight if norm_weight is not None else neg_exp_a, counters,
            num_heads, proj.stride(0), conv_state.stride(0), conv_state.stride(1), state.stride(0),
            state.stride(1), out.stride(0), dk**-0.5, eps,
            DK=dk, DV=dv, BV=bv, NB=nb, KC=kc, BLOCK_DV=triton.next_power_of_2(dv),
            NORM=norm_weight is not None, num_warps=params["num_warps"], **pdl.launch_kwargs(),
        )  # fmt: skip
    return out
