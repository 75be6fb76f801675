"""Triton backend vs the torch backend (the oracle) on fresh random inputs, prefill and decode.

Pool rows not named by the batch are filled with NaN before each call: a kernel that reads or writes
the wrong slot shows up as NaN in the output or as a changed row.
"""

from __future__ import annotations

import pytest
import torch

from model.backends.torch_backend import TorchBackend
from model.batch import BatchMeta
from tests.gpu_common import DEVICE, HAS_CUDA, INTERPRET, needs_kernels, rel_err

pytestmark = needs_kernels

DT = torch.bfloat16 if HAS_CUDA else torch.float32  # the CPU interpreter mishandles bf16 dots
TOL = 2e-2  # bf16 operands; fp32 accumulation


def _backends():
    from model.backends.triton_backend import TritonBackend

    return TritonBackend(DEVICE), TorchBackend(DEVICE)


def _pool(
    shape: tuple[int, ...], num_slots: int, dtype: torch.dtype, live: list[int], ctx: list[int]
) -> torch.Tensor:
    """[num_slots + 1, *shape]: random rows for live slots that continue a sequence, NaN elsewhere
    (fresh sequences' rows and the dummy row included: a fresh sequence must never read its row)."""
    pool = torch.full((num_slots + 1, *shape), float("nan"), dtype=dtype, device=DEVICE)
    for s, c in zip(live, ctx, strict=True):
        if c > 0:
            pool[s] = torch.randn(shape, dtype=dtype, device=DEVICE)
    return pool


def _case(decode: bool, seed: int) -> tuple[list[int], list[int], list[int], int]:
    """(slots, seq_lens, context_lens, num_slots) mixing fresh and continuing sequences."""
    g = torch.Generator().manual_seed(seed)
    num_seqs = 4
    num_slots = 7
    slots = torch.randperm(num_slots, generator=g)[:num_seqs].tolist()
    if decode:
        lens = [1] * num_seqs
    else:
        lens = [int(x) for x in torch.randint(1, 150, (num_seqs,), generator=g)]
        lens[0] = 1  # a decode-like row inside a prefill call
    ctx = [0, 5, 3, 300][:num_seqs]
    return slots, lens, ctx, num_slots


