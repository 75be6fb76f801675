"""The residual-add RMSNorm folded into the decode GEMV (`triton_kernels/norm_gemm.py`) against the two
steps it replaces: the fused norm's sums (the residual stream, bit for bit) and the product of the
normalised row (bf16: within the GEMM tolerance; fp32 in the interpreter: to fp32 rounding)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.backends.base import SplitKPartials
from tests.gpu_common import DEVICE, HAS_CUDA, needs_kernels, rel_err

pytestmark = needs_kernels

DT = torch.bfloat16 if HAS_CUDA else torch.float32  # the CPU interpreter mishandles bf16 dots
TOL = 2e-2 if HAS_CUDA else 1e-5
EPS = 1e-6


def _reference(x, residual, norm_w, weight, bias, silu_mul):
    """The two launches' math: s = (x summed in split order, rounded) + residual, rounded; then
    rmsnorm(s) rounded, times the weight, rounded; then the product (silu(gate) * up)."""
    if isinstance(x, SplitKPartials):
        x = x.total()
    s = x if residual is None else (x.float() + residual.float()).to(DT)
    sf = s.float()
    normed = (sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + EPS)).to(DT)
    n = (normed.float() * norm_w.float()).to(DT)
    y = F.linear(n.float(), weight.float(), None if bias is None else bias.float())
    if silu_mul:
        gate, up = y.to(DT).float().chunk(2, dim=-1)
        y = F.silu(gate.to(DT).float()).to(DT).float() * up
    return y, s


def _inputs(m: int, k: int, n: int, splits: int, seed: int):
    g = torch.Generator(DEVICE).manual_seed(seed)
    if splits:
        x = SplitKPartials(torch.randn(splits, m, k, generator=g, device=DEVICE) * 0.5, DT)
    else:
        x = torch.randn(m, k, generator=g, device=DEVICE).to(DT)
    residual = (torch.randn(m, k, generator=g, device=DEVICE) * 2).to(DT)
    norm_w = (1.0 + 0.1 * torch.randn(k, generator=g, device=DEVICE)).to(DT)
    weight = (torch.randn(n, k, generator=g, device=DEVICE) * k**-0.5).to(DT)
    bias = torch.randn(n, generator=g, device=DEVICE).to(DT)
    return x, residual, norm_w, weight, bias


@pytest.mark.parametrize(
    "m,k,n,splits,with_residual,use_bias,cfg",
    [
        (1, 256, 200, 2, True, False, {"block_n": 32, "block_k": 64}),  # ragged last row tile
        (1, 320, 96, 0, True, True, {"block_n": 16, "block_k": 128, "num_programs": 2}),  # ragged K
        (1, 256, 64, 0, False, False, {"block_n": 32, "block_k": 64}),  # the first block: s = x
        (1, 256, 64, 3, False, False, {"block_n": 16, "block_k": 64, "flatten": False}),
        (3, 256, 100, 2, True, True, {"block_n": 32, "block_k": 64, "num_programs": 2}),
        (16, 192, 64, 0, True, False, {"block_n": 32, "block_k": 64}),
    ],
)
def test_norm_gemm_equals_norm_then_linear(m, k, n, splits, with_residual, use_bias, cfg) -> None:
    from model.backends.triton_kernels.norm_gemm import norm_gemm

    x, residual, norm_w, weight, bias = _inputs(m, k, n, splits, seed=m * 100 + k + n + splits)
    residual = residual if with_residual else None
    bias = bias if use_bias else None
    y_ref, s_ref = _reference(x, residual, norm_w, weight, bias, False)
    y, s = norm_gemm(x, residual, norm_w, EPS, weight, bias, **cfg)
    assert y.shape == (m, n) and y.dtype == DT and s.shape == (m, k)
    assert torch.equal(s, s_ref), "the residual stream must equal the fused norm's bit for bit"
    if residual is None and splits == 0:
        assert s is x  # nothing added: the stream is the block input itself
    assert rel_err(y, y_ref) < TOL


@pytest.mark.parametrize(
    "m,cfg", [(1, {"block_n": 16, "block_k": 64}), (5, {"block_n": 32, "num_programs": 1})]
)
def test_norm_gemm_silu_mul(m: int, cfg: dict) -> None:
    """An MLP's gate|up with silu(gate) * up in the epilogue (ragged: up rows start mid-tile)."""
    from model.backends.triton_kernels.norm_gemm import norm_gemm

    inter, k = 50, 128
    x, residual, norm_w, weight, _ = _inputs(m, k, 2 * inter, 2, seed=11 + m)
    y_ref, s_ref = _reference(x, residual, norm_w, weight, None, True)
    y, s = norm_gemm(x, residual, norm_w, EPS, weight, silu_mul=True, **cfg)
    assert y.shape == (m, inter)
    assert torch.equal(s, s_ref)
    assert rel_err(y, y_ref) < TOL


