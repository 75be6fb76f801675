"""Build the tiny checkpoint's tokenizer and processor files, deterministically, with no download.

A small byte-level BPE (Qwen2 pre-tokenizer) is trained on an embedded English corpus plus text generated
from a seeded RNG; the 22 real Qwen2.5-VL special tokens follow the BPE vocabulary in their real order
(spec 7.3), so their relative ids match 151643..151664. The chat template is the Qwen2.5-VL layout of
spec 7.4, and the image/video processor files carry the settings of spec 7.1.

Same seed -> byte-identical files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

# Qwen2 pre-tokenisation regex (contractions, letter runs, single digits, punctuation runs, newlines, spaces).
PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# Real Qwen2.5-VL added tokens in id order (151643..151664); True: special (skipped when decoding with
# skip_special_tokens). The last eight are ordinary added tokens in the release, so tool-call tags survive.
SPECIAL_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)

# `additional_special_tokens` of the Qwen2.5-VL tokenizer_config (the role markers and vision tokens).
EXTRA_SPECIAL_TOKENS: tuple[str, ...] = tuple(t for t, _ in SPECIAL_TOKENS[1:14])

BPE_VOCAB_SIZE = 3328  # 256 byte symbols + about 3070 merges (fewer if the corpus runs out of pairs)
MODEL_MAX_LENGTH = 131072
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

# Qwen2.5-VL chat template (spec 7.4), written for this project.
CHAT_TEMPLATE = (
    "{% set counts = namespace(image=0, video=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% elif message['content'] is not none %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' or 'image' in item or 'image_url' in item %}"
    "{% set counts.image = counts.image + 1 %}"
    "{% if add_vision_id %}Picture {{ counts.image }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'video' or 'video' in item %}"
    "{% set counts.video = counts.video + 1 %}"
    "{% if add_vision_id %}Video {{ counts.video }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in item %}"
    "{{ item['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% endif %}"
)

_CORPUS = """\
The morning train left the station a few minutes late, and nobody seemed to mind. Outside the window the
fields were still grey with frost, and a thin line of smoke rose from a farmhouse chimney. A woman in a red
coat read a newspaper; a child pressed his face against the glass and counted the cows.
Language models read text as a sequence of tokens. A tokenizer splits the text into pieces that appear
often, so that common words become a single token and rare words are spelled out from smaller parts.
Byte-level tokenizers never fail: every string, in any language, can be written as a list of bytes.
What is in this picture? The picture shows a small wooden boat tied to a pier at sunset. The water is calm,
the sky is orange and purple, and two birds fly low over the lake. In the background there are hills
covered with pine trees, and a house with a light in one window.
Describe the video in one sentence. A dog runs across a park, catches a yellow ball, and brings it back to
its owner, who laughs and throws it again.
Please answer the question step by step. First, read the table carefully. Second, find the row for the year
2021. Third, add the numbers in the second and third columns. The answer is 4,512.
You are a helpful assistant. I'm happy to help! Here is a short summary of the article: the city council
voted to build a new library, which will open next spring and will include a children's reading room, a
café, and free study spaces for students.
def fibonacci(n: int) -> int:
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)
for i in range(10):
    print(i, fibonacci(i))
{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
The weather today is sunny with a high of 24 degrees and a low of 13 degrees. Tomorrow it will rain in the
afternoon, so remember to take an umbrella. Winds will be light, from the south-west.
Science is a way of asking questions about the world and testing the answers. A good experiment changes one
thing at a time, measures the result, and is repeated so that chance does not fool us. When the results
disagree with the theory, the theory must change.
She opened the old letter slowly. "Dear Anna," it began, "I hope this finds you well. The garden is full of
roses this year, and the apple tree we planted has finally given fruit." Anna smiled and kept reading.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 16 24 32 64 100 128 256 512 1024 2048 3.14159 2.71828 1e-6 50% $19.99
Dates: January 1, 2024; 2025-03-14; Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday.
Questions and answers help people learn. Why is the sky blue? Because air scatters blue light more than red
light. How many legs does a spider have? Eight. Where is the Eiffel Tower? It is in Paris, France.
"""

_WORD_TEXT = (
    "the a an of to and in is was for on that with as it at by from this be are or have not but had his her "
    "they you we he she which one all were there when can more if will would what about up out some so them "
    "time people year way day man woman child world life hand part place case week system program question "
    "work number night point home water room mother area money story fact month lot right study book eye job "
    "word business issue side kind head house service friend father power hour game line end member law car "
    "city community name president team minute idea kid body information back parent face others level office "
    "door health person art war history party result change morning reason research girl guy moment air "
    "teacher force education image video picture frame camera scene color red green blue yellow black white "
    "small large big old new young long short high low good bad first last early late happy sad quick slow "
    "see look watch show describe explain answer ask tell say think know find give take make go come run walk"
)
_WORDS = tuple(_WORD_TEXT.split())


_ONSETS = (
    "",
    "b",
    "c",
    "d",
    "f",
    "g",
    "h",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "w",
    "br",
    "ch",
    "cl",
    "dr",
    "fl",
    "gr",
    "pl",
    "pr",
    "sh",
    "st",
    "th",
    "tr",
)
_NUCLEI = ("a", "e", "i", "o", "u", "ai", "ea", "ee", "ie", "oo", "ou", "y")
_CODAS = ("", "", "n", "r", "s", "t", "l", "m", "nd", "ng", "nt", "st", "ck", "ght", "rd")


def _pseudo_lexicon(rng: random.Random, size: int) -> list[str]:
    """`size` distinct pronounceable pseudo-words of 1-3 syllables (extra BPE merge material)."""
    words: dict[str, None] = {}
    while len(words) < size:
        syllables = [
            rng.choice(_ONSETS) + rng.choice(_NUCLEI) + rng.choice(_CODAS) for _ in range(rng.randint(1, 3))
        ]
        words["".join(syllables)] = None
    return list(words)


def _generated_text(rng: random.Random, num_sentences: int) -> str:
    """Pseudo-English sentences, numbers and small code/JSON fragments drawn from `rng`."""
    lexicon = list(_WORDS) + _pseudo_lexicon(rng, 2500)
    # Zipf-like weights: early (real) words are frequent, the pseudo-word tail is rare.
    weights = [1.0 / (rank + 10) for rank in range(len(lexicon))]
    lines = []
    for _ in range(num_sentences):
        kind = rng.random()
        if kind < 0.8:
            words = rng.choices(lexicon, weights=weights, k=rng.randint(4, 16))
            words[0] = words[0].capitalize()
            lines.append(" ".join(words) + rng.choice([".", ".", "?", "!", ",", ";"]))
        elif kind < 0.92:
            lines.append(f"{rng.randint(0, 9999)} {rng.choice(lexicon)} = {rng.random():.4f}")
        else:
            key, value = rng.choice(lexicon), rng.choice(_WORDS)
            lines.append(f'{{"{key}": "{value}", "count": {rng.randint(0, 99)}}}')
    return "\n".join(lines)


def _training_texts(seed: int) -> list[str]:
    rng = random.Random(seed)
    return _CORPUS.split("\n") + _generated_text(rng, 4000).split("\n")


def _configure_qwen2_pipeline(tok: Tokenizer) -> None:
    """NFC normaliser, Qwen2 regex split + byte-level mapping, byte-level decoder (no BOS/EOS added)."""
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)


def build_tokenizer(seed: int = 0) -> Tokenizer:
    """Train the byte-level BPE on the corpus for `seed` and append the special tokens (spec 7.3 order)."""
    tok = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    _configure_qwen2_pipeline(tok)
    trainer = BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(_training_texts(seed), trainer=trainer)
    tok.add_tokens([AddedToken(t, special=s, normalized=False) for t, s in SPECIAL_TOKENS])
    return tok


def token_ids(tok: Tokenizer) -> dict[str, int]:
    """The config.json token-id fields for a tokenizer built by `build_tokenizer`."""
    size = tok.get_vocab_size(with_added_tokens=True)
    ids = {name: tok.token_to_id(name) for name, _ in SPECIAL_TOKENS}
    return {
        "vocab_size": -(-size // 64) * 64,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
    }


def _added_tokens_decoder(tok: Tokenizer) -> dict[str, dict[str, Any]]:
    out = {}
    for name, special in SPECIAL_TOKENS:
        out[str(tok.token_to_id(name))] = {
            "content": name,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
    return out


def tokenizer_config(tok: Tokenizer) -> dict[str, Any]:
    """tokenizer_config.json contents (Qwen2Tokenizer; eos <|im_end|>, pad <|endoftext|>, no BOS/UNK)."""
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": _added_tokens_decoder(tok),
        # transformers 5 reads this as `extra_special_tokens`; a list-valued `extra_special_tokens` key would
        # break transformers 4.x (which expects a dict there), so only the classic key is written.
        "additional_special_tokens": list(EXTRA_SPECIAL_TOKENS),
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": "<|endoftext|>",
        "processor_class": "Qwen2_5_VLProcessor",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def special_tokens_map() -> dict[str, Any]:
    return {
        "additional_special_tokens": list(EXTRA_SPECIAL_TOKENS),
        "eos_token": {
            "content": "<|im_end|>",
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
        },
        "pad_token": {
            "content": "<|endoftext|>",
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
        },
    }


def preprocessor_config() -> dict[str, Any]:
    """Image processor settings of spec 7.1 (Qwen2VLImageProcessor; factor 28)."""
    return {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": list(IMAGE_MEAN),
        "image_processor_type": "Qwen2VLImageProcessor",
        "image_std": list(IMAGE_STD),
        "max_pixels": 12845056,
        "merge_size": 2,
        "min_pixels": 3136,
        "patch_size": 14,
        "processor_class": "Qwen2_5_VLProcessor",
        "resample": 3,
        "rescale_factor": 1 / 255,
        "temporal_patch_size": 2,
    }


def video_preprocessor_config() -> dict[str, Any]:
    """Video processor settings (per-frame pixel bounds 128*28^2 .. 768*28^2, 2 fps)."""
    return {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "do_sample_frames": False,
        "fps": 2.0,
        "image_mean": list(IMAGE_MEAN),
        "image_std": list(IMAGE_STD),
        "max_frames": 768,
        "max_pixels": 602112,
        "merge_size": 2,
        "min_frames": 4,
        "min_pixels": 100352,
        "patch_size": 14,
        "processor_class": "Qwen2_5_VLProcessor",
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"longest_edge": 602112, "shortest_edge": 100352},
        "temporal_patch_size": 2,
        "video_processor_type": "Qwen2VLVideoProcessor",
    }


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")


def write_tokenizer_files(out_dir: Path, seed: int = 0) -> dict:
    """Write tokenizer, chat template and processor files into `out_dir`; return the config token ids.

    Files: tokenizer.json, tokenizer_config.json, special_tokens_map.json, chat_template.jinja,
    preprocessor_config.json, video_preprocessor_config.json, processor_config.json.
    Returns {"vocab_size" (tokenizer size rounded up to a multiple of 64), "bos_token_id", "eos_token_id",
    "pad_token_id", "image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
    "vision_token_id"}.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(seed)
    (out_dir / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n", encoding="utf-8")
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config(tok))
    _write_json(out_dir / "special_tokens_map.json", special_tokens_map())
    (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    _write_json(out_dir / "preprocessor_config.json", preprocessor_config())
    _write_json(out_dir / "video_preprocessor_config.json", video_preprocessor_config())
    _write_json(out_dir / "processor_config.json", {"processor_class": "Qwen2_5_VLProcessor"})
    return token_ids(tok)
