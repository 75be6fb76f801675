"""Depthwise causal short convolution (+SiLU) over pool-resident conv states.

Conv state layout (per layer): [num_slots + 1, C, K] in the model dtype; column K-1 holds the newest
pre-convolution input, column K-1-m the input m tokens earlier. Tokens before a fresh sequence
(context_len == 0) are zero whatever the slot holds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from model.backends.triton_kernels import pdl


@triton.jit
def _l2norm_heads(y, R: tl.constexpr, BC: tl.constexpr, HD: tl.constexpr):
    """y [R, BC] fp32: every run of HD channels divided by sqrt(its sum of squares + 1e-6)."""
    y3 = tl.reshape(y, [R, BC // HD, HD])
    inv = 1.0 / tl.sqrt(tl.sum(y3 * y3, axis=2) + 1e-6)
    return tl.reshape(y3 * inv[:, :, None], [R, BC])


@triton.jit
def _conv_prefill_out_kernel(
    x_ptr, w_ptr, state_ptr, out_ptr, tok_seq_ptr, cu_ptr, slot_ptr, ctx_ptr,
    N, C, S1, S2, NORM_CH, stride_x, stride_s_slot, stride_s_c,
    K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, PARTS_ALIGNED: tl.constexpr, NORM_HD: tl.constexpr,
):  # fmt: skip
    # output: channels [0, S1), [S1, S1 + S2), [S1 + S2, C) go to three row-major [N, width] parts
    # stored back to back (S2 = 0 and S1 = C: one [N, C] tensor). PARTS_ALIGNED: BC divides S1 and
    # S2, so a program's channels lie in one part. NORM_HD > 0: channels [0, NORM_CH) are L2-normalised
    # per head of NORM_HD channels (BC divides NORM_CH and NORM_HD divides BC).
    t_first = tl.program_id(0) * BT
    c_first = tl.program_id(1) * BC
    offs_bt = tl.arange(0, BT)
    offs_t = t_first + offs_bt
    offs_c = c_first + tl.arange(0, BC)
    mt = offs_t < N
    mc = offs_c < C
    t_last = tl.minimum(t_first + BT, N) - 1
    seq_first = tl.load(tok_seq_ptr + t_first)
    interior = (seq_first == tl.load(tok_seq_ptr + t_last)) & (
        t_first - (K - 1) >= tl.load(cu_ptr + seq_first).to(tl.int32)
    )
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    if interior:  # every tap of every token reads the chunk's own inputs: no state, no sequence masks
        m_tc = mt[:, None] & mc[None, :]
        for j in tl.static_range(K):
            row0 = (t_first - (K - 1) + j).to(tl.int64) * stride_x
            xv = tl.load(x_ptr + row0 + offs_bt[:, None] * stride_x + offs_c[None, :], mask=m_tc, other=0.0)
            wj = tl.load(w_ptr + offs_c * K + j, mask=mc, other=0.0).to(tl.float32)
            acc += xv.to(tl.float32) * wj[None, :]
    else:  # a sequence starts in the block, or its first K-1 taps reach into the slot's conv state
        seq = tl.load(tok_seq_ptr + offs_t, mask=mt, other=0)
        start = tl.load(cu_ptr + seq).to(tl.int64)
        slot = tl.load(slot_ptr + seq).to(tl.int64)
        has_ctx = tl.load(ctx_ptr + seq) > 0
        for j in tl.static_range(K):
            src = offs_t.to(tl.int64) - (K - 1) + j  # packed index of the tap's input
            in_seq = src >= start
            m_x = (mt & in_seq)[:, None] & mc[None, :]
            xv = tl.load(x_ptr + src[:, None] * stride_x + offs_c[None, :], mask=m_x, other=0.0)
            col = K + (src - start)  # state column of a pre-sequence input (1 .. K-1)
            m_s = (mt & ~in_seq & has_ctx)[:, None] & mc[None, :]
            s_ptrs = state_ptr + slot[:, None] * stride_s_slot + offs_c[None, :] * stride_s_c + col[:, None]
            sv = tl.load(s_ptrs, mask=m_s, other=0.0)
            wj = tl.load(w_ptr + offs_c * K + j, mask=mc, other=0.0).to(tl.float32)
            acc += (xv.to(tl.float32) + sv.to(tl.float32)) * wj[None, :]
    y = acc * tl.sigmoid(acc)
    if NORM_HD > 0:  # noqa: SIM102 (compile-time branch first: nothing is emitted without the norm)
        if c_first < NORM_CH:
            y = _l2norm_heads(y, BT, BC, NORM_HD)
    if PARTS_ALIGNED:
        in_p0 = c_first < S1
        in_p1 = (c_first >= S1) & (c_first < S1 + S2)
        base = tl.where(in_p0, 0, tl.where(in_p1, N * S1, N * (S1 + S2))).to(tl.int64)
        c0 = tl.where(in_p0, 0, tl.where(in_p1, S1, S1 + S2))
        width = tl.where(in_p0, S1, tl.where(in_p1, S2, C - S1 - S2))
        o_ptrs = (
            out_ptr + base + t_first.to(tl.int64) * width + offs_bt[:, None] * width + (offs_c - c0)[None, :]
        )
    else:
        in_p0 = offs_c < S1
        in_p1 = (offs_c >= S1) & (offs_c < S1 + S2)
        part_base = tl.where(in_p0, 0, tl.where(in_p1, N * S1, N * (S1 + S2))).to(tl.int64)
        part_col = tl.where(in_p0, offs_c, tl.where(in_p1, offs_c - S1, offs_c - S1 - S2))
        part_width = tl.where(in_p0, S1, tl.where(in_p1, S2, C - S1 - S2)).to(tl.int64)
        o_ptrs = (
            out_ptr
            + part_base[None, :]
            + offs_t[:, None].to(tl.int64) * part_width[None, :]
            + part_col[None, :]
        )
    tl.store(o_ptrs, y.to(out_ptr.dtype.element_ty), mask=mt[:, None] & mc[None, :])


@triton.jit
def _conv_prefill_state_kernel(
    x_ptr, state_ptr, cu_ptr, slot_ptr, ctx_ptr,
    C, stride_x, stride_s_slot, stride_s_c,
    K: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    offs_c = tl.program_id(1) * BC + tl.arange(0, BC)
    mc = offs_c < C
    start = tl.load(cu_ptr + b).to(tl.int64)
    end = tl.load(cu_ptr + b + 1).to(tl.int64)
    slot = tl.load(slot_ptr + b).to(tl.int64)
    has_ctx = tl.load(ctx_ptr + b) > 0
    cols = tl.arange(0, K)
    pos = end - K + cols  # packed index that lands in each new column
    in_seq = pos >= start
    xv = tl.load(
        x_ptr + pos[None, :] * stride_x + offs_c[:, None], mask=mc[:, None] & in_seq[None, :], other=0.0
    )
    base = state_ptr + slot * stride_s_slot + offs_c[:, None] * stride_s_c
    old_col = K + (pos - start)
    m_s = mc[:, None] & (~in_seq & has_ctx)[None, :]
    sv = tl.load(base + old_col[None, :], mask=m_s, other=0.0)
    new = xv.to(tl.float32) + sv.to(tl.float32)  # exactly one of the two is non-masked
    tl.debug_barrier()  # every old column is read before any is overwritten
    tl.store(base + cols[None, :], new.to(state_ptr.dtype.element_ty), mask=mc[:, None])


@triton.jit
def conv_token(row_ptr, w_ptr, conv_row_ptr, ch, mask, has_ctx, stride_c, KC: tl.constexpr):
    """silu(causal depthwise conv) of one token for channels `ch` (fp32, not rounded), the shifted
    conv state [len(ch), KC] (fp32) and its pointers (the decode step of the conv kernels)."""
    cols = tl.arange(0, KC)
    is_new = cols == KC - 1
    ptrs = conv_row_ptr + ch[:, None] * stride_c + cols[None, :]
    # new column c is old column c + 1; the last column is the token's own input
    old = tl.load(ptrs + 1, mask=mask[:, None] & (~is_new & has_ctx)[None, :], other=0.0)
    x = tl.load(row_ptr + ch, mask=mask, other=0.0)
    new = tl.where(is_new[None, :], x[:, None].to(tl.float32), old.to(tl.float32))
    w = tl.load(w_ptr + ch[:, None] * KC + cols[None, :], mask=mask[:, None], other=0.0).to(tl.float32)
    acc = tl.sum(new * w, axis=1)
    return acc * tl.sigmoid(acc), new, ptrs


@triton.jit
def _conv_decode_kernel(
    x_ptr, w_ptr, state_ptr, out_ptr, slot_ptr, ctx_ptr,
    C, NORM_CH, stride_x, stride_o, stride_s_slot, stride_s_c,
    K: tl.constexpr, BC: tl.constexpr, NORM_HD: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    pdl.prologue(USE_PDL)
    b = tl.program_id(0)
    offs_c = tl.program_id(1) * BC + tl.arange(0, BC)
    mc = offs_c < C
    slot = tl.load(slot_ptr + b).to(tl.int64)
    has_ctx = tl.load(ctx_ptr + b) > 0
    x_row = x_ptr + b.to(tl.int64) * stride_x
    y, new, s_ptrs = conv_token(
        x_row, w_ptr, state_ptr + slot * stride_s_slot, offs_c, mc, has_ctx, stride_s_c, K
    )
    if NORM_HD > 0:  # noqa: SIM102 (as in the prefill kernel)
        if tl.program_id(1) * BC < NORM_CH:
            y = tl.reshape(_l2norm_heads(tl.reshape(y, [1, BC]), 1, BC, NORM_HD), [BC])
    tl.store(out_ptr + b.to(tl.int64) * stride_o + offs_c, y.to(out_ptr.dtype.element_ty), mask=mc)
    tl.debug_barrier()  # all old columns read before the shifted state is written
    tl.store(s_ptrs, new.to(state_ptr.dtype.element_ty), mask=mc[:, None])


def _check(x: torch.Tensor, weight: torch.Tensor, conv_state: torch.Tensor) -> int:
    num_ch, k = weight.shape
    if k & (k - 1):
        raise ValueError(f"conv kernel size {k} must be a power of two for the Triton path")
    if x.stride(1) != 1 or conv_state.stride(2) != 1 or not weight.is_contiguous():
        raise ValueError("short_conv expects unit stride on the channel/column axes")
    if conv_state.shape[1:] != (num_ch, k):
        raise ValueError(f"conv_state {tuple(conv_state.shape)} does not match weight {tuple(weight.shape)}")
    return k


def _norm_block(block: int, norm_channels: int, head_dim: int | None) -> int:
    """The channel block for an L2 norm over heads of head_dim channels in [0, norm_channels): the
    largest power of two <= block that head_dim divides and that divides norm_channels."""
    if head_dim is None:
        return block
    if head_dim & (head_dim - 1) or norm_channels % head_dim:
        raise ValueError(f"l2norm head dim {head_dim} must be a power of two dividing {norm_channels}")
    while block > head_dim and norm_channels % block:
        block //= 2
    return max(block, head_dim)


def l2norm_args(split_sizes: list[int] | None, l2norm_head_dim: int | None) -> tuple[int, int]:
    """(channels to normalise, head dim), (0, 0) without the norm."""
    if l2norm_head_dim is None:
        return 0, 0
    if split_sizes is None:
        raise ValueError("l2norm_head_dim needs split_sizes (it normalises parts 0 and 1)")
    return split_sizes[0] + split_sizes[1], l2norm_head_dim


def conv_decode(
    x: torch.Tensor,
    weight: torch.Tensor,
    conv_state: torch.Tensor,
    slot_ids: torch.Tensor,
    context_lens: torch.Tensor,
    norm_channels: int = 0,
    norm_head_dim: int = 0,
) -> torch.Tensor:
    """One token per row: shift the slot's conv state in place and return silu(conv) [B, C]; with
    norm_head_dim > 0, channels [0, norm_channels) come out L2-normalised per head."""
    k = _check(x, weight, conv_state)
    num_rows, num_ch = x.shape
    out = torch.empty_like(x)
    bc = _norm_block(256, norm_channels, norm_head_dim or None)
    grid = (num_rows, triton.cdiv(num_ch, bc))
    _conv_decode_kernel[grid](
        x, weight, conv_state, out, slot_ids, context_lens,
        num_ch, norm_channels, x.stride(0), out.stride(0), conv_state.stride(0), conv_state.stride(1),
        K=k, BC=bc, NORM_HD=norm_head_dim,
        **pdl.launch_kwargs(),
    )  # fmt: skip
    return out


def conv_prefill(
    x: torch.Tensor,
    weight: torch.Tensor,
    conv_state: torch.Tensor,
    tok_seq: torch.Tensor,
    cu_seqlens: torch.Tensor,
    slot_ids: torch.Tensor,
    context_lens: torch.Tensor,
    block_t: int = 32,
    block_c: int = 128,
    split_sizes: list[int] | None = None,
    l2norm_head_dim: int | None = None,
    num_warps: int = 4,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Packed varlen prefill: returns silu(conv(x)) [N, C] and writes each slot's last K inputs.

    tok_seq: [N] int32, the sequence of each packed token. block_t x block_c: tokens x channels per
    program and num_warps are launch parameters only. With split_sizes (three widths summing to C) the output comes
    as three contiguous [N, width] tensors instead (what the chunked delta-rule kernel reads); with
    l2norm_head_dim as well, the first two parts come out L2-normalised per head of that many
    channels (fp32, rounded once).
    """
    k = _check(x, weight, conv_state)
    num_tok, num_ch = x.shape
    s1, s2 = (num_ch, 0) if split_sizes is None else (split_sizes[0], split_sizes[1])
    if split_sizes is not None and (len(split_sizes) != 3 or sum(split_sizes) != num_ch):
        raise ValueError(f"split_sizes {split_sizes} must be three widths summing to {num_ch}")
    norm_ch, norm_hd = l2norm_args(split_sizes, l2norm_head_dim)
    flat = torch.empty(num_tok * num_ch, dtype=x.dtype, device=x.device)
    bt, bc = block_t, _norm_block(block_c, norm_ch, l2norm_head_dim)
    grid = (triton.cdiv(num_tok, bt), triton.cdiv(num_ch, bc))
    _conv_prefill_out_kernel[grid](
        x, weight, conv_state, flat, tok_seq, cu_seqlens, slot_ids, context_lens,
        num_tok, num_ch, s1, s2, norm_ch, x.stride(0), conv_state.stride(0), conv_state.stride(1),
        K=k, BT=bt, BC=bc, PARTS_ALIGNED=(s1 % bc == 0 and s2 % bc == 0), NORM_HD=norm_hd,
        num_warps=num_warps,
    )  # fmt: skip
    bcs = 256
    grid_s = (slot_ids.shape[0], triton.cdiv(num_ch, bcs))
    _conv_prefill_state_kernel[grid_s](
        x, conv_state, cu_seqlens, slot_ids, context_lens,
        num_ch, x.stride(0), conv_state.stride(0), conv_state.stride(1),
        K=k, BC=bcs,
    )  # fmt: skip
    if split_sizes is None:
        return flat.view(num_tok, num_ch)
    return tuple(
        part.view(num_tok, w)
        for part, w in zip(flat.split([num_tok * w for w in split_sizes]), split_sizes, strict=True)
    )
