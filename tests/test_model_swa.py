"""Sliding-window attention: exact window edge, ring cache across calls, and M-RoPE sections."""

from __future__ import annotations

import math

import pytest
import torch
from model_helpers import text_positions

from model.backends.torch_backend import TorchBackend
from model.batch import BatchMeta
from model.layers import apply_rope, mrope_cos_sin

W = 4


def _run_swa(q, k, v, chunks: list[int], slot: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the backend's windowed attention over consecutive calls on one slot of a 3-row ring."""
    key_cache = torch.full((3, W, k.shape[1], k.shape[2]), float("nan"))  # unwritten rows are poison
    value_cache = key_cache.clone()
    outs, done = [], 0
    for n in chunks:
        meta = BatchMeta.build([slot], [n], [done])
        sl = slice(done, done + n)
        outs.append(
            TorchBackend().sliding_window_attention(q[sl], k[sl], v[sl], meta, key_cache, value_cache, 0.5)
        )
        done += n
    return torch.cat(outs), key_cache


@pytest.mark.parametrize("chunks", [[12], [1] * 12, [5, 1, 6], [3, 9], [2, 2, 8]])
def test_window_edge_w_back_invisible_w_minus_1_visible(chunks):
    """Zero queries attend uniformly to the visible keys; values carry a spike at one key j0 and the
    key position, so each output reveals exactly which keys were visible."""
    n, j0 = 12, 3
    q = torch.zeros(n, 2, 4)  # 2 query heads share 1 KV head (GQA)
    k = torch.randn(n, 1, 4, generator=torch.Generator().manual_seed(0))
    v = torch.zeros(n, 1, 4)
    v[:, 0, 0] = torch.arange(n, dtype=torch.float32)
    v[j0, 0, 1] = 1.0
    out, key_cache = _run_swa(q, k, v, chunks)
    assert out[j0 + W - 1, 0, 1] == pytest.approx(1.0 / W)  # key W-1 positions back is visible
    assert out[j0 + W, 0, 1] == 0.0  # key exactly W positions back is not
    for i in range(n):
        visible = range(max(0, i - W + 1), i + 1)
        assert out[i, :, 0].tolist() == pytest.approx([sum(visible) / len(visible)] * 2), i
    for p in range(n - W, n):  # ring: token p at row p % W
        assert torch.equal(key_cache[1, p % W], k[p])
    assert torch.isnan(key_cache[0]).all() and torch.isnan(key_cache[2]).all()


@torch.no_grad()
def test_swa_layer_sees_exactly_w_tokens(tiny_model):
    """On the real layer 0 (W = 16): the token 16 back does not affect the output, 15 back does."""
    cfg = tiny_model.config.text
    window = cfg.sliding_window
    layer = tiny_model.model.layers[0].self_attn
    n = window + 4
    x = torch.randn(n, cfg.hidden_size, generator=torch.Generator().manual_seed(0))

    def last_output(inp: torch.Tensor) -> torch.Tensor:
        kc = torch.zeros(2, window, cfg.num_key_value_heads, cfg.head_dim)
        rope = mrope_cos_sin(text_positions(0, n), cfg.head_dim, cfg.rope_theta, cfg.mrope_section, inp.dtype)
        out = layer(inp, rope, BatchMeta.build([0], [n], [0]), kc, kc.clone(), TorchBackend())
        return out[-1]

    ref = last_output(x)
    far, near = x.clone(), x.clone()
    far[n - 1 - window] += 1.0
    near[n - window] += 1.0
    torch.testing.assert_close(last_output(far), ref, atol=0, rtol=0)
    assert (last_output(near) - ref).abs().max() > 1e-3


def test_mrope_tables_follow_contiguous_sections():
    head_dim, theta, section = 16, 1e6, (2, 3, 3)
    positions = torch.tensor([[0, 5, 9], [1, 7, 2], [4, 3, 11]])  # t, h, w of 3 tokens
    cos, sin = mrope_cos_sin(positions, head_dim, theta, section, torch.float32)
    half = head_dim // 2
    axis = [0] * 2 + [1] * 3 + [2] * 3
    for n in range(3):
        for f in range(half):
            angle = positions[axis[f], n].item() * theta ** (-2 * f / head_dim)
            for col in (f, f + half):
                assert cos[n, col].item() == pytest.approx(math.cos(angle), abs=1e-6)
                assert sin[n, col].item() == pytest.approx(math.sin(angle), abs=1e-6)


def test_rope_rotates_half_split_pairs():
    x = torch.randn(3, 2, 8, generator=torch.Generator().manual_seed(0))
    cos, sin = mrope_cos_sin(text_positions(4, 3), 8, 1e4, (1, 2, 1), torch.float32)
    out = apply_rope(x, cos, sin)
    for f in range(4):
        c, s = cos[:, None, f], sin[:, None, f]
        torch.testing.assert_close(out[..., f], x[..., f] * c - x[..., f + 4] * s)
        torch.testing.assert_close(out[..., f + 4], x[..., f + 4] * c + x[..., f] * s)


def test_mrope_rejects_bad_sections():
    with pytest.raises(ValueError, match="mrope_section"):
        mrope_cos_sin(text_positions(0, 2), 16, 1e6, (2, 2, 2), torch.float32)


def _reference_swa(layer, x: torch.Tensor, positions: torch.Tensor, cfg) -> torch.Tensor:
    """Spec 4.4/4.6 written directly: projections with biases, M-RoPE per frequency slot, GQA with head
    h using KV head h // group, softmax over keys max(0, i-W+1) .. i, o_proj. float64."""
    w = {n: p.detach().double() for n, p in layer.named_parameters()}
    x = x.double()
    n, d, hq, hkv = x.shape[0], cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    q = (x @ w["q_proj.weight"].T + w["q_proj.bias"]).view(n, hq, d)
    k = (x @ w["k_proj.weight"].T + w["k_proj.bias"]).view(n, hkv, d)
    v = (x @ w["v_proj.weight"].T + w["v_proj.bias"]).view(n, hkv, d)
    axis = [a for a, size in enumerate(cfg.mrope_section) for _ in range(size)]

    def rotate(t: torch.Tensor, i: int) -> torch.Tensor:
        out = t.clone()
        for f in range(d // 2):
            phi = positions[axis[f], i].item() * cfg.rope_theta ** (-2 * f / d)
            c, s = math.cos(phi), math.sin(phi)
            out[..., f] = t[..., f] * c - t[..., f + d // 2] * s
            out[..., f + d // 2] = t[..., f + d // 2] * c + t[..., f] * s
        return out

    q = torch.stack([rotate(q[i], i) for i in range(n)])
    k = torch.stack([rotate(k[i], i) for i in range(n)])
    out = torch.zeros(n, hq, d, dtype=torch.float64)
    window, group = cfg.sliding_window, hq // hkv
    for i in range(n):
        keys = range(max(0, i - window + 1), i + 1)
        for h in range(hq):
            scores = torch.stack([q[i, h] @ k[j, h // group] for j in keys]) / math.sqrt(d)
            probs = torch.softmax(scores, dim=0)
            out[i, h] = sum(p * v[j, h // group] for p, j in zip(probs, keys, strict=True))
    return out.reshape(n, hq * d) @ w["o_proj.weight"].T


@torch.no_grad()
def test_swa_layer_matches_direct_reference(tiny_model):
    """Layer 0 over calls of 11, 1, 14 tokens (crossing the 16-token window) vs the direct formula,
    with distinct t/h/w positions so that the M-RoPE sections matter."""
    cfg = tiny_model.config.text
    layer = tiny_model.model.layers[0].self_attn
    n = 26
    x = torch.randn(n, cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    positions = torch.stack([torch.arange(n), torch.arange(n) * 2 % 7, torch.arange(n) * 3 % 11])
    ref = _reference_swa(layer, x, positions, cfg)
    kc = torch.zeros(2, cfg.sliding_window, cfg.num_key_value_heads, cfg.head_dim)
    vc = kc.clone()
    outs, done = [], 0
    for m in (11, 1, 14):
        pos = positions[:, done : done + m]
        rope = mrope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, cfg.mrope_section, x.dtype)
        outs.append(
            layer(x[done : done + m], rope, BatchMeta.build([1], [m], [done]), kc, vc, TorchBackend())
        )
        done += m
    torch.testing.assert_close(torch.cat(outs).double(), ref, atol=1e-4, rtol=1e-4)
