"""The API on the real stack: tiny checkpoint, real processor and engine (CPU, torch backend), real server,
official OpenAI client. Skips until the model pieces exist."""

from __future__ import annotations

import base64
import io

import httpx
import openai
import openapi_validator as oav
import pytest
from fake_engine import ServerThread
from PIL import Image

from api.app import create_app
from api.errors import APIError
from api.settings import ServerSettings
from serving.detokenizer import token_bytes

pytest.importorskip("model.tiny")
pytest.importorskip("model.processor")
pytest.importorskip("serving.build")

MODEL = "tiny"


@pytest.fixture(scope="module")
def real(tiny_ckpt_dir):
    from serving.build import build_engine
    from serving.config import EngineConfig
    from serving.engine import AsyncEngine

    stack = build_engine(
        EngineConfig(model=str(tiny_ckpt_dir), device="cpu", backend="torch", max_num_seqs=4)
    )
    engine = AsyncEngine(stack.core, info={"model": MODEL})
    engine.start()
    settings = ServerSettings(served_model_name=MODEL, model_path=str(tiny_ckpt_dir), max_prompt_len=8192)
    try:
        with ServerThread(create_app(engine, stack.processor, settings)) as server:
            yield stack.processor, server
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def client(real) -> openai.OpenAI:
    return openai.OpenAI(base_url=real[1].base_url + "/v1", api_key="x", max_retries=0, timeout=120)


def png_data_url(size: tuple[int, int], color: tuple[int, int, int]) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_messages(*sizes: tuple[int, int]) -> list[dict]:
    parts: list[dict] = [
        {"type": "image_url", "image_url": {"url": png_data_url(s, (40 * i, 90, 200))}}
        for i, s in enumerate(sizes)
    ]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "Describe."}]}]


def expected_prompt_tokens(processor, messages: list[dict], sizes: list[tuple[int, int]]) -> int:
    """Template tokens with one placeholder per image, plus the processor's count per image (w x h)."""
    tmpl = [
        {
            "role": "user",
            "content": [*({"type": "image"} for _ in sizes), {"type": "text", "text": "Describe."}],
        }
    ]
    text = processor.apply_chat_template(tmpl)
    base = len(processor.tokenizer.encode(text, add_special_tokens=False))
    return base - len(sizes) + sum(processor.count_image_tokens(h, w) for (w, h) in sizes)


def test_image_chat_greedy(client, real):
    sizes = [(64, 56)]
    messages = image_messages(*sizes)
    r1 = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
    r2 = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
    if oav.is_available():
        oav.validate(r1.model_dump(exclude_unset=True), "CreateChatCompletionResponse")
    assert r1.choices[0].message.content == r2.choices[0].message.content
    assert r1.usage.prompt_tokens == expected_prompt_tokens(real[0], messages, sizes)
    assert 1 <= r1.usage.completion_tokens <= 4


def test_two_images_streaming(client, real):
    sizes = [(64, 56), (28, 84)]
    messages = image_messages(*sizes)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=3,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == expected_prompt_tokens(
        real[0], messages, sizes
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    ref = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, temperature=0)
    assert text == ref.choices[0].message.content


def test_completion_and_tokenize(client, real):
    r = client.completions.create(model=MODEL, prompt="hello", max_tokens=3, temperature=0, seed=1)
    assert r.usage.prompt_tokens == len(real[0].tokenizer.encode("hello", add_special_tokens=False))
    toks = httpx.post(real[1].base_url + "/tokenize", json={"prompt": "hello"}).json()["tokens"]
    back = httpx.post(real[1].base_url + "/detokenize", json={"tokens": toks}).json()["prompt"]
    assert back == "hello"


def test_continue_final_message_with_the_real_template(client, real):
    """Assistant prefill on the release's chat template: the prompt ends with the final message's
    text (no <|im_end|>, no new assistant header), and chat completions take the same prompt."""
    processor, server = real
    messages = [
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "The color is"},
    ]
    body = {"messages": messages, "add_generation_prompt": False, "continue_final_message": True}
    toks = httpx.post(server.base_url + "/tokenize", json=body).json()["tokens"]
    text = processor.tokenizer.decode(toks)
    assert text.endswith("<|im_start|>assistant\nThe color is"), text[-60:]
    history = httpx.post(server.base_url + "/tokenize", json={"messages": messages}).json()["tokens"]
    assert processor.tokenizer.decode(history).endswith("The color is<|im_end|>\n<|im_start|>assistant\n")
    r = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=2, extra_body=body | {"messages": messages}
    )
    assert r.usage.prompt_tokens == len(toks)


