"""The module tree at the release shape matches the spec's checkpoint (names, counts, parameter totals)."""

from __future__ import annotations

import pytest
import torch

from model.backends import TorchBackend, get_backend
from model.config import parse_config
from model.infinitevl import InfiniteVLForCausalLM

RELEASE_CONFIG = {  # spec 2.1 (flat layout; GDN fields absent, class defaults apply)
    "architectures": ["InfiniteVLQwen2_5_VLForConditionalGeneration"],
    "model_type": "infinite_vl",
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 11008,
    "num_hidden_layers": 36,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "default", "rope_type": "default", "mrope_section": [16, 24, 24]},
    "use_sliding_window": True,
    "sliding_window": 8192,
    "tie_word_embeddings": True,
    "vision_config": {
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "out_hidden_size": 2048,
        "tokens_per_second": 2,
    },
}


@pytest.fixture(scope="module")
def release_model() -> InfiniteVLForCausalLM:
    with torch.device("meta"):
        return InfiniteVLForCausalLM(parse_config(RELEASE_CONFIG), TorchBackend())


def _count(params: dict[str, torch.Tensor], prefix: str) -> int:
    return sum(p.numel() for n, p in params.items() if n.startswith(prefix))


def test_release_parameter_counts_match_spec(release_model):
    params = dict(release_model.named_parameters())
    assert len(params) == 986  # spec 3.2: 390 vision + 2 + 9 x 12 + 27 x 18
    assert _count(params, "visual.") == 668_684_288
    assert _count(params, "model.") == 3_739_697_248
    assert _count(params, "model.layers.0.") == 77_076_992
    assert _count(params, "model.layers.1.") == 101_290_272
    assert _count(params, "model.layers.1.self_attn.") == 33_653_024
    assert sum(p.numel() for p in params.values()) == 4_408_381_536


def test_release_gdn_tensor_shapes(release_model):
    params = dict(release_model.named_parameters())
    expected = {
        "q_proj.weight": (2048, 2048),
        "v_proj.weight": (4096, 2048),
        "a_proj.weight": (16, 2048),
        "A_log": (16,),
        "q_conv1d.weight": (2048, 1, 4),
        "v_conv1d.weight": (4096, 1, 4),
        "g_proj.weight": (4096, 2048),
        "o_norm.weight": (256,),
        "o_proj.weight": (2048, 4096),
    }
    for name, shape in expected.items():
        assert tuple(params[f"model.layers.5.self_attn.{name}"].shape) == shape, name
    assert tuple(params["model.layers.4.self_attn.k_proj.bias"].shape) == (256,)
    assert "model.layers.4.self_attn.o_proj.bias" not in params


def test_get_backend():
    assert get_backend("torch", "cpu").name == "torch"
    assert get_backend("auto", "cpu").name == "torch"
    with pytest.raises(ValueError, match="unknown backend"):
        get_backend("cuda-magic", "cpu")
