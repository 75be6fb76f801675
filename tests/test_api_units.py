"""Unit tests of the API layer's pure pieces: settings from flags, message translation, error params,
sampling translation, logprob formats."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import pytest
from fake_engine import FakeProcessor
from pydantic import ValidationError

from api import chat as api_chat
from api.chat import build_sampling, param_of, prepare_chat, prepare_completion, to_template
from api.errors import APIError, loc_to_param, validation_error
from api.logprobs import legacy_logprobs
from api.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest
from api.responses import openai_finish_reason
from api.settings import ServerSettings, add_server_args, settings_from_args
from serving.types import LogprobEntry, TokenLogprob


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    add_server_args(p)
    return p.parse_args(argv)


def test_settings_from_args(monkeypatch, tmp_path):
    monkeypatch.setenv("INFINITEVL_API_KEY", "k2, k3,")
    args = parse(
        [
            "--served-model-name",
            "vl",
            "--api-key",
            "k1",
            "--api-key",
            "k2",
            "--max-request-bytes",
            "2048",
            "--max-images-per-request",
            "3",
            "--allowed-local-media-path",
            str(tmp_path),
        ]
    )
    s = settings_from_args(args, model_path="/ckpt")
    assert s.served_model_name == "vl" and s.model_path == "/ckpt"
    assert s.api_keys == ("k1", "k2", "k3")
    assert s.max_request_body_bytes == 2048
    assert s.media.max_images_per_request == 3
    assert s.media.allowed_local_media_path is not None
    assert s.allowed_local_media_path == s.media.allowed_local_media_path


def test_settings_default_name(monkeypatch):
    monkeypatch.delenv("INFINITEVL_API_KEY", raising=False)
    s = settings_from_args(parse([]), model_path="/ckpt")
    assert s.served_model_name == "/ckpt" and s.api_keys == () and s.open_health_and_metrics


def test_to_template_order_and_roles():
    msgs = [
        ChatMessage.model_validate({"role": "developer", "content": "rules", "name": "x"}),
        ChatMessage.model_validate(
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "a"},
                    {"type": "image_url", "image_url": {"url": "u1"}},
                    {"type": "video_url", "video_url": {"url": "v1", "fps": 1.0}},
                    {"type": "image_url", "image_url": {"url": "u2"}},
                ],
            }
        ),
        ChatMessage.model_validate({"role": "assistant", "content": [{"type": "text", "text": "ok"}]}),
        ChatMessage.model_validate({"role": "user", "content": "more"}),
    ]
    t = to_template(msgs)
    assert t.messages[0] == {"role": "system", "content": "rules"}
    assert t.messages[1]["content"] == [
        {"type": "text", "text": "a"},
        {"type": "image"},
        {"type": "video"},
        {"type": "image"},
    ]
    assert t.messages[2] == {"role": "assistant", "content": "ok"}
    assert [(m.kind, m.url) for m in t.media] == [("image", "u1"), ("video", "v1"), ("image", "u2")]
    assert t.media[1].fps == 1.0 and t.media[2].param == "messages.1.content.3.image_url.url"


def test_to_template_rejects_tool_calls():
    msgs = [
        ChatMessage.model_validate({"role": "user", "content": "a"}),
        ChatMessage.model_validate({"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}),
        ChatMessage.model_validate({"role": "user", "content": "b"}),
    ]
    with pytest.raises(APIError) as e:
        to_template(msgs)
    assert e.value.status_code == 400 and e.value.param == "messages.1.tool_calls"


def test_loc_to_param():
    assert loc_to_param(("body", "messages", 0, "content")) == "messages.0.content"
    assert loc_to_param(("messages", 0, "content", "list[...]", 1, "image_url", "image_url", "url")) == (
        "messages.0.content.1.image_url.url"
    )
    assert loc_to_param(()) is None


def _settings(**kw) -> ServerSettings:
    return ServerSettings(served_model_name="m", model_path="p", **kw)


def test_build_sampling_chat():
    req = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "x"}],
            "max_completion_tokens": 7,
            "max_tokens": 99,
            "stop": "END",
            "logprobs": True,
            "top_logprobs": 3,
            "logit_bias": {"12": -5},
            "top_k": 4,
            "ignore_eos": True,
        }
    )
    sp = build_sampling(req, 10, _settings(), 1000)
    assert sp.max_tokens == 7 and sp.stop == ("END",) and sp.logprobs == 3
    assert sp.logit_bias == {12: -5.0} and sp.top_k == 4 and sp.ignore_eos and sp.temperature == 1.0


def test_default_max_tokens_clipped_to_model_len():
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}]})
    assert build_sampling(req, 90, _settings(max_model_len=100, default_max_tokens=50), None).max_tokens == 10
    assert build_sampling(req, 90, _settings(default_max_tokens=50), None).max_tokens == 50
    with pytest.raises(APIError):
        build_sampling(req, 100, _settings(max_model_len=100), None)


def test_completions_default_to_16_tokens():
    """/v1/completions without max_tokens: 16, OpenAI's and vLLM's default (chat keeps the server's),
    clipped to what max_model_len leaves and to --max-tokens-limit."""
    req = CompletionRequest.model_validate({"model": "m", "prompt": "x"})
    assert build_sampling(req, 5, _settings(default_max_tokens=512), None).max_tokens == 16
    assert build_sampling(req, 90, _settings(max_model_len=100), None).max_tokens == 10
    assert build_sampling(req, 5, _settings(max_tokens_limit=8), None).max_tokens == 8
    chat = ChatCompletionRequest.model_validate({**CHAT_BODY})
    assert build_sampling(chat, 5, _settings(default_max_tokens=512), None).max_tokens == 512


def test_a_prompt_that_fills_the_context_is_the_prompt_error():
    """No room left: the prompt is named (messages / prompt / prompt.3), code context_length_exceeded,
    with or without max_tokens; a max_tokens that alone does not fit names max_tokens."""
    chat = ChatCompletionRequest.model_validate({**CHAT_BODY})
    done = CompletionRequest.model_validate({**COMPLETION_BODY})
    for req, kw, param in (
        (chat, {}, "messages"),
        (chat.model_copy(update={"max_tokens": 5}), {}, "messages"),
        (done, {}, "prompt"),
        (done, {"prompt_param": "prompt.3"}, "prompt.3"),
    ):
        with pytest.raises(APIError) as e:
            build_sampling(req, 100, _settings(max_model_len=100), None, **kw)
        assert (e.value.param, e.value.code) == (param, "context_length_exceeded"), e.value.message
    with pytest.raises(APIError) as e:
        build_sampling(done.model_copy(update={"max_tokens": 11}), 90, _settings(max_model_len=100), None)
    assert (e.value.param, e.value.code) == ("max_tokens", "context_length_exceeded")


def test_max_tokens_0_scores_the_prompt():
    """Completions' max_tokens 0 (OpenAI's minimum): the engine runs one token without its logprobs (the
    answer leaves it out), even for a prompt that fills max_model_len; chat keeps its minimum of 1."""
    req = CompletionRequest.model_validate({**COMPLETION_BODY, "max_tokens": 0, "logprobs": 2, "echo": True})
    sp = build_sampling(req, 100, _settings(max_model_len=100), 1000)
    assert sp.max_tokens == 1 and sp.logprobs is None and sp.min_tokens == 0
    with pytest.raises(APIError) as e:
        build_sampling(req, 101, _settings(max_model_len=100), 1000)
    assert e.value.param == "prompt" and e.value.code == "context_length_exceeded"
    with pytest.raises(APIError) as e:
        build_sampling(req.model_copy(update={"min_tokens": 1}), 10, _settings(), 1000)
    assert e.value.param == "min_tokens"
    for field in ("max_tokens", "max_completion_tokens"):
        with pytest.raises(ValidationError):
            ChatCompletionRequest.model_validate({**CHAT_BODY, field: 0})


def test_finish_reason_mapping():
    assert [openai_finish_reason(r) for r in ("stop", "length", "abort", "timeout", None)] == [
        "stop",
        "length",
        "length",
        "length",
        None,
    ]


def test_legacy_logprobs_format():
    def e(tok: str, lp: float) -> LogprobEntry:
        return LogprobEntry(TokenLogprob(1, tok, lp), (TokenLogprob(2, "z", -1.0),))

    out = legacy_logprobs([e("ab", -0.1), e("c", float("-inf")), e("de", -0.2)], [5, 7, 8])
    assert out.text_offset == [5, 7, 8]
    assert out.tokens == ["ab", "c", "de"]
    assert out.token_logprobs == [-0.1, -9999.0, -0.2]
    assert out.top_logprobs[0] == {"z": -1.0, "ab": -0.1}


def test_max_tokens_limit_flag_reaches_the_api_check():
    """--max-tokens-limit: the API's own check (naming the param) gets the limit the engine gets; 0 lifts
    the cap for both."""
    from serving.cli import build_parser, engine_config_from_args

    for argv, api_limit, engine_limit in (
        ([], 32_768, 32_768),
        (["--max-tokens-limit", "0"], None, 2**31 - 1),
    ):
        args = build_parser().parse_args(["serve", *argv])
        assert settings_from_args(args, model_path="/ckpt").max_tokens_limit == api_limit
        assert engine_config_from_args(args, "/ckpt").max_tokens_limit == engine_limit
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}]})
    with pytest.raises(APIError) as e:
        build_sampling(req.model_copy(update={"max_tokens": 40_000}), 10, _settings(), 1000)
    assert e.value.status_code == 400 and e.value.param == "max_tokens"
    with pytest.raises(ValueError):
        _settings(max_tokens_limit=-1)


CHAT_BODY = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
COMPLETION_BODY = {"model": "m", "prompt": "x"}


def test_null_means_the_default():
    chat = ChatCompletionRequest.model_validate({**CHAT_BODY, "stream": None, "n": None, "logprobs": None})
    assert chat.stream is False and chat.n == 1 and chat.logprobs is False
    done = CompletionRequest.model_validate({**COMPLETION_BODY, "echo": None, "n": None, "stream": None})
    assert done.echo is False and done.n == 1 and done.stream is False
    required = ((ChatCompletionRequest, CHAT_BODY, "messages"), (CompletionRequest, COMPLETION_BODY, "model"))
    for model, body, field in required:  # required fields keep their null, which fails
        with pytest.raises(ValidationError):
            model.model_validate({**body, field: None})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", True),
        ("max_tokens", "5"),
        ("max_tokens", 5.0),
        ("n", "2"),
        ("seed", False),
        ("stream", "yes"),
        ("stream", 1),
        ("logprobs", "true"),
        ("top_logprobs", True),
        ("ignore_eos", "false"),
        ("stop_token_ids", [True]),
        ("temperature", "0.5"),
        ("temperature", True),
    ],
)
def test_strict_types(field, value):
    with pytest.raises(ValidationError) as e:
        ChatCompletionRequest.model_validate({**CHAT_BODY, field: value})
    param = validation_error(list(e.value.errors())).param
    assert param is not None and param.split(".")[0] == field


def test_numbers_take_integers():
    req = ChatCompletionRequest.model_validate(
        {**CHAT_BODY, "temperature": 1, "top_p": 1, "presence_penalty": -2, "logit_bias": {"3": 5}}
    )
    assert req.temperature == 1.0 and req.top_p == 1.0 and req.logit_bias == {"3": 5.0}


def test_token_ids_outside_the_vocabulary_name_their_field():
    for update, param in (
        ({"logit_bias": {"1000": 1}}, "logit_bias"),
        ({"stop_token_ids": [7, 1000]}, "stop_token_ids"),
    ):
        req = ChatCompletionRequest.model_validate({**CHAT_BODY, **update})
        with pytest.raises(APIError) as e:
            build_sampling(req, 10, _settings(), 1000)
        assert e.value.status_code == 400 and e.value.param == param, e.value.message


def test_param_of_engine_messages():
    assert param_of("n=5 exceeds the 4 slots of this server") == "n"
    assert param_of("max_tokens 40000 exceeds the limit 32768") == "max_tokens"
    assert param_of("the prompt has 9 tokens; this server accepts at most 8") is None
    assert param_of("token id 5 is outside the vocabulary") is None


# ---- long prompts: refused before the full tokenization --------------------------------------------------


class QuadTokenizer:
    """One token per 4 UTF-8 bytes (fewer tokens than bytes, as real BPE has); counts its calls."""

    def __init__(self) -> None:
        self.encoded: list[int] = []  # length in characters of each text encoded

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        self.encoded.append(len(text))
        return list(range(-(-len(text.encode()) // 4)))


class NoFullTokenization(FakeProcessor):
    """FakeProcessor whose `process` (the full tokenization) fails the test when `forbidden`."""

    def __init__(self, tokenizer: Any = None, forbidden: bool = True) -> None:
        super().__init__()
        self.tokenizer = tokenizer or self.tokenizer
        self.forbidden = forbidden

    def process(self, text: str, images: list[Any], videos: list[Any]) -> Any:
        assert not self.forbidden, "the full tokenization ran on a text known to be too long"
        return super().process(text, images, videos)


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_too_long_text_is_refused_before_the_processor():
    settings = _settings(max_prompt_len=100)
    proc = NoFullTokenization()
    with pytest.raises(APIError) as e:
        _run(prepare_chat([ChatMessage(role="user", content="x" * 1000)], proc, settings))
    assert e.value.status_code == 400 and e.value.param == "messages"
    assert "limit of 100" in e.value.message
    for param in ("prompt", "prompt.3"):
        with pytest.raises(APIError) as e:
            _run(prepare_completion("é" * 51, proc, param=param, max_prompt_len=100))  # 102 bytes
        assert e.value.status_code == 400 and e.value.param == param
    assert proc.calls == []


def test_piecewise_count_stops_early(monkeypatch):
    """Pieces of PIECE_CHARS characters; the count stops once it passes the limit plus the slack of the
    cuts so far: 64 tokens per piece, 128 > 100 + 16 after the second of 625 pieces."""
    monkeypatch.setattr(api_chat, "PIECE_CHARS", 64)
    proc = NoFullTokenization()
    counted: list[int] = []
    encode = proc.tokenizer.encode
    monkeypatch.setattr(
        proc.tokenizer, "encode", lambda text, **kw: counted.append(len(text)) or encode(text, **kw)
    )
    with pytest.raises(APIError) as e:
        _run(prepare_completion("x" * 40_000, proc, max_prompt_len=100))
    assert counted == [64, 64] and "at least 112 tokens" in e.value.message


def test_long_text_within_the_limit_is_processed():
    """More bytes than the limit but fewer tokens: counted, then processed (and exactly checked) as usual."""
    tok = QuadTokenizer()
    proc = NoFullTokenization(tok, forbidden=False)
    prompt = _run(prepare_completion("abcd" * 100, proc, max_prompt_len=100))  # 400 bytes, 100 tokens
    assert len(prompt.input_ids) == 100 and tok.encoded == [400, 400]  # the count, then the processor
    short = _run(prepare_completion("abcd" * 25, proc, max_prompt_len=100))  # 100 bytes: not counted
    assert len(short.input_ids) == 25 and tok.encoded[2:] == [100]
    chat = _run(
        prepare_chat([ChatMessage(role="user", content="abcd" * 80)], proc, _settings(max_prompt_len=100))
    )
    assert len(chat.input_ids) == -(-len(proc.calls[-1][0]) // 4) <= 100


def test_a_final_assistant_message_is_history_or_continued() -> None:
    """A final assistant message: by default history, with a new assistant turn after it (as OpenAI
    answers); with continue_final_message (and no generation prompt) the prompt ends where its text
    ends, so the model continues it; an empty one leaves the turn open; without the generation prompt
    the text ends with the last message."""
    from api.chat import TemplateOptions, render_chat
    from tests.fake_engine import FakeProcessor

    proc = FakeProcessor()
    chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "The answer is"}]
    assert render_chat(proc, chat, TemplateOptions()) == "<user>:a|<assistant>:The answer is|<assistant>:"
    cont = TemplateOptions(add_generation_prompt=False, continue_final_message=True)
    assert render_chat(proc, chat, cont) == "<user>:a|<assistant>:The answer is"
    empty = [chat[0], {"role": "assistant", "content": ""}]
    assert render_chat(proc, empty, cont) == "<user>:a|<assistant>:"
    assert render_chat(proc, chat[:1], TemplateOptions(add_generation_prompt=False)) == "<user>:a|"


def test_continued_final_message_ends_where_its_text_ends_whatever_it_holds() -> None:
    """The prompt of a continued final message ends at the end of that message's text, also where the
    text occurs again after it in the template's markup (a "|" or a newline prefill was found in the
    end-of-turn marker after it, and the prompt held that marker)."""
    from api.chat import TemplateOptions, render_chat
    from tests.fake_engine import FakeProcessor

    proc = FakeProcessor()
    cont = TemplateOptions(add_generation_prompt=False, continue_final_message=True)
    for text in ("|", "a|", "The answer is"):
        chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": text}]
        assert render_chat(proc, chat, cont) == f"<user>:a|<assistant>:{text}"