@pytest.mark.parametrize("m", [1, 4])
def test_norm_gemm_into_fp32_out(m: int) -> None:
    """out=fp32 (the LM head's logits): the product rounded to the model dtype, widened, in a
    row-strided view of a wider buffer; nothing written outside it."""
    from model.backends.triton_kernels.norm_gemm import norm_gemm

    k, n = 128, 300
    x, residual, norm_w, weight, _ = _inputs(m, k, n, 0, seed=5)
    y_ref, _ = _reference(x, residual, norm_w, weight, None, False)
    buf = torch.full((m, n + 5), float("nan"), device=DEVICE)
    out = buf[:, 2 : 2 + n]
    y, _ = norm_gemm(x, residual, norm_w, EPS, weight, out=out, block_n=64, block_k=64)
    assert y.data_ptr() == out.data_ptr()
    assert torch.equal(out, out.to(DT).float()), "logits must be model-dtype values, widened"
    assert rel_err(out, y_ref) < TOL
    assert buf[:, :2].isnan().all() and buf[:, 2 + n :].isnan().all()


def test_norm_gemm_refuses_bad_inputs() -> None:
    from model.backends.triton_kernels.norm_gemm import NORM_GEMM_MAX_M, norm_gemm

    x, residual, norm_w, weight, bias = _inputs(2, 64, 32, 0, seed=1)
    with pytest.raises(ValueError, match="at most"):
        big = torch.zeros(NORM_GEMM_MAX_M + 1, 64, device=DEVICE, dtype=DT)
        norm_gemm(big, big, norm_w, EPS, weight)
    with pytest.raises(ValueError, match="silu_mul"):
        norm_gemm(x, residual, norm_w, EPS, weight, bias, silu_mul=True)
    with pytest.raises(ValueError, match="match"):
        norm_gemm(x, residual, norm_w[:32], EPS, weight)
    with pytest.raises(ValueError, match="out must be"):
        norm_gemm(
            x, residual, norm_w, EPS, weight, out=torch.empty(2, 32, device=DEVICE, dtype=torch.bfloat16)
        )


def test_backend_norm_linear_follows_the_gemm_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """TritonBackend.norm_linear folds where the table has a "norm_linear" / "norm_silu_mul" config for
    the shape, bias and batch, and otherwise runs the norm's launch and the product's own path; both
    equal the torch backend's two steps, and the residual streams are bit-identical."""
    import model.backends.triton_backend as tb
    from model.backends.gemm_table import DecodeGemmTable
    from model.backends.torch_backend import TorchBackend

    calls: list[tuple[bool, dict]] = []
    real = tb.norm_gemm

    def spy(x, residual, norm_w, eps, weight, bias=None, silu_mul=False, **cfg):
        calls.append((silu_mul, cfg))
        return real(x, residual, norm_w, eps, weight, bias, silu_mul, **cfg)

    monkeypatch.setattr(tb, "norm_gemm", spy)
    backend, ref_backend = tb.TritonBackend(DEVICE), TorchBackend(DEVICE)
    lin, silu = {"block_n": 32, "block_k": 64}, {"block_n": 16, "block_k": 64, "num_programs": 3}
    backend.gemm_table = DecodeGemmTable(
        [
            {"op": "norm_linear", "N": 96, "K": 128, "bias": True, "max_m": 2, "config": lin},
            {"op": "norm_linear", "N": 96, "K": 128, "bias": True, "max_m": 16, "config": None},
            {"op": "norm_silu_mul", "N": 96, "K": 128, "max_m": 4, "config": silu},
        ]
    )
    for m, use_bias, silu_mul, expect in (
        (1, True, False, [(False, lin)]),
        (2, True, False, [(False, lin)]),
        (3, True, False, []),  # the bucket says: two launches
        (1, False, False, []),  # the entry is for the shape with a bias
        (4, False, True, [(True, silu)]),
        (17, False, True, []),  # more rows than a fold tile holds
    ):
        calls.clear()
        x, residual, norm_w, weight, bias = _inputs(m, 128, 96, 2, seed=m)
        bias = bias if use_bias else None
        y, s = backend.norm_linear(x, residual, norm_w, EPS, weight, bias, silu_mul)
        y_ref, s_ref = ref_backend.norm_linear(x, residual, norm_w, EPS, weight, bias, silu_mul)
        assert calls == expect, m
        assert torch.equal(s, s_ref), m
        assert rel_err(y, y_ref) < TOL, m


