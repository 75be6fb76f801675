"""Projection fusion: same outputs as the unfused model, unchanged names, no duplicated weights;
the rewritten elementwise code (RMSNorm, gates, gated norm) bit-equal to the spec formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from model_helpers import new_state, run_chunks
from safetensors.torch import load_file

from model.backends.torch_backend import TorchBackend
from model.batch import BatchMeta
from model.config import load_config
from model.infinitevl import InfiniteVLForCausalLM
from model.layers import RMSNorm
from model.loader import load_model, load_weights


def _unfused(ckpt, dtype: torch.dtype = torch.float32) -> InfiniteVLForCausalLM:
    """The model loaded without fuse_projections (separate GEMMs, runtime gate constants)."""
    model = InfiniteVLForCausalLM(load_config(ckpt), TorchBackend("cpu")).to(dtype)
    load_weights(model, ckpt)
    model.visual.reset_buffers()
    return model.eval().requires_grad_(False)


def _fused_blocks(model):
    for layer in model.model.layers:
        yield layer.self_attn, layer.mlp


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@torch.no_grad()
def test_fused_logits_match_unfused(tiny_ckpt_dir, tiny_model):
    ref = _unfused(tiny_ckpt_dir)
    assert ref.model.layers[0].mlp.gate_up_weight is None  # really unfused
    ids = torch.randint(0, ref.config.text.vocab_size, (12,), generator=torch.Generator().manual_seed(1))
    chunks = [5, 1, 1, 4, 1]  # prefill, decode, decode, chunk, decode: both backend paths
    h_ref = run_chunks(ref, ids, chunks, new_state(ref))
    h_fused = run_chunks(tiny_model, ids, chunks, new_state(tiny_model))
    torch.testing.assert_close(
        tiny_model.compute_logits(h_fused), ref.compute_logits(h_ref), atol=2e-5, rtol=1e-5
    )


@torch.no_grad()
def test_fused_batched_decode_matches_unfused(tiny_ckpt_dir, tiny_model):
    ref = _unfused(tiny_ckpt_dir)
    outs = []
    for model in (ref, tiny_model):
        state = new_state(model, num_slots=4)
        meta = BatchMeta.build([0, 1, 2], [3, 2, 4], [0, 0, 0])
        model(torch.arange(9), torch.arange(9).expand(3, -1).clone(), meta, state)
        meta = BatchMeta.build([0, 1, 2], [1, 1, 1], [3, 2, 4])
        outs.append(
            model(torch.tensor([7, 8, 9]), torch.tensor([3, 2, 4]).expand(3, -1).clone(), meta, state)
        )
    torch.testing.assert_close(outs[1], outs[0], atol=2e-5, rtol=1e-5)


def test_names_and_state_dict_unchanged(tiny_ckpt_dir, tiny_model):
    ref = _unfused(tiny_ckpt_dir)
    on_disk = set(load_file(str(tiny_ckpt_dir / "model.safetensors")))
    assert set(tiny_model.state_dict()) == set(ref.state_dict()) == on_disk
    fused, unfused = dict(tiny_model.named_parameters()), dict(ref.named_parameters())
    assert fused.keys() == unfused.keys()
    for name, p in fused.items():
        assert p.shape == unfused[name].shape and torch.equal(p, unfused[name]), name


def test_linears_view_the_fused_weights(tiny_model):
    """No second copy: every fused Linear's weight lives in its block's fused tensor, in order."""
    for attn, mlp in _fused_blocks(tiny_model):
        if hasattr(attn, "in_proj_weight"):
            fused, parts = attn.in_proj_weight, attn._parts()
            convs = [attn.q_conv1d, attn.k_conv1d, attn.v_conv1d]
            assert all(_storage(c.weight) == _storage(attn.conv_weight_fused) for c in convs)
        else:
            fused, parts = attn.qkv_weight, attn._parts()
            torch.testing.assert_close(attn.qkv_bias, torch.cat([p.bias for p in parts]), atol=0, rtol=0)
            assert all(_storage(p.bias) == _storage(attn.qkv_bias) for p in parts)
        assert torch.equal(fused, torch.cat([p.weight for p in parts]))
        assert all(_storage(p.weight) == _storage(fused) for p in parts)
        assert all(_storage(p.weight) == _storage(mlp.gate_up_weight) for p in (mlp.gate_proj, mlp.up_proj))


@torch.no_grad()
def test_fuse_is_idempotent_and_writes_go_through(tiny_ckpt_dir):
    model = load_model(tiny_ckpt_dir, dtype=torch.float32, device="cpu", backend="torch")
    gdn = next(layer.self_attn for layer in model.model.layers if layer.is_linear)
    before = gdn.in_proj_weight
    model.fuse_projections()
    assert gdn.in_proj_weight is before
    gdn.k_proj.weight.fill_(0.25)  # an in-place write through the checkpoint-named parameter
    rows = slice(gdn.q_proj.weight.shape[0], 2 * gdn.q_proj.weight.shape[0])
    assert torch.all(gdn.in_proj_weight[rows] == 0.25)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_is_the_spec_formula_bitwise(dtype):
    x = (torch.randn(7, 48, generator=torch.Generator().manual_seed(0)) * 5).to(dtype)
    norm = RMSNorm(48, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(-2, 2, 48))
    x32 = x.float()
    spec = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    assert norm(x).dtype == dtype
    assert torch.equal(norm(x), spec)


@torch.no_grad()
def test_gdn_gates_and_gated_norm_bitwise_in_bf16(tiny_ckpt_dir):
    """Fused (cached fp32 constants, one-kernel cast paths) equal the spec formulas bit for bit."""
    model = _unfused(tiny_ckpt_dir, torch.bfloat16)
    gdn = next(layer.self_attn for layer in model.model.layers if layer.is_linear)
    gen = torch.Generator().manual_seed(3)
    h, dv = gdn.num_heads, gdn.head_v_dim
    a, b = (torch.randn(6, h, generator=gen) * 4).bfloat16(), torch.randn(6, h, generator=gen).bfloat16()
    o, z = torch.randn(6, h, dv, generator=gen).bfloat16(), torch.randn(6, h, dv, generator=gen).bfloat16()
    g_spec = -torch.exp(gdn.A_log.float()) * F.softplus(a.float() + gdn.dt_bias.float())
    beta_spec = torch.sigmoid(b)
    o32 = o.float()
    y_spec = o32 * torch.rsqrt(o32.pow(2).mean(-1, keepdim=True) + gdn.norm_eps)
    y_spec = (y_spec * gdn.o_norm.weight.float() * F.silu(z.float())).bfloat16()
    for fused in (False, True):
        if fused:
            model.fuse_projections()
        g, beta = gdn.gates_from(a, b)
        assert g.dtype == torch.float32 and beta.dtype == torch.bfloat16
        assert torch.equal(g, g_spec) and torch.equal(beta, beta_spec)
        y = gdn.gated_norm(o, z)
        assert y.dtype == torch.bfloat16 and torch.equal(y, y_spec)
