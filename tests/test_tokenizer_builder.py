"""Generated tokenizer: determinism, special tokens (ids, order, roles), byte-level round trips, configs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from model.tokenizer_builder import SPECIAL_TOKENS, write_tokenizer_files

# Real Qwen2.5-VL ids (spec 7.3); the generated tokenizer keeps their order with an offset.
REAL_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647,
    "<|box_start|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
    "<tool_call>": 151657,
    "</tool_call>": 151658,
    "<|fim_prefix|>": 151659,
    "<|fim_middle|>": 151660,
    "<|fim_suffix|>": 151661,
    "<|fim_pad|>": 151662,
    "<|repo_name|>": 151663,
    "<|file_sep|>": 151664,
}
FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "processor_config.json",
)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("tok")
    return out, write_tokenizer_files(out, seed=0)


@pytest.fixture(scope="module")
def tok(built):
    return AutoTokenizer.from_pretrained(str(built[0]))


def test_same_seed_gives_identical_files(built, tmp_path):
    again = tmp_path / "again"
    assert write_tokenizer_files(again, seed=0) == built[1]
    for name in FILES:
        assert (again / name).read_bytes() == (built[0] / name).read_bytes(), name


def test_other_seed_changes_the_vocabulary(built, tmp_path):
    write_tokenizer_files(tmp_path / "s1", seed=1)
    assert (tmp_path / "s1" / "tokenizer.json").read_bytes() != (built[0] / "tokenizer.json").read_bytes()


def test_special_tokens_follow_bpe_vocab_in_real_order(built, tok):
    assert [t for t, _ in SPECIAL_TOKENS] == list(REAL_IDS)
    first = tok.convert_tokens_to_ids("<|endoftext|>")
    assert first == len(tok) - len(REAL_IDS)  # right after the BPE vocabulary
    for token, real_id in REAL_IDS.items():
        assert tok.encode(token, add_special_tokens=False) == [first + real_id - 151643], token


def test_returned_ids_and_vocab_size(built, tok):
    ids = built[1]
    assert ids["vocab_size"] % 64 == 0 and len(tok) <= ids["vocab_size"] < len(tok) + 64
    assert 2000 <= len(tok) - len(REAL_IDS) <= 4400  # BPE part: 256 bytes + about 2000-4000 merges
    name = {
        "bos_token_id": "<|endoftext|>",
        "pad_token_id": "<|endoftext|>",
        "eos_token_id": "<|im_end|>",
        "image_token_id": "<|image_pad|>",
        "video_token_id": "<|video_pad|>",
        "vision_start_token_id": "<|vision_start|>",
        "vision_end_token_id": "<|vision_end|>",
        "vision_token_id": "<|vision_pad|>",
    }
    for key, token in name.items():
        assert ids[key] == tok.convert_tokens_to_ids(token), key


def test_roles_and_no_bos(tok):
    assert tok.eos_token == "<|im_end|>"
    assert tok.pad_token == "<|endoftext|>"
    assert tok.bos_token is None
    assert set(tok.all_special_tokens) == {t for t, special in SPECIAL_TOKENS if special}
    text = "Hello world"
    ids = tok(text)["input_ids"]
    assert ids == tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text


def test_tool_call_tags_survive_skip_special_tokens(tok):
    ids = tok.encode("<|im_start|>assistant\n<tool_call>{}</tool_call><|im_end|>", add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\n<tool_call>{}</tool_call>"


@pytest.mark.parametrize(
    "text",
    [
        "The quick brown fox.",
        "naïve café — 日本語 🎉",
        "  leading spaces\n\ttabs\r\n",
        "x = [1, 2, 3]  # 1e-6",
    ],
)
def test_byte_level_round_trip(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text


def test_common_words_are_single_tokens(tok):
    for word in (" the", " picture", " video", "The"):
        assert len(tok.encode(word, add_special_tokens=False)) == 1, word


def test_processor_configs(built):
    image = json.loads((built[0] / "preprocessor_config.json").read_text())
    assert (image["min_pixels"], image["max_pixels"]) == (3136, 12845056)
    assert (image["patch_size"], image["temporal_patch_size"], image["merge_size"], image["resample"]) == (
        14,
        2,
        2,
        3,
    )
    assert image["image_mean"] == [0.48145466, 0.4578275, 0.40821073]
    assert image["image_std"] == [0.26862954, 0.26130258, 0.27577711]
    video = json.loads((built[0] / "video_preprocessor_config.json").read_text())
    assert (video["min_pixels"], video["max_pixels"], video["fps"]) == (100352, 602112, 2.0)
    config = json.loads((built[0] / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "Qwen2Tokenizer"
    assert config["chat_template"] == (built[0] / "chat_template.jinja").read_text()


def test_identical_across_processes(built, tmp_path):
    # A fresh interpreter (new hash seeds in Python and in the Rust trainer) writes the same tokenizer.json.
    code = "import sys; from pathlib import Path; from model.tokenizer_builder import write_tokenizer_files as w; w(Path(sys.argv[1]))"
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=str(root))
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "p")], check=True, env=env, cwd=root)
    assert (tmp_path / "p" / "tokenizer.json").read_bytes() == (built[0] / "tokenizer.json").read_bytes()
