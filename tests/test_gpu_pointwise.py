"""The Triton backend's fused elementwise ops vs the model's plain-PyTorch code for the same step.

Inputs are strided the way the model passes them (column slices of a fused projection), so a kernel
that ignores a row stride fails. On CUDA in bf16; in Triton's CPU interpreter in fp32.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.layers import RMSNorm, apply_rope, mrope_cos_sin
from tests.gpu_common import DEVICE, HAS_CUDA, needs_kernels, rel_err

pytestmark = needs_kernels

DT = torch.bfloat16 if HAS_CUDA else torch.float32
TOL = 1e-2 if HAS_CUDA else 1e-5


def _ops():
    from model.backends.triton_kernels.ops import TritonPointwise

    return TritonPointwise()


def _randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device=DEVICE, dtype=DT)


def _strided(x: torch.Tensor, pad: int = 5) -> torch.Tensor:
    """x as a column slice of a wider buffer (row stride != width), NaN in the padding."""
    buf = torch.full((x.shape[0], x.shape[1] + pad), float("nan"), dtype=x.dtype, device=x.device)
    buf[:, 2 : 2 + x.shape[1]] = x
    return buf[:, 2 : 2 + x.shape[1]]


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("dim", [64, 2048, 100])
def test_rms_norm(with_residual: bool, dim: int) -> None:
    norm = RMSNorm(dim, eps=1e-6).to(device=DEVICE, dtype=DT)
    with torch.no_grad():
        norm.weight.copy_(_randn(dim, seed=1))
    x = _strided(_randn(9, dim, seed=2, scale=3.0))
    residual = _randn(9, dim, seed=3) if with_residual else None
    y, s = _ops().rms_norm(x, norm.weight, norm.eps, residual)
    ref_y, ref_s = norm.add_forward(x, residual, None)
    assert y.dtype == DT and s.dtype == DT
    assert rel_err(s, ref_s) == 0.0  # the residual add is one rounding: exact
    assert rel_err(y, ref_y) < TOL


def test_gated_rms_norm() -> None:
    heads, dv = 3, 32  # a head count that is not a power of two
    o = _randn(7, heads, dv, seed=4, scale=2.0)
    z = _strided(_randn(7, heads * dv, seed=5))
    w = _randn(dv, seed=6).float()
    y = _ops().gated_rms_norm(o, z, w, 1e-6)
    o32 = o.float()
    ref = (
        o32 * torch.rsqrt(o32.pow(2).mean(-1, keepdim=True) + 1e-6) * w * F.silu(z.float().view(7, heads, dv))
    )
    assert y.shape == (7, heads * dv) and y.dtype == DT
    assert rel_err(y, ref.reshape(7, -1)) < TOL


@pytest.mark.parametrize("inter", [128, 1500])
def test_silu_mul(inter: int) -> None:
    gate_up = _randn(6, 2 * inter, seed=7, scale=3.0)
    y = _ops().silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    assert rel_err(y, F.silu(gate) * up) < TOL


def test_gdn_gates() -> None:
    heads = 5
    a = _strided(_randn(11, heads, seed=8, scale=10.0))  # spans softplus's linear branch (> 20)
    b = _strided(_randn(11, heads, seed=9, scale=3.0))
    a_log = torch.rand(heads, generator=torch.Generator().manual_seed(1)).to(DEVICE) * 2
    dt_bias = torch.randn(heads, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    g, beta = _ops().gdn_gates(a, b, -torch.exp(a_log), dt_bias)
    g_ref = F.softplus(a.float() + dt_bias) * -torch.exp(a_log)
    assert g.dtype == torch.float32 and beta.dtype == DT
    assert rel_err(g, g_ref) < 1e-5
    assert rel_err(beta, torch.sigmoid(b)) < TOL


def test_rope_in_place_on_projection_columns() -> None:
    n, heads, d = 6, 5, 16
    qkv = _randn(n, heads * d + 3 * d, seed=10)
    positions = torch.stack([torch.arange(n) * 3, torch.arange(n) + 1, torch.arange(n) * 2]).to(DEVICE)
    cos, sin = mrope_cos_sin(positions, d, 1e4, (2, 3, 3), DT)
    qk = qkv[:, : heads * d].view(n, heads, d)
    ref = apply_rope(qk.clone(), cos, sin)
    tail = qkv[:, heads * d :].clone()
    out = _ops().rope(qk, cos, sin)
    assert out.data_ptr() == qk.data_ptr()
    assert rel_err(qk, ref) < TOL
    assert torch.equal(qkv[:, heads * d :], tail), "columns past q|k changed"


@pytest.mark.parametrize(
    ("head_dim", "theta", "section", "n"),
    [(16, 1e4, (2, 3, 3), 37), (128, 1e6, (16, 24, 24), 5), (12, 1e4, (2, 2, 2), 1)],
)
def test_mrope_cos_sin_table_equals_plain_code(head_dim, theta, section, n) -> None:
    """One launch for the cos/sin tables, against the plain code: different positions on the three axes
    (image tokens), large positions (long streams), sections that are not powers of two, a row count
    that is not a multiple of the kernel's row block, and a head dim whose half is not a power of two."""
    g = torch.Generator().manual_seed(n)
    positions = torch.randint(0, 300_000, (3, n), generator=g).to(DEVICE)
    positions[:, 0] = torch.tensor([0, 7, 3])
    ops = _ops()
    cos, sin = ops.mrope_cos_sin(positions, head_dim, theta, section, DT)
    cos_ref, sin_ref = mrope_cos_sin(positions, head_dim, theta, section, DT)
    assert cos.shape == sin.shape == (n, head_dim) and cos.dtype == sin.dtype == DT
    for got, ref in ((cos, cos_ref), (sin, sin_ref)):
        if HAS_CUDA:  # CUDA's cosf/sinf on the same fp32 angles, rounded once: the same bits
            assert torch.equal(got, ref)
        else:  # numpy's float32 cos/sin against torch's CPU ones: an ulp of fp32 apart at most
            assert (got - ref).abs().max().item() < 1e-5
    # positions whose row is a view with a row stride: the plain code must still be used or matched
    wide = torch.zeros((3, n + 4), dtype=torch.int64, device=DEVICE)
    wide[:, 2 : 2 + n] = positions
    cos_w, _ = ops.mrope_cos_sin(wide[:, 2 : 2 + n], head_dim, theta, section, DT)
    assert torch.equal(cos_w, cos)


