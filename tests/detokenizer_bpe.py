"""A tiny byte-level BPE tokenizer for the detokenizer and stop-condition tests (built, not downloaded)."""

from __future__ import annotations

from functools import lru_cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = [
    "hello world, the quick brown fox jumps over the lazy dog.",
    "café naïve résumé über straße garçon",
    "你好世界，世界你好。中文文本测试",
    "emoji 😀 party 🎉 rocket 🚀 heart ❤️",
    "stop here STOP there. END of story\n\n",
]


@lru_cache(maxsize=1)
def build_tokenizer() -> PreTrainedTokenizerFast:
    """ByteLevel BPE trained on a few lines with accented, CJK and emoji text, plus special tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def byte_token_ids(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    """One token per UTF-8 byte of `text` (the single-byte tokens of the base alphabet)."""
    alphabet = _byte_alphabet()
    return [tokenizer.convert_tokens_to_ids(alphabet[b]) for b in text.encode("utf-8")]


def _byte_alphabet() -> list[str]:
    """GPT-2 byte -> character table, written independently of the code under test."""
    keep = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
    table, extra = [], 0
    for b in range(256):
        if b in keep:
            table.append(chr(b))
        else:
            table.append(chr(256 + extra))
            extra += 1
    return table
