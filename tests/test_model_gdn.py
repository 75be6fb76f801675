"""Gated DeltaNet layer against a direct per-token implementation of spec section 4.7, written here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model.backends.torch_backend import TorchBackend
from model.batch import BatchMeta


def reference_gdn(layer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spec 4.7 steps 1-8 for one fresh sequence x [T, hidden], one token and one head at a time.

    Returns (output [T, hidden], final S [H, d_k, d_v], last K pre-conv inputs [conv_dim, K]).
    """
    x = x.double()
    w = {n: p.detach().double() for n, p in layer.named_parameters()}
    H, dk, dv = layer.num_heads, layer.head_k_dim, layer.head_v_dim
    T = x.shape[0]
    streams = {n: x @ w[f"{n}_proj.weight"].T for n in "qkv"}  # step 1
    a, b, z = x @ w["a_proj.weight"].T, x @ w["b_proj.weight"].T, x @ w["g_proj.weight"].T
    conv = {}
    for n in "qkv":  # step 2: u[t, c] = silu(sum_j w[c, 0, j] s[t - K + 1 + j, c]), zeros before t = 0
        kern, s = w[f"{n}_conv1d.weight"][:, 0, :], streams[n]
        K = kern.shape[1]
        u = torch.zeros_like(s)
        for t in range(T):
            for j in range(K):
                src = t - (K - 1) + j
                if src >= 0:
                    u[t] += kern[:, j] * s[src]
        conv[n] = F.silu(u)
    q = conv["q"].view(T, H, dk)
    k = conv["k"].view(T, H, dk)
    v = conv["v"].view(T, H, dv)
    beta = torch.sigmoid(b)
    g = -torch.exp(w["A_log"]) * F.softplus(a + w["dt_bias"])
    out = torch.zeros(T, H, dv, dtype=torch.float64)
    S = torch.zeros(H, dk, dv, dtype=torch.float64)
    for t in range(T):
        for h in range(H):
            qh = q[t, h] / math.sqrt((q[t, h] ** 2).sum() + 1e-6)
            kh = k[t, h] / math.sqrt((k[t, h] ** 2).sum() + 1e-6)
            decayed = math.exp(g[t, h]) * S[h]
            S[h] = decayed + torch.outer(kh, beta[t, h] * (v[t, h] - decayed.T @ kh))
            out[t, h] = S[h].T @ (qh / math.sqrt(dk))
    zz = z.view(T, H, dv)
    normed = out / torch.sqrt((out**2).mean(-1, keepdim=True) + layer.norm_eps)
    y = normed * w["o_norm.weight"] * zz * torch.sigmoid(zz)
    final = y.reshape(T, H * dv) @ w["o_proj.weight"].T
    pre_conv = torch.cat([streams[n] for n in "qkv"], dim=-1)  # [T, conv_dim]
    return final, S, pre_conv[-4:].T


@torch.no_grad()
@pytest.mark.parametrize("fused_norm", [False, True])
@pytest.mark.parametrize("gates_in_rule", [False, True])
def test_gdn_layer_matches_per_token_reference(tiny_model, fused_norm: bool, gates_in_rule: bool):
    """fused_norm: the backend normalises q and k in short_conv (the GPU kernels' path) instead of in
    gated_delta_rule; gates_in_rule: the model hands gated_delta_rule the gate inputs instead of g and
    beta (the GPU decode path). The layer must give the same result every way."""
    layer = tiny_model.model.layers[1].self_attn
    assert layer.neg_exp_a is not None  # fused constants: the path that can pass gate inputs
    hidden = tiny_model.config.text.hidden_size
    x = torch.randn(23, hidden, generator=torch.Generator().manual_seed(0))
    ref, ref_S, ref_conv = reference_gdn(layer, x)

    backend = TorchBackend("cpu")
    backend.qk_l2norm_in_conv = lambda meta: fused_norm  # prefill and decode calls alike
    backend.gates_in_delta_rule = lambda meta: gates_in_rule
    conv_state = torch.zeros(3, tiny_model.config.text.conv_dim, 4)
    rec_state = torch.zeros(3, layer.num_heads, layer.head_k_dim, layer.head_v_dim)
    outs, done = [], 0
    for n in (5, 1, 9, 1, 7):  # carried state across calls of uneven sizes
        meta = BatchMeta.build([1], [n], [done])
        outs.append(layer(x[done : done + n], meta, conv_state, rec_state, backend))
        done += n
    out = torch.cat(outs)
    assert ref.abs().max() > 0.1  # the comparison is not between near-zero tensors
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rec_state[1].double(), ref_S, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(conv_state[1].double(), ref_conv, atol=1e-5, rtol=1e-4)
    assert rec_state[0].abs().max() == 0 and rec_state[2].abs().max() == 0


@torch.no_grad()
def test_bf16_recurrent_state_is_stored_in_pool_dtype(tiny_model):
    layer = tiny_model.model.layers[2].self_attn
    x = torch.randn(6, tiny_model.config.text.hidden_size, generator=torch.Generator().manual_seed(1))
    conv_state = torch.zeros(2, tiny_model.config.text.conv_dim, 4)
    rec32 = torch.zeros(2, layer.num_heads, layer.head_k_dim, layer.head_v_dim)
    rec16 = rec32.to(torch.bfloat16)
    meta = BatchMeta.build([0], [6], [0])
    a = layer(x, meta, conv_state.clone(), rec32, TorchBackend())
    b = layer(x, meta, conv_state.clone(), rec16, TorchBackend())
    assert rec16.dtype == torch.bfloat16
    torch.testing.assert_close(a, b)  # the recurrence itself runs in fp32 within a call
    torch.testing.assert_close(rec16[0].float(), rec32[0], atol=1e-2, rtol=1e-2)


def test_short_conv_l2norm_needs_the_q_k_parts():
    meta = BatchMeta.build([0], [3], [0])
    x, w, state = torch.randn(3, 8), torch.randn(8, 4), torch.zeros(2, 8, 4)
    with pytest.raises(ValueError, match="split_sizes"):
        TorchBackend().short_conv(x, w, meta, state, None, 4)
