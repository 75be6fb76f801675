"""Sliding-window attention over pool-resident ring caches (GQA, window W, token p at ring row p % W).

Query at absolute index i sees keys max(0, i-W+1) .. i. Cached keys/values are post-RoPE, model dtype,
layout [num_slots + 1, W, Hkv, D]. Decode reads each slot's ring where it lies (split over the window,
flash-decoding style, then one reduction) and writes the new key/value in place; prefill reads the ring
for positions before the chunk and the packed new keys for the chunk itself, then the caller writes
the chunk's last W keys into the ring.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from model.backends.triton_kernels import pdl
from model.backends.triton_kernels.pointwise import rope_halves

LOG2E = 1.4426950408889634


@triton.jit
def _attend_block(q, kb, vb, visible, m_i, l_i, acc, qk_scale):
    """One online-softmax step: fold the key/value block kb, vb [BN, D] into the running max m_i,
    sum l_i and output acc of the queries q [BM, D]; `visible` [BM, BN] masks scores (log2 units)."""
    s = tl.where(visible, tl.dot(q, tl.trans(kb)) * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
    alpha = tl.exp2(m_i - m_safe)
    pr = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(pr, axis=1)
    acc = acc * alpha[:, None] + tl.dot(pr.to(vb.dtype), vb)
    return m_new, l_i, acc


@triton.jit
def _swa_decode_split_kernel(
    q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, ctx_ptr, m_ptr, l_ptr, acc_ptr, cos_ptr, sin_ptr,
    count_ptr, out_ptr,
    W, HKV, G, NSPLIT, SPLIT_LEN,
    stride_q, stride_qh, stride_k, stride_kh, stride_v, stride_vh,
    stride_c_slot, stride_c_row, stride_c_h, stride_cos, stride_sin, stride_o, stride_oh, qk_scale,
    D: tl.constexpr, BG: tl.constexpr, BN: tl.constexpr, ROPE: tl.constexpr, TAIL: tl.constexpr,
    BGT: tl.constexpr, BS: tl.constexpr, SC: tl.constexpr, MAX_USED: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    # ROPE: q and k come before RoPE and are rotated here with the row's cos/sin [D] (every program
    # rotates its q heads; the new key goes into the ring rotated)
    # TAIL: the last of the (row, kv head)'s splits that hold keys to finish (an arrival counter per
    # (row, kv head), zero between launches) merges the G heads' partials into out (no reduce launch).
    # MAX_USED > 0 (with TAIL): the keys are spread over at most MAX_USED splits of whole key blocks
    # (longer ones at long contexts), which bounds what the merge reads
    pdl.prologue(USE_PDL)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid // HKV).to(tl.int64)
    hk = (pid % HKV).to(tl.int64)
    offs_g = tl.arange(0, BG)
    offs_d = tl.arange(0, D)
    mg = offs_g < G
    slot = tl.load(slot_ptr + b).to(tl.int64)
    p = tl.load(ctx_ptr + b).to(tl.int64)  # absolute index of the new token
    heads = hk * G + offs_g
    k_row = k_ptr + b * stride_k + hk * stride_kh
    HALF: tl.constexpr = D // 2
    if ROPE:
        offs_h = tl.arange(0, HALF)
        cos_row, sin_row = cos_ptr + b * stride_cos, sin_ptr + b * stride_sin
        q_ptrs = q_ptr + b * stride_q + heads[:, None] * stride_qh + offs_h[None, :]
        q1, q2 = rope_halves(q_ptrs, mg[:, None], cos_row, sin_row, HALF)
        q = tl.reshape(tl.permute(tl.join(q1, q2), (0, 2, 1)), [BG, D])  # halves side by side
        k1, k2 = rope_halves(k_row + offs_h, offs_h < HALF, cos_row, sin_row, HALF)
        k_new = tl.reshape(tl.permute(tl.join(k1, k2), (1, 0)), [D])
    else:
        q = tl.load(
            q_ptr + b * stride_q + heads[:, None] * stride_qh + offs_d[None, :], mask=mg[:, None], other=0.0
        )
        k_new = tl.load(k_row + offs_d)

    m_i = tl.full([BG], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BG], dtype=tl.float32)
    acc = tl.zeros([BG, D], dtype=tl.float32)
    v_new = tl.load(v_ptr + b * stride_v + hk * stride_vh + offs_d)
    if split == 0:  # the new token itself, from registers
        s_new = tl.sum(q.to(tl.float32) * k_new[None, :].to(tl.float32), axis=1) * qk_scale
        m_i = s_new
        l_i = tl.full([BG], 1.0, dtype=tl.float32)
        acc = tl.zeros([BG, D], dtype=tl.float32) + v_new[None, :].to(tl.float32)

    # ring rows holding cached keys: 0..p-1 while p < W, else every row but p % W
    num_rows = tl.minimum(p, W)
    skip_row = tl.where(p >= W, p % W, -1)
    split_len = SPLIT_LEN
    if MAX_USED > 0:
        split_len = tl.maximum(SPLIT_LEN, tl.cdiv(tl.cdiv(num_rows, MAX_USED), BN) * BN)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, num_rows)
    base = slot * stride_c_slot + hk * stride_c_h
    for start in range(lo, hi, BN):
        rows = start + tl.arange(0, BN)
        valid = (rows < hi) & (rows != skip_row)
        offs = base + rows[:, None].to(tl.int64) * stride_c_row + offs_d[None, :]
        kb = tl.load(kc_ptr + offs, mask=valid[:, None], other=0.0)
        vb = tl.load(vc_ptr + offs, mask=valid[:, None], other=0.0)
        m_i, l_i, acc = _attend_block(q, kb, vb, valid[None, :], m_i, l_i, acc, qk_scale)

    out_idx = (b * HKV * G + heads) * NSPLIT + split  # [B, Hq, NSPLIT]
    used = (split == 0) | (lo < num_rows)  # the reduction reads the splits that hold keys, and split 0
    tl.store(m_ptr + out_idx, m_i, mask=mg & used)
    tl.store(l_ptr + out_idx, l_i, mask=mg & used)
    tl.store(acc_ptr + out_idx[:, None] * D + offs_d[None, :], acc, mask=mg[:, None] & used)
    if split == 0:  # no program reads row p % W (masked above), so writing it now is race-free
        dst = base + (p % W) * stride_c_row + offs_d
        tl.store(kc_ptr + dst, k_new)
        tl.store(vc_ptr + dst, v_new)
    if TAIL:
        n_used = tl.maximum(1, tl.cdiv(num_rows, split_len))
        if split < n_used:
            tl.debug_barrier()  # every partial store of this program comes before its arrival
            count = count_ptr + pid
            if tl.atomic_add(count, 1, sem="acq_rel") == n_used - 1:
                tl.store(count, 0)  # ready for the next launch, which starts after this one has finished
                _merge_splits(
                    m_ptr, l_ptr, acc_ptr, out_ptr + b * stride_o + hk * G * stride_oh, stride_oh,
                    b * HKV * G + hk * G, G, NSPLIT, n_used, D, BGT, BS, SC,
                )  # fmt: skip


@triton.jit
def _merge_splits(
    m_ptr, l_ptr, acc_ptr, out_ptr, stride_oh, first, G, NSPLIT, n_used,
    D: tl.constexpr, BGT: tl.constexpr, BS: tl.constexpr, SC: tl.constexpr,
):  # fmt: skip
    """Merge splits 0 .. n_used-1 of heads first .. first+G-1 (partials [B Hq, NSPLIT]) into out_ptr's
    G head rows: the weights from the split maxima first, then the outputs SC splits at a time. Loads
    are ".cg" (L2): other SMs wrote the partials."""
    offs_g = tl.arange(0, BGT)
    offs_s = tl.arange(0, BS)
    offs_c = tl.arange(0, SC)
    offs_d = tl.arange(0, D)
    mg = offs_g < G
    heads = (first + offs_g).to(tl.int64) * NSPLIT
    ms = mg[:, None] & (offs_s[None, :] < n_used)
    m = tl.load(m_ptr + heads[:, None] + offs_s[None, :], mask=ms, other=float("-inf"), cache_modifier=".cg")
    lsum = tl.load(l_ptr + heads[:, None] + offs_s[None, :], mask=ms, other=0.0, cache_modifier=".cg")
    m_max = tl.where(mg, tl.max(m, axis=1), 0.0)  # finite: split 0 always holds the new token
    denom = tl.sum(tl.where(ms, tl.exp2(m - m_max[:, None]), 0.0) * lsum, axis=1)
    o = tl.zeros([BGT, D], dtype=tl.float32)
    for s0 in range(0, n_used, SC):
        s = s0 + offs_c
        mc = mg[:, None] & (s[None, :] < n_used)
        idx = heads[:, None] + s[None, :]
        mc_s = tl.load(m_ptr + idx, mask=mc, other=float("-inf"), cache_modifier=".cg")
        w = tl.where(mc, tl.exp2(mc_s - m_max[:, None]), 0.0)
        a = tl.load(
            acc_ptr + idx[:, :, None] * D + offs_d[None, None, :], mask=mc[:, :, None], other=0.0,
            cache_modifier=".cg",
        )  # fmt: skip
        o += tl.sum(a * w[:, :, None], axis=1)
    o = o / tl.where(mg, denom, 1.0)[:, None]
    o_ptrs = out_ptr + offs_g[:, None] * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=mg[:, None])


@triton.jit
def _swa_decode_reduce_kernel(
    m_ptr, l_ptr, acc_ptr, out_ptr, ctx_ptr, HQ, NSPLIT, W, SPLIT_LEN, stride_o, stride_oh,
    D: tl.constexpr, BS: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    pdl.prologue(USE_PDL)
    pid = tl.program_id(0).to(tl.int64)  # b * HQ + h
    offs_s = tl.arange(0, BS)
    offs_d = tl.arange(0, D)
    # only the splits that hold cached keys were stored (split 0 always: the new token)
    p = tl.load(ctx_ptr + pid // HQ)
    used = tl.maximum(1, tl.cdiv(tl.minimum(p, W), SPLIT_LEN))
    ms = offs_s < used
    m = tl.load(m_ptr + pid * NSPLIT + offs_s, mask=ms, other=float("-inf"))
    lsum = tl.load(l_ptr + pid * NSPLIT + offs_s, mask=ms, other=0.0)
    acc = tl.load(
        acc_ptr + (pid * NSPLIT + offs_s)[:, None] * D + offs_d[None, :], mask=ms[:, None], other=0.0
    )
    m_max = tl.max(m, axis=0)  # finite: split 0 always holds the new token
    w = tl.where(ms, tl.exp2(m - m_max), 0.0)
    o = tl.sum(acc * w[:, None], axis=0) / tl.sum(lsum * w, axis=0)
    b = pid // HQ
    h = pid % HQ
    tl.store(out_ptr + b * stride_o + h * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty))


def decode_num_splits(
    num_rows: int, num_kv_heads: int, window: int, num_sms: int = 132, min_split: int = 64
) -> int:
    """Window splits per (row, kv head) so that about two programs per SM are in flight, each split at
    least min_split rows."""
    want = max(1, (2 * num_sms) // max(1, num_rows * num_kv_heads))
    return max(1, min(want, triton.cdiv(window, min_split)))


def swa_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_ids: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    num_sms: int = 132,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    counters: torch.Tensor | None = None,
    min_split: int = 64,
    max_used: int = 0,
) -> torch.Tensor:
    """q [B, Hq, D], k/v [B, Hkv, D] (token index context_lens[b]); writes k/v into the ring in place.
    With rope (cos, sin [B, D], unit stride on D), q and k come before RoPE and are rotated here
    (pointwise.rope_'s roundings); the ring gets the rotated key. With counters (int32, >= B Hkv
    zeros, left zero), the split kernel's tail merges the splits (no reduce launch); with max_used
    > 0 too, a row's keys are spread over at most max_used splits (whole 64-row key blocks, longer
    splits at long contexts). Splits are multiples of min_split rows (a multiple of 64)."""
    num_rows, num_q_heads, dim = q.shape
    _, window, num_kv_heads, _ = key_cache.shape
    group = num_q_heads // num_kv_heads
    if dim & (dim - 1) or dim < 16:
        raise ValueError(f"head_dim {dim} must be a power of two >= 16 for the Triton path")
    if key_cache.stride() != value_cache.stride() or key_cache.stride(3) != 1:
        raise ValueError("key and value caches must share a layout with unit stride on head_dim")
    if min_split <= 0 or min_split % 64:
        raise ValueError(f"min_split {min_split}: a positive multiple of 64 (the key block)")
    if counters is not None and (counters.dtype != torch.int32 or counters.numel() < num_rows * num_kv_heads):
        raise ValueError(f"counters: int32 with at least {num_rows * num_kv_heads} entries")
    if max_used < 0 or (max_used and counters is None):
        raise ValueError(f"max_used {max_used}: >= 0, and > 0 only with counters (the tail merge)")
    nsplit = decode_num_splits(num_rows, num_kv_heads, window, num_sms, min_split)
    split_len = triton.cdiv(triton.cdiv(window, nsplit), min_split) * min_split
    nsplit = triton.cdiv(window, split_len)
    f32 = dict(dtype=torch.float32, device=q.device)
    m = torch.empty((num_rows, num_q_heads, nsplit), **f32)
    lsum = torch.empty((num_rows, num_q_heads, nsplit), **f32)
    acc = torch.empty((num_rows, num_q_heads, nsplit, dim), **f32)
    bg = max(16, triton.next_power_of_2(group))
    if rope is not None and (rope[0].stride(1) != 1 or rope[1].stride(1) != 1):
        raise ValueError("swa_decode expects cos/sin with unit stride on D")
    cos, sin = rope if rope is not None else (q, q)  # placeholders without rope
    out = torch.empty_like(q)
    bs = triton.next_power_of_2(min(nsplit, max_used) if max_used else nsplit)
    bgt = triton.next_power_of_2(group)
    _swa_decode_split_kernel[(num_rows * num_kv_heads, nsplit)](
        q, k, v, key_cache, value_cache, slot_ids, context_lens, m, lsum, acc, cos, sin,
        counters if counters is not None else context_lens, out,
        window, num_kv_heads, group, nsplit, split_len,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), cos.stride(0), sin.stride(0),
        out.stride(0), out.stride(1), scale * LOG2E,
        D=dim, BG=bg, BN=64, ROPE=rope is not None, TAIL=counters is not None,
        BGT=bgt, BS=bs, SC=min(bs, max(1, 4096 // (bgt * dim))), MAX_USED=max_used, num_warps=4,
        **pdl.launch_kwargs(),
    )  # fmt: skip
    if counters is not None:
        return out
    _swa_decode_reduce_kernel[(num_rows * num_q_heads,)](
        m, lsum, acc, out, context_lens, num_q_heads, nsplit, window, split_len, out.stride(0), out.stride(1),
        D=dim, BS=bs,  # max_used is 0 without counters: every split
        **pdl.launch_kwargs(),
    )  # fmt: skip
    return out


@triton.jit
def _attend_block_full(q, kb, vb, m_i, l_i, acc, qk_scale):
    """`_attend_block` for a key block every query sees: no mask, and the row max is always finite."""
    s = tl.dot(q, tl.trans(kb))
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
    alpha = tl.exp2(m_i - m_new)
    pr = tl.exp2(s * qk_scale - m_new[:, None])
    l_i = l_i * alpha + tl.sum(pr, axis=1)
    acc = acc * alpha[:, None] + tl.dot(pr.to(vb.dtype), vb)
    return m_new, l_i, acc


@triton.jit
def _attend_new_masked(
    q, k_ptr, v_ptr, kv_base_k, kv_base_v, stride_k, stride_v, start, ctx, last_q, pos_q, W,
    kb_i, m_i, l_i, acc, qk_scale, D: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    """Fold the chunk's key block kb_i (sequence offsets [kb_i BN, (kb_i+1) BN)) with the causal and
    window masks."""
    offs_d = tl.arange(0, D)
    local = kb_i * BN + tl.arange(0, BN)  # offset in the sequence
    mk = local <= last_q - ctx
    offs_n = (start + local).to(tl.int64)
    kb = tl.load(
        k_ptr + offs_n[:, None] * stride_k + kv_base_k + offs_d[None, :], mask=mk[:, None], other=0.0
    )
    vb = tl.load(
        v_ptr + offs_n[:, None] * stride_v + kv_base_v + offs_d[None, :], mask=mk[:, None], other=0.0
    )
    pos_k = ctx + local
    ok = mk[None, :] & (pos_k[None, :] <= pos_q[:, None]) & (pos_k[None, :] > pos_q[:, None] - W)
    return _attend_block(q, kb, vb, ok, m_i, l_i, acc, qk_scale)


@triton.jit
def _swa_prefill_kernel(
    q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, out_ptr,
    blk_seq_ptr, blk_start_ptr, cu_ptr, slot_ptr, ctx_ptr,
    W, G, stride_q, stride_qh, stride_k, stride_kh, stride_v, stride_vh, stride_o, stride_oh,
    stride_c_slot, stride_c_row, stride_c_h, qk_scale,
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    # Positions (absolute token indices) are int32; pointer offsets are int64 where they can be large.
    # The keys of a query block [first_q, last_q] are [lo, last_q]. Keys in [full_lo, first_q] are
    # visible to every query of the block; only the key blocks that straddle full_lo (window edge) or
    # first_q (causal diagonal) need the mask, so the loops below run those separately.
    blk = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    hk = h // G
    seq = tl.load(blk_seq_ptr + blk)
    t0 = tl.load(blk_start_ptr + blk).to(tl.int32)  # packed index of the block's first query
    start = tl.load(cu_ptr + seq).to(tl.int32)
    end = tl.load(cu_ptr + seq + 1).to(tl.int32)
    slot = tl.load(slot_ptr + seq).to(tl.int64)
    ctx = tl.load(ctx_ptr + seq).to(tl.int32)
    offs_m = t0 + tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    mm = offs_m < end
    pos_q = ctx + (offs_m - start)  # absolute index of each query
    q = tl.load(
        q_ptr + offs_m[:, None].to(tl.int64) * stride_q + h * stride_qh + offs_d[None, :],
        mask=mm[:, None],
        other=0.0,
    )

    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, D], dtype=tl.float32)
    first_q = ctx + (t0 - start)
    last_q = ctx + (tl.minimum(t0 + BM, end) - 1 - start)
    lo = tl.maximum(first_q - W + 1, 0)
    full_lo = tl.maximum(last_q - W + 1, 0)

    # phase 1: cached positions lo .. ctx-1 from the ring (row = position % W), in blocks that end at
    # ctx: block k covers [ctx - (k+1) BN, ctx - k BN). Blocks k < n_full start at or after full_lo.
    c_base = slot * stride_c_slot + hk * stride_c_h
    n_ring = tl.cdiv(tl.maximum(ctx - lo, 0), BN)
    n_full = tl.minimum(tl.maximum(ctx - full_lo, 0) // BN, n_ring)
    for kb_i in range(0, n_full):
        rows = (ctx - (kb_i + 1) * BN + tl.arange(0, BN)) % W
        offs = c_base + rows[:, None] * stride_c_row + offs_d[None, :]
        kb = tl.load(kc_ptr + offs)
        vb = tl.load(vc_ptr + offs)
        m_i, l_i, acc = _attend_block_full(q, kb, vb, m_i, l_i, acc, qk_scale)
    for kb_i in range(n_full, n_ring):  # window edge
        pos_k = ctx - (kb_i + 1) * BN + tl.arange(0, BN)
        mk = pos_k >= lo
        offs = c_base + (tl.maximum(pos_k, 0) % W)[:, None] * stride_c_row + offs_d[None, :]
        kb = tl.load(kc_ptr + offs, mask=mk[:, None], other=0.0)
        vb = tl.load(vc_ptr + offs, mask=mk[:, None], other=0.0)
        ok = mk[None, :] & (pos_k[None, :] > pos_q[:, None] - W)
        m_i, l_i, acc = _attend_block(q, kb, vb, ok, m_i, l_i, acc, qk_scale)

    # phase 2: new positions max(lo, ctx) .. last_q from the packed keys, in blocks that start at ctx:
    # block k covers sequence offsets [k BN, (k+1) BN). [k_lo, k_a): window edge; [k_a, k_b): every
    # query sees every key; [k_b, k_hi): causal diagonal.
    k_lo = (tl.maximum(lo, ctx) - ctx) // BN
    k_hi = tl.cdiv(last_q - ctx + 1, BN)
    k_a = tl.minimum(tl.maximum(tl.cdiv(tl.maximum(full_lo - ctx, 0), BN), k_lo), k_hi)
    k_b = tl.minimum(tl.maximum((first_q - ctx + 1) // BN, k_a), k_hi)
    kv_base_k = hk * stride_kh
    kv_base_v = hk * stride_vh
    for kb_i in range(k_a, k_b):
        offs_n = (start + kb_i * BN + tl.arange(0, BN)).to(tl.int64)
        kb = tl.load(k_ptr + offs_n[:, None] * stride_k + kv_base_k + offs_d[None, :])
        vb = tl.load(v_ptr + offs_n[:, None] * stride_v + kv_base_v + offs_d[None, :])
        m_i, l_i, acc = _attend_block_full(q, kb, vb, m_i, l_i, acc, qk_scale)
    for kb_i in range(k_lo, k_a):  # window edge
        m_i, l_i, acc = _attend_new_masked(
            q, k_ptr, v_ptr, kv_base_k, kv_base_v, stride_k, stride_v, start, ctx, last_q, pos_q, W,
            kb_i, m_i, l_i, acc, qk_scale, D, BN,
        )  # fmt: skip
    for kb_i in range(k_b, k_hi):  # causal diagonal
        m_i, l_i, acc = _attend_new_masked(
            q, k_ptr, v_ptr, kv_base_k, kv_base_v, stride_k, stride_v, start, ctx, last_q, pos_q, W,
            kb_i, m_i, l_i, acc, qk_scale, D, BN,
        )  # fmt: skip

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_o + h * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=mm[:, None])


def swa_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    blk_seq: torch.Tensor,
    blk_start: torch.Tensor,
    cu_seqlens: torch.Tensor,
    slot_ids: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    block_m: int,
    block_n: int = 64,
    num_warps: int | None = None,
    num_stages: int = 2,
) -> torch.Tensor:
    """Attention of packed queries over ring + chunk keys; does not write the ring (see ring_write).

    Query blocks of `block_m` rows are described by blk_seq/blk_start (built for that block size);
    block_n, num_warps and num_stages are launch parameters only (benchmarks/sweep_prefill_kernels.py)."""
    num_tok, num_q_heads, dim = q.shape
    _, window, num_kv_heads, _ = key_cache.shape
    out = torch.empty_like(q)
    grid = (blk_seq.shape[0], num_q_heads)
    _swa_prefill_kernel[grid](
        q, k, v, key_cache, value_cache, out, blk_seq, blk_start, cu_seqlens, slot_ids, context_lens,
        window, num_q_heads // num_kv_heads,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), scale * LOG2E,
        D=dim, BM=block_m, BN=block_n, num_warps=num_warps or (4 if block_m <= 64 else 8), num_stages=num_stages,
    )  # fmt: skip
    return out