@pytest.mark.parametrize(("n", "hidden"), [(1, 48), (5, 5000), (37, 64)])
def test_embedding_gather_in_the_rope_table_launch(n: int, hidden: int) -> None:
    """The embedding rows gathered in the rope-table launch: exactly table[ids] (a table with a row
    stride, repeated ids, the last row, a hidden size past one 4096-wide block), and the same tables
    as mrope_cos_sin; with positions the kernel does not take, the plain code's tables and the
    embedding op."""
    g = torch.Generator().manual_seed(n)
    vocab = 300
    table = _strided(_randn(vocab, hidden, seed=n), pad=3)
    ids = torch.randint(0, vocab, (n,), generator=g).to(DEVICE)
    ids[0] = vocab - 1
    if n > 2:
        ids[2] = ids[1]
    positions = torch.randint(0, 300_000, (3, n), generator=g).to(DEVICE)
    ops = _ops()
    h, cos, sin = ops.embed_mrope_cos_sin(ids, table, positions, 16, 1e4, (2, 3, 3))
    cos_ref, sin_ref = ops.mrope_cos_sin(positions, 16, 1e4, (2, 3, 3), DT)
    assert h.shape == (n, hidden) and h.dtype == DT
    assert torch.equal(h, table[ids])
    assert torch.equal(cos, cos_ref) and torch.equal(sin, sin_ref)
    wide = torch.zeros((3, n + 4), dtype=torch.int64, device=DEVICE)
    wide[:, 2 : 2 + n] = positions
    h_w, cos_w, _ = ops.embed_mrope_cos_sin(ids, table, wide[:, 2 : 2 + n], 16, 1e4, (2, 3, 3))
    assert torch.equal(h_w, table[ids])
    assert (cos_w - mrope_cos_sin(positions, 16, 1e4, (2, 3, 3), DT)[0]).abs().max().item() < 1e-5