def _sse(url: str, body: dict) -> list[dict]:
    """The JSON chunks of a streamed response (without [DONE])."""
    import json

    chunks = []
    with httpx.stream("POST", url, json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[len("data: ") :]))
    return chunks


def test_completion_batch_equals_single_prompts(client, real):
    """A batch of prompts (strings or token-id lists) with n=2: choice c of prompt p has index 2p + c and
    the greedy text of that prompt alone; usage counts every prompt once and every choice."""
    prompts = ["hello", "the cat sat", "a b c d e"]
    batch = client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=4, temperature=0)
    if oav.is_available():
        oav.validate(batch.model_dump(exclude_unset=True), "CreateCompletionResponse")
    assert [c.index for c in batch.choices] == list(range(6))
    singles = [client.completions.create(model=MODEL, prompt=p, max_tokens=4, temperature=0) for p in prompts]
    for c in batch.choices:
        assert c.text == singles[c.index // 2].choices[0].text and c.finish_reason == "length"
    assert batch.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)
    assert batch.usage.completion_tokens == 6 * 4
    ids = [real[0].tokenizer.encode(p, add_special_tokens=False) for p in prompts[:2]]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0)
    assert [c.text for c in by_ids.choices] == [s.choices[0].text for s in singles[:2]]


def test_completion_batch_stream(real):
    """Streamed, the batch's chunks carry the global choice index; each choice's text equals the
    non-streamed one; the usage chunk sums over the prompts."""
    url = real[1].base_url + "/v1/completions"
    body = {"model": MODEL, "prompt": ["hello", "the cat sat"], "n": 2, "max_tokens": 5, "temperature": 0}
    whole = httpx.post(url, json=body, timeout=120).json()
    chunks = _sse(url, {**body, "stream": True, "stream_options": {"include_usage": True}})
    texts = ["" for _ in range(4)]
    finished = set()
    for ch in chunks[:-1]:  # (OpenAI's schema has no stream chunk for completions: a null finish_reason)
        assert ch["id"] == chunks[0]["id"] and ch["object"] == "text_completion"
        (choice,) = ch["choices"]
        texts[choice["index"]] += choice["text"]
        if choice["finish_reason"] is not None:
            finished.add(choice["index"])
    assert finished == {0, 1, 2, 3}
    assert texts == [c["text"] for c in whole["choices"]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_completion_echo(client, real):
    """echo: each choice's text starts with its prompt (token-id prompts decoded), streamed or not."""
    plain = client.completions.create(model=MODEL, prompt="hello there", max_tokens=3, temperature=0)
    echoed = client.completions.create(
        model=MODEL, prompt="hello there", max_tokens=3, temperature=0, echo=True
    )
    assert echoed.choices[0].text == "hello there" + plain.choices[0].text
    assert echoed.usage == plain.usage
    ids = real[0].tokenizer.encode("good day", add_special_tokens=False)
    by_ids = client.completions.create(model=MODEL, prompt=[ids, ids], max_tokens=2, temperature=0, echo=True)
    assert all(c.text.startswith(real[0].tokenizer.decode(ids)) for c in by_ids.choices)
    url = real[1].base_url + "/v1/completions"
    chunks = _sse(url, {"model": MODEL, "prompt": "hello there", "max_tokens": 3, "temperature": 0,
                        "echo": True, "stream": True})  # fmt: skip
    assert chunks[0]["choices"][0]["text"].startswith("hello there")
    assert "".join(c["choices"][0]["text"] for c in chunks) == echoed.choices[0].text


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_continuous_usage_stats(real, path):
    """stream_options.continuous_usage_stats: every chunk carries the usage so far; completion tokens
    never decrease and end at the final usage chunk's count."""
    body = {"model": MODEL, "max_tokens": 5, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}  # fmt: skip
    if path.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": "hello"}]
    else:
        body["prompt"] = "hello"
    chunks = _sse(real[1].base_url + path, body)
    usages = [c["usage"] for c in chunks]
    assert all(u is not None for u in usages)
    counts = [u["completion_tokens"] for u in usages]
    assert counts == sorted(counts) and counts[-1] == 5 and counts[0] <= 1
    assert all(u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] for u in usages)
    plain = _sse(real[1].base_url + path, {**body, "stream_options": {"include_usage": True}})
    assert plain[-1]["usage"]["completion_tokens"] == 5
    if path.endswith("chat/completions"):  # chat chunks carry a null usage, as OpenAI's schema allows
        assert all(c["usage"] is None for c in plain[:-1])
    else:  # CreateCompletionResponse has no null usage: the chunks leave it out
        assert all("usage" not in c for c in plain[:-1])