def _qkv(n: int, heads: int, dk: int, dv: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random q, k [n, heads, dk] and v [n, heads, dv] in the test dtype."""
    q = torch.randn(n, heads, dk, dtype=DT, device=DEVICE)
    k = torch.randn(n, heads, dk, dtype=DT, device=DEVICE)
    return q, k, torch.randn(n, heads, dv, dtype=DT, device=DEVICE)


def _compare_pools(a: torch.Tensor, b: torch.Tensor, live: list[int], tol: float) -> None:
    for s in live:
        assert rel_err(a[s], b[s]) < tol, f"slot {s}"
    others = [r for r in range(a.shape[0]) if r not in live]
    assert torch.isnan(a[others].float()).all(), "a non-participating row was written"


@pytest.mark.parametrize("decode", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_short_conv(decode: bool, seed: int) -> None:
    tri, ref = _backends()
    torch.manual_seed(seed)
    slots, lens, ctx, num_slots = _case(decode, seed)
    meta = BatchMeta.build(slots, lens, ctx, DEVICE)
    C, K = 96, 4
    x = torch.randn(sum(lens), C, dtype=DT, device=DEVICE)
    w = torch.randn(C, K, dtype=DT, device=DEVICE) * 0.5
    pool = _pool((C, K), num_slots, DT, slots, ctx)
    pool_ref = pool.clone()
    out = tri.short_conv(x, w, meta, pool)
    out_ref = ref.short_conv(x, w, meta, pool_ref)
    assert rel_err(out, out_ref) < TOL
    _compare_pools(pool, pool_ref, slots, TOL)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("qk_normalized", [False, True])
def test_gdn_decode(state_dtype: torch.dtype, seed: int, qk_normalized: bool) -> None:
    tri, ref = _backends()
    torch.manual_seed(seed)
    slots, lens, ctx, num_slots = _case(True, seed)
    meta = BatchMeta.build(slots, lens, ctx, DEVICE)
    H, DK, DV = 3, 32, 64
    n = len(slots)
    q, k, v = _qkv(n, H, DK, DV)
    g = -torch.rand(n, H, device=DEVICE) * 2
    beta = torch.rand(n, H, dtype=DT, device=DEVICE)
    if qk_normalized:  # what short_conv returns with l2norm_head_dim
        q = torch.nn.functional.normalize(q.float(), dim=-1).to(DT)
        k = torch.nn.functional.normalize(k.float(), dim=-1).to(DT)
    pool = _pool((H, DK, DV), num_slots, state_dtype, slots, ctx)
    pool_ref = pool.clone()
    out = tri.gated_delta_rule(q, k, v, g, beta, meta, pool, qk_normalized)
    out_ref = ref.gated_delta_rule(q, k, v, g, beta, meta, pool_ref, qk_normalized)
    assert rel_err(out, out_ref) < TOL
    _compare_pools(pool, pool_ref, slots, TOL)


@pytest.mark.parametrize("rows_heads", [1, 128, 512, 4096])
def test_gdn_decode_launch_sizes(rows_heads: int) -> None:
    """Every d_v block / warp count that `decode_launch` picks (by batch x heads) gives the torch
    backend's output and states; d_v 256 so that the largest block still splits d_v in two."""
    from model.backends.triton_kernels.gdn import decode_launch, gdn_decode

    _, ref = _backends()
    torch.manual_seed(rows_heads)
    slots, lens, ctx, num_slots = _case(True, 3)
    meta = BatchMeta.build(slots, lens, ctx, DEVICE)
    H, DK, DV = 2, 32, 256
    n = len(slots)
    q, k, v = _qkv(n, H, DK, DV)
    g = -torch.rand(n, H, device=DEVICE) * 2
    beta = torch.rand(n, H, dtype=DT, device=DEVICE)
    pool = _pool((H, DK, DV), num_slots, torch.float32, slots, ctx)
    pool_ref = pool.clone()
    launch = decode_launch(rows_heads)
    out = gdn_decode(q, k, v, g, beta, pool, meta.slot_ids, meta.context_lens, DK**-0.5, launch=launch)
    out_ref = ref.gated_delta_rule(q, k, v, g, beta, meta, pool_ref)
    assert rel_err(out, out_ref) < TOL
    _compare_pools(pool, pool_ref, slots, TOL)


@pytest.mark.parametrize("decode", [True, False])
def test_gdn_gate_inputs(decode: bool) -> None:
    """gated_delta_rule with the gate inputs (a, b and the constants, as the model passes them when
    `gates_in_delta_rule` says yes) equals the torch backend, and in decode equals the Triton kernel
    fed with the separate gates kernel's g and beta bit for bit."""
    if not decode and INTERPRET and not HAS_CUDA:
        pytest.skip("fla's chunk kernel needs a GPU")
    from model.backends.base import GateInputs

    tri, ref = _backends()
    torch.manual_seed(3)
    slots, lens, ctx, num_slots = _case(decode, 3)
    meta = BatchMeta.build(slots, lens, ctx, DEVICE)
    H, DK, DV = 3, 32, 64
    n = sum(lens)
    q, k, v = _qkv(n, H, DK, DV)
    proj = torch.randn(n, 2 * H + 5, device=DEVICE).to(DT) * 8  # a and b as row-strided column slices
    proj[0, 0] = 30.0  # past softplus's linear threshold
    a, b = proj[:, 1 : 1 + H], proj[:, 1 + H : 1 + 2 * H]
    gates = GateInputs(a, b, -torch.rand(H, device=DEVICE) * 2, torch.randn(H, device=DEVICE))
    pool = _pool((H, DK, DV), num_slots, torch.float32, slots, ctx)
    pool_ref, pool_sep = pool.clone(), pool.clone()
    out = tri.gated_delta_rule(q, k, v, None, None, meta, pool, gates=gates)
    out_ref = ref.gated_delta_rule(q, k, v, None, None, meta, pool_ref, gates=gates)
    assert rel_err(out, out_ref) < TOL
    _compare_pools(pool, pool_ref, slots, TOL)
    if decode:
        g, beta = tri.pointwise.gdn_gates(*gates)
        out_sep = tri.gated_delta_rule(q, k, v, g, beta, meta, pool_sep)
        assert torch.equal(out, out_sep)
        assert torch.equal(pool[slots], pool_sep[slots])


def _gdn_decode_inputs(n: int, heads: int, dk: int, dv: int, num_slots: int, slots, ctx):
    """(GDNDecodeInputs with a row-strided projection, conv pool, state pool), pools NaN-poisoned."""
    from model.backends.base import GDNDecodeInputs

    conv_dim, kc = heads * (2 * dk + dv), 4
    width = conv_dim + 2 * heads + heads * dv
    proj = (torch.randn(n, width + 8, device=DEVICE) * 2).to(DT)[:, 3 : 3 + width]  # a column slice
    inputs = GDNDecodeInputs(
        proj,
        (torch.randn(conv_dim, kc, device=DEVICE) * 0.5).to(DT),
        (heads, dk, dv),
        -torch.rand(heads, device=DEVICE) * 2,
        torch.randn(heads, device=DEVICE),
        torch.rand(dv, device=DEVICE) + 0.5,
        1e-6,
    )
    conv_pool = _pool((conv_dim, kc), num_slots, DT, slots, ctx)
    return inputs, conv_pool, _pool((heads, dk, dv), num_slots, torch.float32, slots, ctx)


def _gdn_decode_reference(ref, inputs, meta, conv_pool, state_pool, gated_norm: bool) -> torch.Tensor:
    """The separate steps on the torch backend: short conv, gates + delta rule, the gated norm."""
    from model.backends.base import GateInputs, gated_rms_norm

    heads, dk, dv = inputs.head_dims
    n, conv_dim = inputs.proj.shape[0], heads * (2 * dk + dv)
    p = inputs.proj
    q, k, v = ref.short_conv(
        p[:, :conv_dim], inputs.conv_weight, meta, conv_pool, [heads * dk, heads * dk, heads * dv]
    )
    a, b = p[:, conv_dim : conv_dim + heads], p[:, conv_dim + heads : conv_dim + 2 * heads]
    gates = GateInputs(a, b, inputs.neg_exp_a, inputs.dt_bias)
    o = ref.gated_delta_rule(
        q.reshape(n, heads, dk), k.reshape(n, heads, dk), v.reshape(n, heads, dv), None, None, meta,
        state_pool, gates=gates,
    )  # fmt: skip
    if not gated_norm:
        return o
    z = p[:, conv_dim + 2 * heads :].reshape(n, heads, dv)
    return gated_rms_norm(o, z, inputs.norm_weight, inputs.eps).reshape(n, heads * dv)


@pytest.mark.parametrize("gated_norm", [False, True])
@pytest.mark.parametrize("bv", [16, 32, 64, None])  # 4, 2 and 1 programs per head; the default launch
def test_gdn_recur_decode_equals_the_separate_steps(gated_norm: bool, bv: int | None) -> None:
    """The one-launch decode recurrence (conv, gates, delta rule, gated norm) equals the torch
    backend's separate steps, output and both pools, with NaN-poisoned rows never read or written;
    the arrival counters are all zero again afterwards, and a second step on the updated pools
    (where the q/k conv state that the head's last program wrote is read) still matches."""
    from model.backends.base import GatedNormed
    from model.backends.triton_kernels.gdn import gdn_recur_decode

    tri, ref = _backends()
    torch.manual_seed(11)
    slots, lens, ctx, num_slots = _case(True, 4)
    H, DK, DV = 3, 32, 64
    n = len(slots)
    inputs, conv_pool, state_pool = _gdn_decode_inputs(n, H, DK, DV, num_slots, slots, ctx)
    conv_ref, state_ref = conv_pool.clone(), state_pool.clone()
    for step in range(2):
        meta = BatchMeta.build(slots, lens, [c + step for c in ctx], DEVICE)
        if bv is None:
            got = tri.gdn_decode(inputs, meta, conv_pool, state_pool, gated_norm)
            assert isinstance(got, GatedNormed) == gated_norm
            out = got.out if gated_norm else got
            counters = tri._arrival_counters[-1]
        else:
            counters = torch.zeros(64, dtype=torch.int32, device=DEVICE)
            out = gdn_recur_decode(
                inputs.proj, inputs.conv_weight, conv_pool, state_pool, meta.slot_ids, meta.context_lens,
                inputs.neg_exp_a, inputs.dt_bias, inputs.head_dims, counters,
                inputs.norm_weight if gated_norm else None, inputs.eps, launch={"bv": bv, "num_warps": 1},
            )  # fmt: skip
            out = out.reshape(n, H * DV) if gated_norm else out
        expect = _gdn_decode_reference(ref, inputs, meta, conv_ref, state_ref, gated_norm)
        assert rel_err(out, expect) < TOL, f"step {step}"
        _compare_pools(conv_pool, conv_ref, slots, TOL)
        _compare_pools(state_pool, state_ref, slots, TOL)
        assert not counters.any()
        inputs = inputs._replace(proj=(torch.randn_like(inputs.proj.float()) * 2).to(DT))


def test_gdn_decode_fused_switches_and_prefill() -> None:
    """`gdn_decode` is None in prefill calls, with `fused_gdn_decode` off and at batches where the
    separate launches are faster; with `fused_gdn_norm` off it returns the delta-rule output (the
    caller runs the gated norm)."""
    tri, _ = _backends()
    slots, lens, ctx, num_slots = _case(True, 4)
    inputs, conv_pool, state_pool = _gdn_decode_inputs(len(slots), 2, 16, 32, num_slots, slots, ctx)
    prefill = BatchMeta.build(slots, [2] * len(slots), ctx, DEVICE)
    assert tri.gdn_decode(inputs, prefill, conv_pool, state_pool, True) is None
    meta = BatchMeta.build(slots, lens, ctx, DEVICE)
    tri.fused_gdn_norm = False
    out = tri.gdn_decode(inputs, meta, conv_pool, state_pool, True)
    assert isinstance(out, torch.Tensor) and out.shape == (len(slots), 2, 32)
    tri.fused_gdn_decode = False
    assert tri.gdn_decode(inputs, meta, conv_pool, state_pool, True) is None
    # 4 rows x 128 heads: the batch where `fused_decode_launch` keeps the separate launches
    tri.fused_gdn_decode = True
    wide, conv_wide, state_wide = _gdn_decode_inputs(len(slots), 128, 16, 16, num_slots, slots, ctx)
    assert tri.gdn_decode(wide, meta, conv_wide, state_wide, True) is None


def _gdn_prefill_case(seed: int, dims: tuple[int, int, int], qk_normalized: bool):
    """((q, k, v, g, beta), meta, NaN-poisoned fp32 state pool, live slots) of a prefill call."""
    torch.manual_seed(seed)
    slots, lens, ctx, num_slots = _case(False, seed)
    meta = BatchMeta.build(slots, lens, ctx, DEVICE)
    H, DK, DV = dims
    n = sum(lens)
    q, k, v = _qkv(n, H, DK, DV)
    g = torch.nn.functional.logsigmoid(torch.randn(n, H, device=DEVICE)) * 0.3
    beta = torch.rand(n, H, dtype=DT, device=DEVICE)
    if qk_normalized:
        q = torch.nn.functional.normalize(q.float(), dim=-1).to(DT)
        k = torch.nn.functional.normalize(k.float(), dim=-1).to(DT)
    pool = _pool((H, DK, DV), num_slots, torch.float32, slots, ctx)
    return (q, k, v, g, beta), meta, pool, slots


@pytest.mark.skipif(INTERPRET and not torch.cuda.is_available(), reason="fla's chunk kernel needs a GPU")
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("dims", [(4, 128, 256), (2, 16, 32)])  # real head dims; the tiny model's
@pytest.mark.parametrize("qk_normalized", [False, True])
def test_gdn_prefill(seed: int, dims: tuple[int, int, int], qk_normalized: bool) -> None:
    tri, ref = _backends()
    (q, k, v, g, beta), meta, pool, slots = _gdn_prefill_case(seed, dims, qk_normalized)
    pool_ref = pool.clone()
    out = tri.gated_delta_rule(q, k, v, g, beta, meta, pool, qk_normalized)
    out_ref = ref.gated_delta_rule(q, k, v, g, beta, meta, pool_ref, qk_normalized)
    assert rel_err(out, out_ref) < TOL
    _compare_pools(pool, pool_ref, slots, TOL)


def test_fla_forward_below_the_wrapper_is_found() -> None:
    """With the fla the project pins for its GPU path (0.6), prefill calls fla's forward directly: a
    changed signature would silently fall back to the public wrapper (slower on the host, still right)."""
    from importlib.metadata import version

    from model.backends import triton_backend

    if not version("flash-linear-attention").startswith("0.6."):
        pytest.skip("the direct call is checked against fla 0.6's signature")
    if triton_backend._fla_has_other_backend():
        pytest.skip("fla dispatches the chunked delta rule to another backend here (FlashQLA)")
    assert triton_backend.FLA_FORWARD is not None


@pytest.mark.skipif(INTERPRET and not torch.cuda.is_available(), reason="fla's chunk kernel needs a GPU")
@pytest.mark.parametrize("seed", [0, 1])
def test_gdn_prefill_direct_fla_call_equals_the_wrapper(seed: int) -> None:
    """The direct call runs the same kernels as fla's public wrapper: bit-identical outputs and states."""
    from model.backends.triton_backend import FLA_FORWARD

    if FLA_FORWARD is None:
        pytest.skip("this fla has no forward below its wrapper that the backend can call")
    tri, _ = _backends()
    tri.fla_direct = True
    inputs, meta, pool, slots = _gdn_prefill_case(seed, (4, 128, 256), True)
    pool_wrapped = pool.clone()
    out = tri.gated_delta_rule(*inputs, meta, pool, True)
    tri.fla_direct = False
    out_wrapped = tri.gated_delta_rule(*inputs, meta, pool_wrapped, True)
    assert torch.equal(out, out_wrapped)
    assert torch.equal(pool[slots], pool_wrapped[slots])


def _run_swa(
    slots: list[int], lens: list[int], ctx: list[int], num_slots: int, window: int
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Sliding-window attention on both backends from the same random q/k/v and NaN-poisoned rings:
    (out, out_ref, (key, value) rings after the Triton call, the same after the torch call)."""
    tri, ref = _backends()
    meta = BatchMeta.build(slots, lens, ctx, DEVICE)
    HQ, HKV, D = 4, 2, 32
    n = sum(lens)
    q = torch.randn(n, HQ, D, dtype=DT, device=DEVICE)
    k = torch.randn(n, HKV, D, dtype=DT, device=DEVICE)
    v = torch.randn(n, HKV, D, dtype=DT, device=DEVICE)
    kc = _pool((window, HKV, D), num_slots, DT, slots, ctx)
    vc = _pool((window, HKV, D), num_slots, DT, slots, ctx)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    out = tri.sliding_window_attention(q, k, v, meta, kc, vc, D**-0.5)
    out_ref = ref.sliding_window_attention(q, k, v, meta, kc_ref, vc_ref, D**-0.5)
    return out, out_ref, (kc, vc), (kc_ref, vc_ref)


@pytest.mark.parametrize("decode", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("window", [16, 96])
def test_sliding_window_attention(decode: bool, seed: int, window: int) -> None:
    torch.manual_seed(seed)
    out, out_ref, (kc, vc), (kc_ref, vc_ref) = _run_swa(*_case(decode, seed), window)
    assert rel_err(out, out_ref) < TOL
    # a fresh slot's ring holds stale rows the model must never read; only compare written rows
    assert torch.equal(torch.isnan(kc.float()), torch.isnan(kc_ref.float()))
    assert torch.equal(kc.nan_to_num(0.0), kc_ref.nan_to_num(0.0))
    assert torch.equal(vc.nan_to_num(0.0), vc_ref.nan_to_num(0.0))


@pytest.mark.parametrize("ctx", [[0, 5, 130, 700], [64, 511, 512, 1000]])
def test_swa_decode_many_splits(ctx: list[int]) -> None:
    """Decode over a 512-row window in 8 splits of 64 (num_sms 132 at 4 rows x 2 kv heads): only
    the splits that hold keys are stored and reduced (unused partials stay NaN-poisoned here), at
    contexts inside one split, across splits, at the window's edge and past it."""
    from model.backends.triton_kernels.swa import swa_decode

    _, ref = _backends()
    torch.manual_seed(sum(ctx))
    slots, window, HQ, HKV, D = [3, 0, 5, 1], 512, 4, 2, 32
    meta = BatchMeta.build(slots, [1] * 4, ctx, DEVICE)
    q = torch.randn(4, HQ, D, dtype=DT, device=DEVICE)
    k = torch.randn(4, HKV, D, dtype=DT, device=DEVICE)
    v = torch.randn(4, HKV, D, dtype=DT, device=DEVICE)
    kc = _pool((window, HKV, D), 6, DT, slots, ctx)
    vc = _pool((window, HKV, D), 6, DT, slots, ctx)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    empty = torch.empty
    try:  # the split partials come from torch.empty: poison them
        torch.empty = lambda *a, **kw: empty(*a, **kw).fill_(float("nan"))
        out = swa_decode(q, k, v, kc, vc, meta.slot_ids, meta.context_lens, D**-0.5, num_sms=132)
    finally:
        torch.empty = empty
    out_ref = ref.sliding_window_attention(q, k, v, meta, kc_ref, vc_ref, D**-0.5)
    assert rel_err(out, out_ref) < TOL
    assert torch.equal(kc.nan_to_num(0.0), kc_ref.nan_to_num(0.0))


@pytest.mark.parametrize("min_split,max_used", [(64, 0), (128, 0), (64, 2), (64, 3)])
@pytest.mark.parametrize("ctx", [[0, 5, 130, 700], [64, 511, 512, 1000]])
def test_swa_decode_merges_the_splits_in_the_tail(min_split: int, max_used: int, ctx: list[int]) -> None:
    """With arrival counters the split kernel's last used split merges the partials (no reduce
    launch): the torch backend's output and ring, only the used splits' partials read (the rest
    NaN-poisoned), and the counters back at zero, over two consecutive steps; with 128-row splits
    (half as many splits), and with a row's keys spread over at most 2 or 3 longer splits. With the
    same splits, the reduce launch's output up to summation order."""
    from model.backends.triton_kernels.swa import swa_decode

    tri, ref = _backends()
    torch.manual_seed(sum(ctx) + min_split)
    slots, window, HQ, HKV, D = [3, 0, 5, 1], 512, 8, 2, 32
    kc = _pool((window, HKV, D), 6, DT, slots, ctx)
    vc = _pool((window, HKV, D), 6, DT, slots, ctx)
    kc_ref, vc_ref, kc_red, vc_red = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    counters = torch.zeros(64, dtype=torch.int32, device=DEVICE)
    empty = torch.empty
    for step in range(2):
        meta = BatchMeta.build(slots, [1] * 4, [c + step for c in ctx], DEVICE)
        q = torch.randn(4, HQ, D, dtype=DT, device=DEVICE)
        k = torch.randn(4, HKV, D, dtype=DT, device=DEVICE)
        v = torch.randn(4, HKV, D, dtype=DT, device=DEVICE)
        args = (meta.slot_ids, meta.context_lens, D**-0.5, 132)
        made = []
        try:  # the split partials come from torch.empty: poison them
            torch.empty = lambda *a, made=made, **kw: (
                made.append(empty(*a, **kw).fill_(float("nan"))) or made[-1]
            )
            out = swa_decode(q, k, v, kc, vc, *args, None, counters, min_split, max_used)
            reduced = swa_decode(q, k, v, kc_red, vc_red, *args, None, None, min_split)
        finally:
            torch.empty = empty
        maxima = made[0]  # [B, Hq, splits]: the tail run's split maxima
        if max_used:  # no row's keys went past its first max_used splits
            assert torch.isnan(maxima[..., max_used:]).all() and not torch.isnan(maxima[..., 0]).any()
        out_ref = ref.sliding_window_attention(q, k, v, meta, kc_ref, vc_ref, D**-0.5)
        assert rel_err(out, out_ref) < TOL
        if not max_used:  # the same splits
            assert rel_err(out, reduced) < (4e-3 if HAS_CUDA else 1e-6)  # bf16 on the GPU
        assert torch.equal(kc.nan_to_num(0.0), kc_ref.nan_to_num(0.0))
        assert torch.equal(vc.nan_to_num(0.0), vc_ref.nan_to_num(0.0))
        assert not counters.any()
    # the backend switches reach the kernel
    tri.swa_reduce_tail, tri.swa_min_split, tri.swa_tail_max_splits = True, min_split, max_used
    meta = BatchMeta.build(slots, [1] * 4, [c + 2 for c in ctx], DEVICE)
    q = torch.randn(4, HQ, D, dtype=DT, device=DEVICE)
    k = torch.randn(4, HKV, D, dtype=DT, device=DEVICE)
    v = torch.randn(4, HKV, D, dtype=DT, device=DEVICE)
    out = tri.sliding_window_attention(q, k, v, meta, kc, vc, D**-0.5)
    out_ref = ref.sliding_window_attention(q, k, v, meta, kc_ref, vc_ref, D**-0.5)
    assert rel_err(out, out_ref) < TOL
    assert not tri._counters(8).any()


@pytest.mark.parametrize("decode", [True, False])
@pytest.mark.parametrize("window", [16, 512])
def test_sliding_window_attention_rotates_q_and_k(decode: bool, window: int) -> None:
    """With the rope tables, q and k before RoPE give what the rope kernel and then the attention
    give: bit for bit in decode in the interpreter (the split kernel rotates them with the rope
    kernel's roundings; the ring gets the rotated key), within bf16 noise on a GPU, and on the torch
    backend bit for bit as well."""
    from model.layers import apply_rope

    tri, ref = _backends()
    torch.manual_seed(window)
    slots, lens, ctx, num_slots = _case(decode, 2)
    if not decode and INTERPRET and not HAS_CUDA:
        lens = [min(n, 20) for n in lens]  # a short prefill: the interpreter is slow
    meta = BatchMeta.build(slots, lens, ctx, DEVICE)
    HQ, HKV, D = 4, 2, 32
    n = sum(lens)
    qkv = torch.randn(n, (HQ + 2 * HKV) * D + 8, dtype=DT, device=DEVICE)  # row-strided views
    angles = torch.rand(n, D // 2, device=DEVICE) * 6
    cos, sin = (torch.cat([f(angles)] * 2, dim=-1).to(DT) for f in (torch.cos, torch.sin))
    rings = [_pool((window, HKV, D), num_slots, DT, slots, ctx) for _ in range(2)]
    results = []
    for backend, late in ((tri, False), (tri, True), (ref, True), (ref, False)):
        x = qkv.clone()
        q, k = x[:, : HQ * D].view(n, HQ, D), x[:, HQ * D : (HQ + HKV) * D].view(n, HKV, D)
        v = x[:, (HQ + HKV) * D : (HQ + 2 * HKV) * D].view(n, HKV, D)
        if not late:
            qk = x[:, : (HQ + HKV) * D].view(n, HQ + HKV, D)
            if backend is tri:
                tri.pointwise.rope(qk, cos, sin)
            else:
                qk.copy_(apply_rope(qk, cos, sin))
        kc, vc = (r.clone() for r in rings)
        rope = (cos, sin) if late else None
        out = backend.sliding_window_attention(q, k, v, meta, kc, vc, D**-0.5, rope)
        results.append((out, kc.nan_to_num(0.0)))
    (tri_early, kc_early), (tri_late, kc_late), (ref_late, kc_ref_late), (ref_early, kc_ref) = results
    if decode and not HAS_CUDA:  # the interpreter (fp32): the rope kernel's roundings, bit for bit
        assert torch.equal(tri_late, tri_early)
        assert torch.equal(kc_late, kc_early)
    else:  # on a GPU the compiled arithmetic differs (FMA contraction, dot layout): bf16 noise
        assert rel_err(tri_late, tri_early) < TOL
        assert rel_err(kc_late, kc_early) < TOL
    assert torch.equal(ref_late, ref_early) and torch.equal(kc_ref_late, kc_ref)
    assert rel_err(tri_late, ref_late) < TOL
    assert rel_err(kc_late, kc_ref) < TOL


@pytest.mark.parametrize("window", [256, 512])
def test_sliding_window_attention_long_prefill(window: int) -> None:
    """Prefill spans long enough for the kernel's unmasked key blocks (ring and chunk) next to its
    masked window-edge and diagonal blocks: sequences longer than the window, a context past several
    wraps of the ring, a one-token row and a short continuation."""
    torch.manual_seed(7)
    lens = [700, 300, 1, 130]
    out, out_ref, (kc, vc), (kc_ref, vc_ref) = _run_swa([3, 0, 5, 1], lens, [0, 1000, 5, 200], 6, window)
    start = 0
    for i, length in enumerate(lens):
        rows = slice(start, start + length)
        start += length
        assert rel_err(out[rows], out_ref[rows]) < TOL, f"sequence {i}"
    assert torch.equal(kc.nan_to_num(0.0), kc_ref.nan_to_num(0.0))
    assert torch.equal(vc.nan_to_num(0.0), vc_ref.nan_to_num(0.0))


@pytest.mark.parametrize("decode", [False, True])
@pytest.mark.parametrize("sizes", [[32, 32, 64], [128, 128, 256]])  # parts across / along 128-channel blocks
@pytest.mark.parametrize("l2norm", [False, True])
def test_short_conv_split_parts(decode: bool, sizes: list[int], l2norm: bool) -> None:
    """With split_sizes the parts equal the torch backend's column slices; prefill parts are
    contiguous (what fla's chunked kernel reads without a copy). x is a strided column slice. With
    l2norm_head_dim, q and k come out normalised per head in the conv's epilogue."""
    tri, ref = _backends()
    torch.manual_seed(5)
    slots, lens, ctx, num_slots = _case(decode, 5)
    meta = BatchMeta.build(slots, lens, ctx, DEVICE)
    head_dim = (16 if sizes[0] == 32 else 128) if l2norm else None
    C, K = sum(sizes), 4
    x = torch.randn(sum(lens), C + 24, dtype=DT, device=DEVICE)[:, 8 : 8 + C]
    w = torch.randn(C, K, dtype=DT, device=DEVICE) * 0.5
    pool = _pool((C, K), num_slots, DT, slots, ctx)
    pool_ref = pool.clone()
    parts = tri.short_conv(x, w, meta, pool, sizes, head_dim)
    parts_ref = ref.short_conv(x, w, meta, pool_ref, sizes, head_dim)
    if l2norm:
        norms = parts[1].float().unflatten(1, (-1, head_dim)).norm(dim=-1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=2e-2)
    assert [p.shape for p in parts] == [(sum(lens), s) for s in sizes]
    for p, p_ref in zip(parts, parts_ref, strict=True):
        assert rel_err(p, p_ref) < TOL
        assert decode or p.is_contiguous()
    _compare_pools(pool, pool_ref, slots, TOL)


def test_prefill_tables_chunk_indices_match_fla() -> None:
    """The (sequence, chunk) table built on the host for fla equals fla's own helper's."""
    from fla.ops.utils.index import prepare_chunk_indices

    from model.backends.triton_backend import FLA_CHUNK, _prefill_tables

    lens = [1, 64, 65, 300, 2, 128]
    meta = BatchMeta.build(list(range(len(lens))), lens, [0] * len(lens), "cpu")
    t = _prefill_tables(meta, None, torch.device("cpu"))
    ref = prepare_chunk_indices(t["cu_long"], FLA_CHUNK)
    assert t["chunk_indices"].dtype == ref.dtype
    assert torch.equal(t["chunk_indices"], ref)


@pytest.mark.parametrize(
    "m,n,k,bias,cfg",
    [
        (1, 200, 256, False, {"block_n": 64}),  # a ragged last row tile
        (5, 96, 384, True, {"block_n": 32, "num_programs": 2}),  # several tiles per program, bias
        (64, 130, 256, False, {"block_n": 64, "flatten": False}),
        (3, 64, 1096, False, {"block_n": 32, "split_k": 4}),  # K not a multiple of the K block
        (128, 48, 512, False, {"block_n": 32, "split_k": 3, "num_warps": 8}),
        # one row in CUDA-core FMAs: ragged tiles, bias, split-K with a ragged K, several units each
        (1, 200, 256, True, {"block_n": 64, "gemv": True}),
        (1, 96, 1096, False, {"block_n": 32, "split_k": 4, "num_programs": 5, "gemv": True}),
        (4, 96, 256, False, {"block_n": 32, "gemv": True}),  # more rows: the tensor-core tile
    ],
)
@pytest.mark.parametrize("tma", [False, True])
def test_decode_gemm(m: int, n: int, k: int, bias: bool, cfg: dict, tma: bool) -> None:
    """The persistent decode GEMM equals F.linear (fp32 reference), with split-K, bias, ragged tiles;
    tma: the tiles loaded by the tensor memory accelerator."""
    from model.backends.triton_kernels.gemm import decode_gemm

    g = torch.Generator(DEVICE).manual_seed(m * 1000 + n)
    x = torch.randn(m, k, generator=g, device=DEVICE).to(DT)
    w = (torch.randn(n, k, generator=g, device=DEVICE) * 0.05).to(DT)
    b = torch.randn(n, generator=g, device=DEVICE).to(DT) if bias else None
    ref = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
    out = decode_gemm(x, w, b, block_k=128, tma=tma, **cfg)
    assert out.shape == (m, n) and out.dtype == DT
    assert rel_err(out, ref) < (TOL if HAS_CUDA else 1e-5)


@pytest.mark.parametrize(
    "m,n,cfg",
    [
        (1, 300, {"block_n": 64}),  # a ragged last tile
        (5, 256, {"block_n": 32, "num_programs": 3}),
        (3, 200, {"block_n": 32, "split_k": 2}),  # split-K: summed, rounded, then widened
        (2, 256, {"block_n": 64, "tma": True}),
        (1, 300, {"block_n": 32, "gemv": True}),
        (1, 200, {"block_n": 32, "split_k": 2, "gemv": True}),
    ],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_gemm_into_fp32_out(m: int, n: int, cfg: dict, dtype: torch.dtype) -> None:
    """out=fp32 logits: the product rounded to x's dtype and widened, bit for bit what the launch
    without out returns, widened; in a row-strided view of a wider buffer; bad `out` refused."""
    from model.backends.triton_kernels.gemm import decode_gemm

    g = torch.Generator(DEVICE).manual_seed(m + n)
    x = torch.randn(m, 256, generator=g, device=DEVICE).to(dtype)
    w = (torch.randn(n, 256, generator=g, device=DEVICE) * 0.05).to(dtype)
    plain = decode_gemm(x, w, None, block_k=128, **cfg)
    buf = torch.full((m, n + 7), float("nan"), device=DEVICE)
    out = buf[:, 3 : 3 + n]
    got = decode_gemm(x, w, None, block_k=128, out=out, **cfg)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(out, plain.float())
    assert buf[:, :3].isnan().all() and buf[:, 3 + n :].isnan().all(), "wrote outside out"
    with pytest.raises(ValueError, match="fp32"):
        decode_gemm(x, w, None, out=torch.empty(m, n, dtype=torch.bfloat16, device=DEVICE))
    with pytest.raises(ValueError, match="unit stride"):
        decode_gemm(x, w, None, out=torch.empty(m, 2 * n, device=DEVICE)[:, ::2])


@pytest.mark.parametrize(
    "m,inter,k,cfg",
    [
        (1, 100, 256, {"block_n": 32}),  # a ragged last tile: up rows start mid-tile
        (7, 64, 384, {"block_n": 16, "num_programs": 3}),  # several units per program
        (64, 96, 256, {"block_n": 64, "flatten": False, "num_warps": 8}),
        (1, 100, 256, {"block_n": 32, "tma": True}),
        (7, 64, 384, {"block_n": 16, "num_programs": 3, "tma": True}),
        (1, 100, 256, {"block_n": 32, "num_programs": 2, "gemv": True}),
    ],
)
def test_decode_gemm_silu_mul(m: int, inter: int, k: int, cfg: dict) -> None:
    """silu_mul=True equals the unfused path: gate|up product, gate and up rounded, silu(gate) * up."""
    from model.backends.triton_kernels.gemm import decode_gemm

    g = torch.Generator(DEVICE).manual_seed(m * 1000 + inter)
    x = torch.randn(m, k, generator=g, device=DEVICE).to(DT)
    w = (torch.randn(2 * inter, k, generator=g, device=DEVICE) * 0.1).to(DT)
    gate_up = torch.nn.functional.linear(x.float(), w.float()).to(DT)
    gate, up = gate_up.chunk(2, dim=-1)
    ref = torch.nn.functional.silu(gate) * up
    out = decode_gemm(x, w, None, block_k=128, silu_mul=True, **cfg)
    assert out.shape == (m, inter) and out.dtype == DT
    assert rel_err(out, ref) < (TOL if HAS_CUDA else 1e-5)
    plain = decode_gemm(x, w, None, block_k=128, **cfg)  # the same launch without the epilogue
    assert rel_err(plain, gate_up) < (TOL if HAS_CUDA else 1e-5)
    with pytest.raises(ValueError, match="silu_mul"):
        decode_gemm(x, w, None, split_k=2, silu_mul=True)


def test_pdl_only_in_captures_and_warmups() -> None:
    """Eager launches never carry the PDL attribute (it doubles their host cost); launches inside
    `warmup()` do, as captured ones would; nothing does with PDL off."""
    from model.backends.triton_kernels import pdl

    saved = pdl.ENABLED
    try:
        pdl.ENABLED = True
        assert pdl.launch_kwargs() == {"USE_PDL": False}
        with pdl.warmup():
            with pdl.warmup():
                assert pdl.launch_kwargs() == {"USE_PDL": True, "launch_pdl": True}
            assert pdl.launch_kwargs()["USE_PDL"]
        assert pdl.launch_kwargs() == {"USE_PDL": False}
        pdl.ENABLED = False
        with pdl.warmup():
            assert pdl.launch_kwargs() == {"USE_PDL": False}
    finally:
        pdl.ENABLED = saved


@pytest.mark.skipif(not HAS_CUDA, reason="programmatic dependent launch needs a GPU (sm_90)")
@pytest.mark.parametrize("tma", [False, True])
def test_decode_gemm_chain_under_pdl_equals_plain_launches(tma: bool) -> None:
    """A chain of dependent decode GEMMs (split-K and its sum kernel, the silu_mul epilogue, bias)
    launched with PDL, eagerly in `pdl.warmup()` and captured in a graph, gives bit-identical results
    to plain launches: no kernel reads its predecessor's output before the predecessor finished."""
    from model.backends.triton_kernels import pdl

    if not pdl.supported():
        pytest.skip("PDL needs compute capability 9.0 or later")
    from model.backends.triton_kernels.gemm import decode_gemm

    g = torch.Generator(DEVICE).manual_seed(7)
    inputs = [torch.randn(8, 1024, generator=g, device=DEVICE).to(DT) for _ in range(3)]
    w_up = (torch.randn(2 * 2048, 1024, generator=g, device=DEVICE) * 0.05).to(DT)
    w_down = (torch.randn(1024, 2048, generator=g, device=DEVICE) * 0.05).to(DT)
    w_out = (torch.randn(3000, 1024, generator=g, device=DEVICE) * 0.05).to(DT)
    bias = torch.randn(3000, generator=g, device=DEVICE).to(DT)
    x = inputs[0].clone()

    def chain():
        act = decode_gemm(x, w_up, None, block_n=32, num_programs=40, silu_mul=True, tma=tma)
        h = decode_gemm(act, w_down, None, block_n=64, split_k=4, num_programs=64, tma=tma)
        return decode_gemm(h, w_out, bias, block_n=64, num_programs=30, tma=tma)

    saved = pdl.ENABLED
    try:
        pdl.ENABLED = False
        refs = []
        for inp in inputs:  # plain launches
            x.copy_(inp)
            refs.append(chain())
        pdl.ENABLED = True
        with pdl.warmup():  # eager launches with PDL (and the variants the capture launches compiled)
            assert torch.equal(chain(), refs[-1])
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = chain()
        # each replay's input differs: a kernel that read its predecessor's output before the wait
        # would see the previous replay's values
        for inp, ref in zip(inputs, refs, strict=True):
            x.copy_(inp)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, ref)
    finally:
        pdl.ENABLED = saved


def test_backend_linear_silu_mul_follows_the_gemm_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """TritonBackend.linear_silu_mul fuses where the table has a "silu_mul" config for the shape and
    batch, and otherwise runs linear then the silu_mul kernel; both equal the torch backend."""
    import model.backends.triton_backend as tb
    from model.backends.gemm_table import DecodeGemmTable

    calls: list[tuple[bool, dict]] = []
    real = tb.decode_gemm

    def spy(x, w, b=None, silu_mul=False, **cfg):
        calls.append((silu_mul, cfg))
        return real(x, w, b, silu_mul=silu_mul, **cfg)

    monkeypatch.setattr(tb, "decode_gemm", spy)
    backend, ref_backend = _backends()
    fused = {"block_n": 32, "num_stages": 3}
    backend.gemm_table = DecodeGemmTable(
        [{"op": "silu_mul", "N": 128, "K": 256, "max_m": 4, "config": fused}]
    )
    w = (torch.randn(128, 256, device=DEVICE) * 0.1).to(DT)
    for m, expect in ((1, [(True, fused)]), (4, [(True, fused)]), (8, []), (0, [])):
        calls.clear()
        x = torch.randn(m, 256, device=DEVICE).to(DT)
        out = backend.linear_silu_mul(x, w)
        assert calls == expect, m
        assert out.shape == (m, 64)
        if m:
            assert rel_err(out, ref_backend.linear_silu_mul(x, w)) < TOL


def test_backend_linear_follows_the_gemm_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """TritonBackend.linear sends a (shape, batch) of its table to decode_gemm with the table's launch
    parameters, and everything else (other shapes, larger batches, bias mismatch) to F.linear."""
    import model.backends.triton_backend as tb
    from model.backends.gemm_table import DecodeGemmTable

    calls: list[dict] = []
    real = tb.decode_gemm

    def spy(x, w, b=None, reduce=True, **cfg):
        calls.append(cfg)
        return real(x, w, b, reduce=reduce, **cfg)

    monkeypatch.setattr(tb, "decode_gemm", spy)
    backend = tb.TritonBackend(DEVICE)
    entry = {"block_n": 32, "num_stages": 3}
    backend.gemm_table = DecodeGemmTable(
        [{"N": 96, "K": 256, "max_m": 4, "config": entry}, {"N": 96, "K": 256, "max_m": 16, "config": None}]
    )
    w = (torch.randn(96, 256, device=DEVICE) * 0.05).to(DT)
    for m, expect in ((1, [entry]), (4, [entry]), (8, []), (32, [])):
        calls.clear()
        x = torch.randn(m, 256, device=DEVICE).to(DT)
        out = backend.linear(x, w)
        assert calls == expect, m
        assert rel_err(out, torch.nn.functional.linear(x.float(), w.float())) < TOL
    calls.clear()
    backend.linear(torch.randn(2, 256, device=DEVICE).to(DT), w, torch.zeros(96, device=DEVICE).to(DT))
    assert calls == []  # the table entry is for the shape without a bias
    empty = backend.linear(torch.randn(0, 256, device=DEVICE).to(DT), w)  # no rows: nothing to stream
    assert calls == [] and empty.shape == (0, 96)
    for m in (1, 8):  # out= (the LM head's fp32 logits): through the table's GEMM, or F.linear widened
        calls.clear()
        x = torch.randn(m, 256, device=DEVICE).to(DT)
        logits = torch.empty(m, 96, device=DEVICE)
        assert backend.linear(x, w, out=logits) is logits
        assert torch.equal(logits, backend.linear(x, w).float())
        assert len(calls) == (2 if m == 1 else 0)


def test_linear_partial_leaves_split_k_sums_to_the_norm() -> None:
    """With `partial`, a split-K table entry returns the GEMM's fp32 partial sums unreduced; adding
    them up (SplitKPartials.total, or inside the fused residual-add RMSNorm) gives exactly what
    linear and then the norm give. One split, split_k_into_norm off or no pointwise ops: a tensor."""
    from model.backends.base import SplitKPartials
    from model.backends.gemm_table import DecodeGemmTable

    backend, _ = _backends()
    split4 = {"block_n": 32, "block_k": 32, "split_k": 4}
    backend.gemm_table = DecodeGemmTable(
        [
            {"N": 96, "K": 200, "max_m": 8, "config": split4},  # K past the last split's end
            {"N": 96, "K": 64, "max_m": 8, "config": {"block_n": 32, "block_k": 64, "split_k": 1}},
        ]
    )
    g = torch.Generator(DEVICE).manual_seed(3)
    x = torch.randn(5, 200, generator=g, device=DEVICE).to(DT)
    w = (torch.randn(96, 200, generator=g, device=DEVICE) * 0.1).to(DT)
    full = backend.linear(x, w)
    part = backend.linear(x, w, partial=True)
    assert isinstance(part, SplitKPartials) and part.dtype == DT
    assert part.partials.shape == (4, 5, 96) and part.partials.dtype == torch.float32
    assert torch.equal(part.total(), full)
    weight = (1 + 0.1 * torch.randn(96, generator=g, device=DEVICE)).to(DT)
    residual = torch.randn(5, 96, generator=g, device=DEVICE).to(DT)
    for res in (residual, None):
        y_ref, s_ref = backend.pointwise.rms_norm(full, weight, 1e-6, res)
        y, s = backend.pointwise.rms_norm(part, weight, 1e-6, res)
        assert torch.equal(y, y_ref) and torch.equal(s, s_ref), res is None
    one_split = backend.linear(x[:, :64].contiguous(), w[:, :64].contiguous(), partial=True)
    assert isinstance(one_split, torch.Tensor)
    backend.split_k_into_norm = False
    assert torch.equal(backend.linear(x, w, partial=True), full)
    backend.split_k_into_norm, backend.pointwise = True, None
    assert torch.equal(backend.linear(x, w, partial=True), full)


@torch.no_grad()
def test_model_decode_with_split_k_sums_in_the_norms(tiny_ckpt_dir) -> None:
    """The tiny model on the Triton backend, decode steps whose output projections (GDN, SWA, MLP down)
    take split-K table entries: leaving the partial sums to the next norm gives bit-identical hidden
    states and pool rows to reducing them in the GEMM's own kernel."""
    from model.backends.base import SplitKPartials
    from model.backends.gemm_table import DecodeGemmTable
    from model.loader import load_model
    from model.state import allocate_state

    runs = []
    for into_norm in (True, False):
        model = load_model(tiny_ckpt_dir, dtype=DT, device=DEVICE, backend="triton")
        text = model.config.text
        hidden, value_dim = text.hidden_size, text.num_linear_heads * text.linear_value_dim
        outs = {value_dim, text.num_attention_heads * text.head_dim}  # GDN and SWA o_proj widths
        split = {"block_n": 32, "block_k": 32, "split_k": 2}
        entries = [{"N": hidden, "K": k, "max_m": 4, "config": split} for k in outs]
        entries.append(
            {"N": hidden, "K": text.intermediate_size, "max_m": 4, "config": {**split, "split_k": 4}}
        )
        model.backend.gemm_table = DecodeGemmTable(entries)
        model.backend.split_k_into_norm = into_norm
        ops, deferred = model.backend.pointwise, []
        norm = ops.rms_norm
        ops.rms_norm = lambda x, *a, f=norm, seen=deferred: (
            seen.append(isinstance(x, SplitKPartials)) or f(x, *a)
        )
        slots = [2, 0, 1]
        state = allocate_state(text, 3, torch.float32, model.dtype, DEVICE)
        hidden_states = []
        for step in range(4):  # fresh slots, then continuing ones: decode kernels only
            ids = torch.tensor([7 + step, 40 + step, 90 + step], device=DEVICE)
            pos = torch.full((3, 3), step, device=DEVICE)
            meta = BatchMeta.build(slots, [1, 1, 1], [step] * 3, DEVICE)
            hidden_states.append(model(ids, pos, meta, state))
        runs.append(
            [torch.cat(hidden_states)]
            + [t.clone() for t in (state.recurrent, state.conv, state.key, state.value)]
        )
        # per layer and step: the o_proj sums reach the post-attention norm, the down projection's the
        # next input norm (the final norm after the last layer)
        assert sum(deferred) == (2 * text.num_hidden_layers * 4 if into_norm else 0)
    for fused, reduced in zip(*runs, strict=True):
        assert torch.equal(fused, reduced)


@torch.no_grad()
def test_model_decode_with_the_fused_gdn_step(tiny_ckpt_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiny model on the Triton backend, decode steps from fresh slots on: with the one-launch
    GDN recurrence (with and without the gated norm in it) the hidden states and every pool equal
    the separate launches' within bf16 noise, and the fused kernel ran once per GDN layer and step;
    with q and k rotated in the attention kernel instead of the rope kernel, bit for bit; with the
    attention's splits merged in its tail (and 128-row splits) and the embedding gathered in the
    rope-table launch, within bf16 noise."""
    from model.backends import triton_backend
    from model.loader import load_model
    from model.state import allocate_state

    calls = []
    fused = triton_backend.gdn_recur_decode
    monkeypatch.setattr(triton_backend, "gdn_recur_decode", lambda *a: calls.append(1) or fused(*a))
    runs = []
    for on, norm, late_rope, tail in (
        (False, False, False, False),
        (True, False, False, False),
        (True, True, True, False),
        (False, False, True, False),
        (True, True, True, True),
    ):
        model = load_model(tiny_ckpt_dir, dtype=DT, device=DEVICE, backend="triton")
        model.backend.fused_gdn_decode, model.backend.fused_gdn_norm = on, norm
        model.backend.rope_in_swa = late_rope
        model.backend.swa_reduce_tail, model.backend.swa_min_split = tail, (128 if tail else 64)
        model.backend.embed_in_rope_tables = tail
        gather = model.backend.pointwise.embed_mrope_cos_sin
        model.backend.pointwise.embed_mrope_cos_sin = lambda *a, f=gather: calls.append(0) or f(*a)
        text = model.config.text
        slots = [2, 0, 1]
        state = allocate_state(text, 3, torch.float32, model.dtype, DEVICE)
        hidden_states = []
        calls.clear()
        for step in range(4):
            ids = torch.tensor([7 + step, 40 + step, 90 + step], device=DEVICE)
            pos = torch.full((3, 3), step, device=DEVICE)
            meta = BatchMeta.build(slots, [1, 1, 1], [step] * 3, DEVICE)
            hidden_states.append(model(ids, pos, meta, state))
        assert calls.count(1) == (4 * len(text.gdn_layers) if on else 0)
        assert calls.count(0) == (4 if tail else 0)  # one embedding-and-tables launch a step
        runs.append(
            [torch.cat(hidden_states)] + [t.clone() for t in (state.recurrent, state.conv, state.key)]
        )
    for variant in runs[1:]:
        for got, want in zip(variant, runs[0], strict=True):
            assert rel_err(got, want) < TOL
    # q and k rotated inside the attention kernel: the rope kernel's roundings, so bit for bit in the
    # interpreter (on a GPU within bf16 noise, checked above: the compiled arithmetic differs)
    if not HAS_CUDA:
        assert all(torch.equal(got, want) for got, want in zip(runs[3], runs[0], strict=True))