@pytest.mark.skipif(not HAS_CUDA, reason="the tiny model's decode graphs need a GPU")
@pytest.mark.parametrize("use_pdl", [False, True])
def test_decode_with_folded_norms_tracks_the_fp32_oracle(tiny_ckpt_dir, monkeypatch, use_pdl: bool) -> None:
    """The tiny model with every block norm folded into the projection after it (table entries for
    its shapes; at batch 1 also the GDN gated norm into the output projection) stays as close to the
    fp32 torch-backend oracle as the same bf16 model without the folds, over decode steps that cross
    the window; its CUDA-graph replays (PDL on and off) equal its eager steps; the folds are
    launched twice per layer (and once per GDN layer at batch 1)."""
    import model.backends.triton_backend as tb
    from model.backends.triton_kernels import pdl
    from model.batch import BatchMeta
    from model.loader import load_model
    from model.state import allocate_state
    from serving.cuda_graph import CudaGraphRunner

    model = load_model(tiny_ckpt_dir, dtype=torch.bfloat16, device="cuda", backend="triton")
    oracle = load_model(tiny_ckpt_dir, dtype=torch.float32, device="cuda", backend="torch")
    plain_table = model.backend.gemm_table
    cfg = {"block_n": 32, "block_k": 64, "num_stages": 3}
    entries = []
    for layer in model.model.layers:
        mixer = layer.self_attn
        w, bias = (mixer.in_proj_weight, None) if layer.is_linear else (mixer.qkv_weight, mixer.qkv_bias)
        for op, weight, has_bias in (
            ("norm_linear", w, bias is not None),
            ("norm_silu_mul", layer.mlp.gate_up_weight, False),
        ):
            n, k = weight.shape
            for max_m in (1, 16):  # one row: the CUDA-core path; more: tensor-core tiles
                entries.append({"op": op, "N": n, "K": k, "bias": has_bias, "max_m": max_m, "config": cfg})
        if layer.is_linear:  # the gated norm into the output projection, at batch 1
            n, k = mixer.o_proj.weight.shape
            gated = {"block_n": 16, "split_k": 2}
            entries.append({"op": "gated_norm_linear", "N": n, "K": k, "max_m": 1, "config": gated})
    fold_table = plain_table.extended(entries)
    calls, gated_calls = (
        _count_calls(monkeypatch, tb, "norm_gemm"),
        _count_calls(monkeypatch, tb, "gated_norm_gemv"),
    )
    n_gdn = sum(layer.is_linear for layer in model.model.layers)
    text = model.config.text
    feed = torch.randint(0, text.vocab_size, (20, 3), generator=torch.Generator().manual_seed(3)).tolist()
    saved = pdl.ENABLED
    try:
        pdl.ENABLED = use_pdl
        outs = {}
        for name, table, slots in (
            ("oracle", None, [2, 0, 3]),
            ("plain", plain_table, [2, 0, 3]),
            ("fold", fold_table, [2, 0, 3]),
            ("fold1", fold_table, [1]),  # batch 1
        ):
            m = oracle if table is None else model
            if table is not None:
                model.backend.gemm_table = table
            # batch 1 with the gated norm left to the output projection (its fold); the others with
            # it in the one-launch GDN recurrence
            model.backend.fused_gdn_norm = name != "fold1"
            state = allocate_state(text, 4, torch.float32, m.dtype, "cuda")
            graphs = (
                CudaGraphRunner(model, state, max_batch=4, device="cuda") if name.startswith("fold") else None
            )
            eager_state = _clone_state(state) if graphs else state
            ctx, hs = [0] * len(slots), []
            for step in range(20):  # the tiny model's window is 16; the same tokens in every run
                ids = torch.tensor(feed[step][: len(slots)], device="cuda")
                calls.clear()
                gated_calls.clear()
                meta = BatchMeta.build(slots, [1] * len(slots), ctx, "cuda")
                pos = torch.tensor(ctx, device="cuda").expand(3, -1).contiguous()
                with torch.inference_mode():
                    h = m.forward(ids, pos, meta, eager_state)
                    hs.append(h.float())
                    assert len(calls) == (2 * len(model.model.layers) if graphs else 0)
                    assert len(gated_calls) == (n_gdn if name == "fold1" else 0)
                    if graphs is not None:
                        logits = graphs.run_host(ids.tolist(), ctx, slots, ctx)
                        assert rel_err(logits, model.compute_logits(h)) < 1e-2, (name, step)
                ctx = [c + 1 for c in ctx]
            outs[name] = torch.stack(hs)
        plain = max(rel_err(a, b) for a, b in zip(outs["plain"], outs["oracle"], strict=True))
        fold = max(rel_err(a, b) for a, b in zip(outs["fold"], outs["oracle"], strict=True))
        fold1 = max(rel_err(a, b[:1]) for a, b in zip(outs["fold1"], outs["oracle"], strict=True))
        # the fold rounds s * g once where the two launches round twice: no less accurate
        assert fold < 1.5 * plain + 5e-3 and fold1 < 1.5 * plain + 5e-3, (plain, fold, fold1)
    finally:
        pdl.ENABLED = saved
        model.backend.gemm_table = plain_table
        model.backend.fused_gdn_norm = True