def test_completion_echo_with_logprobs_scores_the_prompt(client, real):
    """echo with logprobs (how evaluation harnesses score a text): the logprobs cover the prompt's tokens,
    the first with a null logprob, then the generated ones, which equal those of the same request without
    echo; streamed, the first chunk carries the prompt's part."""
    prompt = "the quick brown fox jumps"
    n_prompt = len(real[0].tokenizer.encode(prompt, add_special_tokens=False))
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, logprobs=2)
    scored = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=3, temperature=0, logprobs=2, echo=True
    )
    lp = scored.choices[0].logprobs
    if (
        oav.is_available()
    ):  # the one deviation from OpenAI's schema: the first token's nulls (as OpenAI sends)
        body = scored.model_dump(exclude_unset=True)
        body["choices"][0]["logprobs"]["token_logprobs"][0] = 0.0
        body["choices"][0]["logprobs"]["top_logprobs"][0] = {}
        oav.validate(body, "CreateCompletionResponse")
    assert len(lp.tokens) == n_prompt + 3 and "".join(lp.tokens[:n_prompt]) == prompt
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:n_prompt])
    # the top 2 and the sampled (or prompt) token, which may be one of them
    assert all(
        tok in t and 2 <= len(t) <= 3 for tok, t in zip(lp.tokens[1:], lp.top_logprobs[1:], strict=True)
    )
    assert lp.tokens[n_prompt:] == plain.choices[0].logprobs.tokens
    assert lp.token_logprobs[n_prompt:] == pytest.approx(plain.choices[0].logprobs.token_logprobs, abs=1e-5)
    assert lp.text_offset[: n_prompt + 1] == [len("".join(lp.tokens[:i])) for i in range(n_prompt + 1)]
    chunks = _sse(real[1].base_url + "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 3,
                  "temperature": 0, "logprobs": 2, "echo": True, "stream": True})  # fmt: skip
    streamed = [c["choices"][0]["logprobs"] for c in chunks]
    assert (
        streamed[0]["tokens"][:n_prompt] == lp.tokens[:n_prompt] and streamed[0]["token_logprobs"][0] is None
    )
    assert sum((s["token_logprobs"] for s in streamed), []) == pytest.approx(
        [None, *lp.token_logprobs[1:]], abs=1e-5
    )


def _holder_of_each_token(text: str, raws: list[bytes]) -> list[int]:
    """Per token, the index of the character of `text` holding its first byte (len(text) past the end)."""
    holder = [i for i, ch in enumerate(text) for _ in ch.encode()] + [len(text)]
    starts = [sum(len(r) for r in raws[:i]) for i in range(len(raws))]
    return [holder[min(pos, len(holder) - 1)] for pos in starts]


