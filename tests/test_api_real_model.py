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
from api.settings import ServerSettings

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
