"""Checkpoint loading: both name layouts, shards, strictness, bf16, and the tiny checkpoint itself."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from model_helpers import new_state, run_chunks
from safetensors.torch import load_file, save_file

from model.loader import load_model, normalise_name, resolve_model_dir
from model.tiny import default_tiny_checkpoint_dir, write_tiny_checkpoint


def _copy_with_tensors(src: Path, dst: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """A copy of checkpoint `src` whose weights are replaced by `tensors` (one file)."""
    shutil.copytree(src, dst)
    (dst / "model.safetensors").unlink()
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "model.safetensors"))


def _new_layout(name: str) -> str:
    if name.startswith("visual."):
        return "model." + name
    return "model.language_model." + name[len("model.") :]


def _assert_same_parameters(a, b) -> None:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name


def test_legacy_names_are_the_module_paths(tiny_ckpt_dir, tiny_model):
    names = set(_weights(tiny_ckpt_dir))
    assert names == set(dict(tiny_model.named_parameters()))
    assert "lm_head.weight" not in names
    assert "model.layers.1.self_attn.q_conv1d.weight" in names and "visual.merger.mlp.2.bias" in names


def test_normalise_name():
    assert (
        normalise_name("model.language_model.layers.3.mlp.up_proj.weight")
        == "model.layers.3.mlp.up_proj.weight"
    )
    assert normalise_name("model.visual.blocks.0.attn.qkv.bias") == "visual.blocks.0.attn.qkv.bias"
    assert normalise_name("model.norm.weight") == "model.norm.weight"
    assert normalise_name("visual.patch_embed.proj.weight") == "visual.patch_embed.proj.weight"


def test_new_layout_with_lm_head_loads_identically(tiny_ckpt_dir, tiny_model, tmp_path):
    weights = {_new_layout(k): v for k, v in _weights(tiny_ckpt_dir).items()}
    weights["lm_head.weight"] = torch.randn_like(weights["model.language_model.embed_tokens.weight"])
    ckpt = _copy_with_tensors(tiny_ckpt_dir, tmp_path / "new", weights)
    model = load_model(ckpt, dtype=torch.float32, backend="torch")
    _assert_same_parameters(model, tiny_model)
    hidden = run_chunks(model, torch.arange(5), [5], new_state(model))
    torch.testing.assert_close(  # the embedding wins over lm_head.weight
        model.compute_logits(hidden), hidden @ model.model.embed_tokens.weight.T, atol=0, rtol=0
    )


def test_sharded_checkpoint(tiny_ckpt_dir, tiny_model, tmp_path):
    ckpt = tmp_path / "sharded"
    shutil.copytree(tiny_ckpt_dir, ckpt)
    (ckpt / "model.safetensors").unlink()
    weights = _weights(tiny_ckpt_dir)
    names = sorted(weights)
    weight_map = {}
    for i in range(3):
        shard = f"model-{i + 1:05d}-of-00003.safetensors"
        part = {n: weights[n] for n in names[i::3]}
        save_file(part, str(ckpt / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _assert_same_parameters(load_model(ckpt, dtype=torch.float32, backend="torch"), tiny_model)


@pytest.mark.parametrize(
    "edit, message",
    [
        ("missing", "missing tensor 'model.layers.2.self_attn.A_log'"),
        ("extra", "unexpected tensor 'model.layers.0.self_attn.rotary.inv_freq'"),
        ("shape", "tensor 'model.layers.1.self_attn.o_norm.weight' has shape"),
        ("duplicate", "'model.norm.weight' appears twice"),
    ],
)
def test_strict_loading_names_the_tensor(tiny_ckpt_dir, tmp_path, edit, message):
    weights = _weights(tiny_ckpt_dir)
    if edit == "missing":
        del weights["model.layers.2.self_attn.A_log"]
    elif edit == "extra":
        weights["model.layers.0.self_attn.rotary.inv_freq"] = torch.zeros(8)
    elif edit == "shape":
        weights["model.layers.1.self_attn.o_norm.weight"] = torch.ones(16, dtype=torch.bfloat16)
    else:
        weights["model.language_model.norm.weight"] = weights["model.norm.weight"].clone()
    ckpt = _copy_with_tensors(tiny_ckpt_dir, tmp_path / edit, weights)
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        load_model(ckpt, dtype=torch.float32, backend="torch")


@torch.no_grad()
def test_bf16_load_runs(tiny_ckpt_dir, tiny_model):
    model = load_model(tiny_ckpt_dir, backend="torch")
    assert model.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    ids = torch.arange(20, 40)
    hidden = run_chunks(model, ids, [13, 7], new_state(model))
    assert hidden.dtype == torch.bfloat16
    logits = model.compute_logits(hidden)
    ref = tiny_model.compute_logits(run_chunks(tiny_model, ids, [20], new_state(tiny_model)))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    rel = (logits - ref).norm() / ref.norm()
    assert rel < 0.1  # bf16 noise only
    feats = model.encode_vision(torch.randn(24, 1176), torch.tensor([[1, 4, 6]]))
    assert feats.shape == (6, 64) and feats.dtype == torch.bfloat16


def test_tiny_checkpoint_is_deterministic(tiny_ckpt_dir, tmp_path):
    again = write_tiny_checkpoint(tmp_path / "again", seed=0)
    files = sorted(p.name for p in tiny_ckpt_dir.iterdir())
    assert files == sorted(p.name for p in again.iterdir())
    for name in files:
        assert (tiny_ckpt_dir / name).read_bytes() == (again / name).read_bytes(), name
    other = write_tiny_checkpoint(tmp_path / "other", seed=1)
    assert (other / "model.safetensors").read_bytes() != (again / "model.safetensors").read_bytes()


def test_tiny_config_is_flat_release_layout(tiny_ckpt_dir):
    raw = json.loads((tiny_ckpt_dir / "config.json").read_text())
    assert "text_config" not in raw and raw["model_type"] == "infinite_vl"
    assert raw["architectures"] == ["InfiniteVLQwen2_5_VLForConditionalGeneration"]
    assert raw["use_cache"] is False and raw["rope_scaling"]["mrope_section"] == [2, 3, 3]
    assert raw["vision_config"]["fullatt_block_indexes"] == [1]
    gen = json.loads((tiny_ckpt_dir / "generation_config.json").read_text())
    assert raw["eos_token_id"] in gen["eos_token_id"]


def test_default_tiny_dir_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("INFINITEVL_CACHE", str(tmp_path))
    first = default_tiny_checkpoint_dir()
    assert first == tmp_path / "tiny-seed0" and (first / "model.safetensors").exists()
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert default_tiny_checkpoint_dir() == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-seed0"]  # no temp dirs left behind


def test_resolve_model_dir(tiny_ckpt_dir, tmp_path, monkeypatch):
    assert resolve_model_dir(str(tiny_ckpt_dir)) == tiny_ckpt_dir
    with pytest.raises(FileNotFoundError):
        resolve_model_dir(str(tmp_path / "does-not-exist"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    with pytest.raises(FileNotFoundError, match="someone/not-cached"):
        resolve_model_dir("someone/not-cached")