def test_max_tokens_0_scores_the_prompt(client, real):
    """max_tokens 0 with echo and logprobs (OpenAI's scoring request): the prompt alone, its logprobs equal
    to those of the same request with max_tokens 1, no completion tokens; streamed the same."""
    prompt = "the quick brown fox"
    n_prompt = len(real[0].tokenizer.encode(prompt, add_special_tokens=False))
    args = {"model": MODEL, "prompt": prompt, "echo": True, "logprobs": 1, "temperature": 0}
    scored = client.completions.create(**args, max_tokens=0)
    one = client.completions.create(**args, max_tokens=1)
    (choice,) = scored.choices
    assert choice.text == prompt and choice.finish_reason == "length"
    assert scored.usage.completion_tokens == 0 and scored.usage.prompt_tokens == n_prompt
    lp, ref = choice.logprobs, one.choices[0].logprobs
    assert lp.tokens == ref.tokens[:n_prompt] and lp.text_offset == ref.text_offset[:n_prompt]
    assert lp.token_logprobs[1:] == pytest.approx(ref.token_logprobs[1:n_prompt], abs=1e-5)
    chunks = _sse(real[1].base_url + "/v1/completions", {**args, "max_tokens": 0, "stream": True})
    assert [c["choices"][0]["text"] for c in chunks] == [prompt]
    assert chunks[0]["choices"][0]["logprobs"] == choice.logprobs.model_dump()
    assert chunks[0]["choices"][0]["finish_reason"] == "length"


def test_legacy_offsets_index_the_text(client, real):
    """Byte-level tokens of é, 日本語 and 🙂 (named "bytes:\\x.."), a special token in the prompt and
    generated special tokens the text leaves out: every text_offset is the character of `text` where the
    token's bytes begin (zero width for a token not in the text); streamed, the same offsets."""
    prompt = "héllo 日本語 🙂 ok<|quad_end|>."
    quad_end = real[0].tokenizer.convert_tokens_to_ids("<|quad_end|>")
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 4, "echo": True, "logprobs": 0, "temperature": 0,
            "logit_bias": {str(quad_end): 100}}  # fmt: skip
    r = client.completions.create(**body)
    (choice,) = r.choices
    lp = choice.logprobs
    ids = real[0].tokenizer.encode(prompt, add_special_tokens=False)
    assert len(lp.tokens) == len(ids) + 4 and choice.text == prompt  # the generated special tokens: no text
    raws = [bytes(token_bytes(real[0].tokenizer, i)) for i in ids]
    assert lp.text_offset[: len(ids)] == _holder_of_each_token(prompt, raws)
    assert lp.text_offset[len(ids) :] == [len(prompt)] * 4
    assert lp.tokens[1:3] == ["bytes:\\xc3", "bytes:\\xa9"] and lp.text_offset[1:3] == [1, 1]  # é
    assert lp.text_offset[lp.tokens.index(" o")] == prompt.index(" ok")
    assert all(t in top for t, top in zip(lp.tokens[1:], lp.top_logprobs[1:], strict=True))  # logprobs 0
    chunks = _sse(real[1].base_url + "/v1/completions", {**body, "stream": True})
    streamed = sum((c["choices"][0]["logprobs"]["text_offset"] for c in chunks), [])
    assert streamed == lp.text_offset
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice.text


def test_limit_errors_name_their_param(real):
    """n beyond the engine's slots (4 here) and a logit_bias key outside the vocabulary: 400s naming the
    field, from the engine's check and the API's own."""
    base = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for extra, param in (({"n": 5}, "n"), ({"logit_bias": {"99999999": 1}}, "logit_bias")):
        r = httpx.post(real[1].base_url + "/v1/chat/completions", json={**base, **extra}, timeout=60)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param, r.text


@pytest.mark.parametrize("piece_chars", [7, 100, 4096])
def test_piecewise_count_never_refuses_a_prompt_within_the_limit(real, monkeypatch, piece_chars):
    """The real tokenizer on a rendered chat (special tokens, words, digits, unicode) cut into pieces: a
    limit equal to the exact count passes (the slack covers every cut); half of it is refused where a
    piece holds more tokens than the slack of one cut (not with 7-character pieces)."""
    from api import chat as api_chat

    monkeypatch.setattr(api_chat, "PIECE_CHARS", piece_chars)
    processor = real[0]
    words = "The river flows 1234567 past señor Ünal's 日本 house; ¿qué? " * 60
    text = processor.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": words}]
    )
    count = len(processor.tokenizer.encode(text, add_special_tokens=False))
    assert len(text.encode()) > count  # BPE: the text is counted piecewise
    api_chat.check_text_len(processor.tokenizer, text, count, "messages")
    if piece_chars == 7:
        return
    with pytest.raises(APIError) as e:
        api_chat.check_text_len(processor.tokenizer, text, count // 2, "messages")
    assert e.value.param == "messages"