@torch.no_grad()
def test_model_with_fused_ops_tracks_plain_code(tiny_ckpt_dir) -> None:
    """The tiny model (torch backend for the stateful parts) with and without the Triton pointwise ops,
    over a prefill and three decode steps, each against an fp32 oracle: the fused run must be as close
    to it as the plain run (in fp32 both are the oracle up to reduction order). Checks the deferred
    residual adds and every fused call site end to end."""
    from model.backends.torch_backend import TorchBackend
    from model.loader import load_model

    runs = {}
    for name, dtype, fused in (("fused", DT, True), ("plain", DT, False), ("oracle", torch.float32, False)):
        model = load_model(tiny_ckpt_dir, dtype=dtype, device=DEVICE, backend="torch")
        backend = TorchBackend(DEVICE)
        backend.pointwise = _ops() if fused else None
        model.backend = backend
        runs[name] = _prefill_and_decode(model)
    for i in range(5):  # hidden states, then the four state tensors
        oracle = runs["oracle"][i]
        err_fused, err_plain = rel_err(runs["fused"][i], oracle), rel_err(runs["plain"][i], oracle)
        assert err_fused <= 2 * err_plain + 1e-5, (i, err_fused, err_plain)


def _prefill_and_decode(model) -> list[torch.Tensor]:
    from model.batch import BatchMeta
    from model.state import allocate_state

    slots, prompt = [2, 0], [5, 9]
    state = allocate_state(model.config.text, 3, torch.float32, model.dtype, DEVICE)
    ids = torch.arange(3, 3 + sum(prompt), device=DEVICE)
    pos = torch.cat([torch.arange(n) for n in prompt]).to(DEVICE).expand(3, -1)
    outs = [model(ids, pos, BatchMeta.build(slots, prompt, [0, 0], DEVICE), state)]
    for step in range(3):
        ctx = [n + step for n in prompt]
        ids = torch.tensor([7 + step, 40 + step], device=DEVICE)
        pos = torch.tensor(ctx, device=DEVICE).expand(3, -1)
        outs.append(model(ids, pos, BatchMeta.build(slots, [1, 1], ctx, DEVICE), state))
    return [torch.cat(outs)] + [t[:, slots] for t in (state.recurrent, state.conv, state.key, state.value)]


def test_vision_rope_on_qkv_columns() -> None:
    """The vision tower's rotary (fp32 math, one rounding) on q|k of a fused qkv row, head dim 80 (not a
    power of two), against transformers' apply_rotary_pos_emb_vision; v stays untouched."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    n, heads, d = 7, 3, 80
    qkv = _randn(n, 3 * heads * d, seed=11, scale=2.0).view(n, 3, heads, d)
    angles = torch.rand(n, d // 2, generator=torch.Generator().manual_seed(3)).to(DEVICE) * 20
    emb = torch.cat([angles, angles], dim=-1)
    cos, sin = emb.cos(), emb.sin()
    ref_q, ref_k = apply_rotary_pos_emb_vision(qkv[:, 0].clone(), qkv[:, 1].clone(), cos, sin)
    v = qkv[:, 2].clone()
    qk = qkv.view(n, 3 * heads, d)[:, : 2 * heads]
    out = _ops().vision_rope(qk, cos, sin)
    assert out.data_ptr() == qk.data_ptr()
    assert rel_err(qkv[:, 0], ref_q) < TOL and rel_err(qkv[:, 1], ref_k) < TOL
    assert torch.equal(qkv[:, 2], v), "v columns changed"


@torch.no_grad()
def test_vision_tower_with_fused_ops_tracks_stock_code(tiny_ckpt_dir) -> None:
    """The tiny vision tower on two images of different grids (full and window attention, unequal
    segments) with the Triton ops and with transformers' code, each against an fp32 oracle: the fused
    run must be as close to it as the stock run."""
    from model.loader import load_model

    grid = torch.tensor([[1, 8, 8], [1, 4, 12]])
    outs = {}
    pixels = None
    for name, dtype, fused in (("fused", DT, True), ("stock", DT, False), ("oracle", torch.float32, False)):
        model = load_model(tiny_ckpt_dir, dtype=dtype, device=DEVICE, backend="torch")
        if pixels is None:
            cfg = model.config.vision
            width = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2
            pixels = _randn(int(grid.prod(-1).sum()), width, seed=12).float()
        model.backend.pointwise = _ops() if fused else None
        outs[name] = model.encode_vision(pixels, grid)
    err_fused = rel_err(outs["fused"], outs["oracle"])
    err_stock = rel_err(outs["stock"], outs["oracle"])
    assert err_fused <= 2 * err_stock + 1e-5, (err_fused, err_stock)