def _count_calls(monkeypatch: pytest.MonkeyPatch, module, name: str) -> list:
    """A list that grows by one at every call of module.<name> (patched for the test)."""
    calls: list = []
    real = getattr(module, name)

    def spy(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(module, name, spy)
    return calls


def _clone_state(state):
    from model.state import StateTensors

    return StateTensors(*(t.clone() for t in (state.recurrent, state.conv, state.key, state.value)))


@pytest.mark.parametrize(
    "heads,dv,n,cfg",
    [
        (4, 64, 100, {"block_n": 32, "split_k": 2}),  # ragged last row tile, partials
        (3, 64, 64, {"block_n": 16, "split_k": 2, "num_programs": 3}),  # ragged heads per split
        (4, 32, 48, {"block_n": 16, "split_k": 1}),  # one split: the product itself
    ],
)
def test_gated_norm_gemv_equals_gated_norm_then_linear(heads: int, dv: int, n: int, cfg: dict) -> None:
    """The GDN gated norm folded into the output projection's GEMV (each K block one head) equals
    the gated-norm kernel followed by the product, with o a head-strided view and z a column slice
    of a wider projection row."""
    from model.backends.triton_kernels.norm_gemm import gated_norm_gemv
    from model.backends.triton_kernels.pointwise import gated_rms_norm

    g = torch.Generator(DEVICE).manual_seed(heads * dv + n)
    o = torch.randn(1, heads, dv + 8, generator=g, device=DEVICE).to(DT)[:, :, :dv]  # head stride dv + 8
    proj = torch.randn(1, heads * dv + 40, generator=g, device=DEVICE).to(DT)
    z = proj[:, 40:]
    norm_w = 1.0 + 0.1 * torch.randn(dv, generator=g, device=DEVICE)
    weight = (torch.randn(n, heads * dv, generator=g, device=DEVICE) * (heads * dv) ** -0.5).to(DT)
    normed = gated_rms_norm(o, z, norm_w, EPS)
    ref = F.linear(normed.float(), weight.float())
    y = gated_norm_gemv(o, z, norm_w, EPS, weight, **cfg)
    if cfg["split_k"] > 1:
        assert isinstance(y, SplitKPartials) and y.partials.shape[0] == cfg["split_k"]
        y = y.total()
    assert y.shape == (1, n) and y.dtype == DT
    assert rel_err(y, ref) < TOL
    with pytest.raises(ValueError, match="one row"):
        gated_norm_gemv(o.expand(2, -1, -1), z.expand(2, -1), norm_w, EPS, weight)


def test_backend_gated_norm_linear_follows_the_gemm_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """TritonBackend.gated_norm_linear folds at batch 1 where the table has a "gated_norm_linear"
    entry, leaves split-K partials to the next norm only with `partial`, and otherwise runs the
    gated-norm kernel and `linear`; all equal the torch backend's plain math."""
    import model.backends.triton_backend as tb
    from model.backends.gemm_table import DecodeGemmTable
    from model.backends.torch_backend import TorchBackend

    calls = []
    real = tb.gated_norm_gemv

    def spy(*args, **cfg):
        calls.append(cfg)
        return real(*args, **cfg)

    monkeypatch.setattr(tb, "gated_norm_gemv", spy)
    backend, ref_backend = tb.TritonBackend(DEVICE), TorchBackend(DEVICE)
    cfg = {"block_n": 16, "split_k": 2}
    backend.gemm_table = DecodeGemmTable(
        [{"op": "gated_norm_linear", "N": 48, "K": 128, "max_m": 1, "config": cfg}]
    )
    g = torch.Generator(DEVICE).manual_seed(0)
    norm_w = 1.0 + 0.1 * torch.randn(32, generator=g, device=DEVICE)
    weight = (torch.randn(48, 128, generator=g, device=DEVICE) * 0.1).to(DT)
    for m, partial, expect in ((1, True, [cfg]), (1, False, [cfg]), (2, True, [])):
        calls.clear()
        o = torch.randn(m, 4, 32, generator=g, device=DEVICE).to(DT)
        z = torch.randn(m, 128, generator=g, device=DEVICE).to(DT)
        y = backend.gated_norm_linear(o, z, norm_w, EPS, weight, partial=partial)
        assert calls == expect, (m, partial)
        assert isinstance(y, SplitKPartials) == (partial and bool(expect)), (m, partial)
        y = y.total() if isinstance(y, SplitKPartials) else y
        ref = ref_backend.gated_norm_linear(o, z, norm_w, EPS, weight)
        assert rel_err(y, ref) < TOL, (m, partial)
