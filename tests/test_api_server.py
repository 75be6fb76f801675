"""Black-box tests of the HTTP API against a real uvicorn server (fake engine, byte-level fake processor):
the official OpenAI client, raw SSE framing, and every body validated against OpenAI's OpenAPI schemas."""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
import threading
import time

import httpx
import openai
import openapi_validator as oav
import pytest
from fake_engine import IMAGE_TOKENS, FakeEngine, FakeProcessor, ServerThread, word_of
from PIL import Image

from api.app import create_app
from api.settings import ServerSettings
from serving.errors import EngineOverloaded

MODEL = "infinitevl-test"

needs_schema = pytest.mark.skipif(not oav.is_available(), reason="openai openapi.yaml not found")


def check(obj: dict, schema: str) -> None:
    if oav.is_available():
        oav.validate(obj, schema)


@pytest.fixture(scope="module")
def stack():
    engine, processor = FakeEngine(), FakeProcessor()
    settings = ServerSettings(served_model_name=MODEL, model_path="/models/tiny", max_prompt_len=4096)
    app = create_app(engine, processor, settings)
    with ServerThread(app) as server:
        yield engine, processor, app, server


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack[3].base_url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def http(stack):
    with httpx.Client(base_url=stack[3].base_url, timeout=30) as c:
        yield c


def png_data_url(color: tuple[int, int, int], size: tuple[int, int] = (32, 24)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# ---- OpenAI SDK ----------------------------------------------------------------------------------------


def test_chat_non_streaming(client, stack):
    r = client.chat.completions.create(model=MODEL, messages=user("hello"), max_tokens=5, temperature=0)
    body = r.model_dump(exclude_unset=True)
    check(body, "CreateChatCompletionResponse")
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == MODEL
    assert abs(r.created - time.time()) < 600
    (choice,) = r.choices
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert len(choice.message.content.split()) == 5
    prompt = "<system>" not in stack[1].calls[-1][0] and stack[1].calls[-1][0]
    assert prompt == "<user>:hello|<assistant>:"
    assert r.usage.prompt_tokens == len(prompt.encode()) and r.usage.completion_tokens == 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + 5


def test_chat_text_matches_engine(client, stack):
    r = client.chat.completions.create(model=MODEL, messages=user("same"), max_tokens=3, seed=7)
    req = stack[0].submitted[-1]
    assert req.sampling.seed == 7 and req.sampling.max_tokens == 3
    assert req.request_id == r.id
    # the fake engine's words are a pure function of (prompt ids, seed, choice index, position)
    import hashlib

    base = int.from_bytes(hashlib.sha256(f"{req.prompt_token_ids}|7|0".encode()).digest()[:4], "little")
    assert r.choices[0].message.content == "".join(word_of(base, k)[1] for k in range(3))


def test_streaming_with_usage(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=user("hi"), max_tokens=4, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    for c in chunks:
        check(c.model_dump(exclude_unset=True), "CreateChatCompletionStreamResponse")
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    first, finish, last = chunks[0], chunks[-2], chunks[-1]
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert finish.choices[0].finish_reason == "length" and finish.choices[0].delta.content is None
    assert last.choices == [] and last.usage.completion_tokens == 4
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert len(text.split()) == 4


def test_image_data_url(client, stack):
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": png_data_url((255, 0, 0))}},
                {"type": "text", "text": "What is this?"},
            ],
        }
    ]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    text, images, videos = stack[1].calls[-1]
    assert text == "<user>:<image>What is this?|<assistant>:" and videos == []
    assert len(images) == 1 and images[0].size == (32, 24) and images[0].getpixel((3, 3)) == (255, 0, 0)
    assert r.usage.prompt_tokens == len(text.encode()) + IMAGE_TOKENS
    assert stack[0].submitted[-1].mm.num_images == 1


def test_two_images_across_turns(client, stack):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url((0, 255, 0))}}]},
        {"role": "assistant", "content": "a green square"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "and"},
                {"type": "image_url", "image_url": {"url": png_data_url((0, 0, 255), (20, 40))}},
            ],
        },
    ]
    client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
    text, images, _ = stack[1].calls[-1]
    assert (
        text == "<system>:be brief|<user>:<image>|<assistant>:a green square|<user>:and<image>|<assistant>:"
    )
    assert [im.getpixel((0, 0)) for im in images] == [(0, 255, 0), (0, 0, 255)]
    assert images[1].size == (20, 40)


def test_n2(client):
    r = client.chat.completions.create(model=MODEL, messages=user("x"), n=2, max_tokens=3, seed=1)
    check(r.model_dump(exclude_unset=True), "CreateChatCompletionResponse")
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].message.content != r.choices[1].message.content
    assert r.usage.completion_tokens == 6


def test_n2_streaming(client):
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=user("x"), n=2, max_tokens=3, seed=1, stream=True
        )
    )
    by_index: dict[int, str] = {0: "", 1: ""}
    roles, finishes = set(), set()
    for c in chunks:
        check(c.model_dump(exclude_unset=True), "CreateChatCompletionStreamResponse")
        (ch,) = c.choices
        by_index[ch.index] += ch.delta.content or ""
        if ch.delta.role:
            roles.add(ch.index)
        if ch.finish_reason:
            finishes.add(ch.index)
    assert roles == {0, 1} == finishes
    ref = client.chat.completions.create(model=MODEL, messages=user("x"), n=2, max_tokens=3, seed=1)
    assert [by_index[0], by_index[1]] == [c.message.content for c in ref.choices]


def test_stop_string(client):
    ref = client.chat.completions.create(model=MODEL, messages=user("s"), max_tokens=6, seed=3)
    words = ref.choices[0].message.content.split()
    r = client.chat.completions.create(model=MODEL, messages=user("s"), max_tokens=6, seed=3, stop=[words[2]])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content.split() == words[:2]


def test_seed_reproducible(client):
    def run(seed: int) -> str:
        r = client.chat.completions.create(
            model=MODEL, messages=user("r"), max_tokens=8, seed=seed, temperature=1
        )
        return r.choices[0].message.content

    assert run(11) == run(11)
    assert run(11) != run(12)


def test_logprobs(client):
    r = client.chat.completions.create(
        model=MODEL, messages=user("l"), max_tokens=3, logprobs=True, top_logprobs=2
    )
    check(r.model_dump(exclude_unset=True), "CreateChatCompletionResponse")
    content = r.choices[0].logprobs.content
    assert len(content) == 3 and all(len(e.top_logprobs) == 2 for e in content)
    assert "".join(e.token for e in content) == r.choices[0].message.content


def test_completions(client, stack):
    r = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=4, logprobs=1)
    check(r.model_dump(exclude_unset=True), "CreateCompletionResponse")
    assert r.id.startswith("cmpl-") and r.object == "text_completion"
    assert len(r.choices[0].text.split()) == 4 and r.choices[0].finish_reason == "length"
    assert stack[1].calls[-1][0] == "Once upon"
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text and lp.text_offset[0] == 0


def test_completions_token_ids(client, stack):
    r = client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=2)
    assert stack[0].submitted[-1].prompt_token_ids == [5, 6, 7]
    assert r.usage.prompt_tokens == 3


def test_completions_stream(client):
    chunks = list(client.completions.create(model=MODEL, prompt="p", max_tokens=3, stream=True))
    assert "".join(c.choices[0].text for c in chunks).count(" w") == 3
    assert chunks[-1].choices[0].finish_reason == "length"


def test_null_fields_mean_their_defaults(http):
    """OpenAI marks these nullable: null is the default (no stream, one choice, no logprobs, no echo)."""
    body = {
        "model": MODEL,
        "messages": user("n"),
        "max_tokens": 2,
        "stream": None,
        "n": None,
        "logprobs": None,
    }
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    check(r.json(), "CreateChatCompletionResponse")
    assert len(r.json()["choices"]) == 1 and r.json()["choices"][0]["logprobs"] is None
    body = {"model": MODEL, "prompt": "p", "max_tokens": 2, "echo": None, "n": None, "stream": None}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    check(r.json(), "CreateCompletionResponse")
    (choice,) = r.json()["choices"]
    assert not choice["text"].startswith("p")


def check_completion_chunk(chunk: dict) -> None:
    """A legacy completion stream chunk against CreateCompletionResponse. That schema is the non-stream
    body's, whose finish_reason is not nullable; a chunk that finishes no choice sends null there, as
    OpenAI's own streams do (checked here, the rest of the chunk against the schema)."""
    for c in chunk["choices"]:
        assert "finish_reason" in c
    check({**chunk, "choices": [{**c, "finish_reason": c["finish_reason"] or "length"} for c in chunk["choices"]]},
          "CreateCompletionResponse")  # fmt: skip


@pytest.mark.parametrize("usage", ["none", "include_usage", "continuous"])
def test_completion_stream_chunks_match_the_schema(http, usage):
    """Every chunk of a streamed completion batch validates; usage is left out where there is none
    (CreateCompletionResponse's usage is not nullable)."""
    options = {
        "none": None,
        "include_usage": {"include_usage": True},
        "continuous": {"include_usage": True, "continuous_usage_stats": True},
    }[usage]
    body = {"model": MODEL, "prompt": ["a", "b"], "n": 2, "max_tokens": 3, "stream": True, "logprobs": 1}
    if options is not None:
        body["stream_options"] = options
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    for c in chunks:
        check_completion_chunk(c)
    with_usage = [c for c in chunks if "usage" in c]
    if usage == "none":
        assert with_usage == []
    elif usage == "include_usage":
        assert with_usage == [chunks[-1]] and chunks[-1]["choices"] == []
    else:
        assert with_usage == chunks
    assert sorted(c["choices"][0]["index"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]) == [
        0, 1, 2, 3
    ]  # fmt: skip


def test_models_list(client, http):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    body = http.get("/v1/models").json()
    check(body, "ListModelsResponse")
    assert body["data"][0]["owned_by"] == "infinitevl"
    assert client.models.retrieve(MODEL).id == MODEL
    assert http.get("/v1/models/nope").status_code == 404


def test_model_path_accepted(http):
    r = http.post(
        "/v1/chat/completions", json={"model": "/models/tiny", "messages": user("a"), "max_tokens": 1}
    )
    assert r.status_code == 200, r.text


# ---- raw SSE -------------------------------------------------------------------------------------------


def test_raw_sse_framing(http):
    body = {"model": MODEL, "messages": user("raw"), "max_tokens": 3, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(r.iter_bytes())
    assert raw.endswith(b"data: [DONE]\n\n")
    events = raw.split(b"\n\n")
    assert events[-1] == b""  # every event, the last included, ends with a blank line
    events = events[:-1]
    assert events[-1] == b"data: [DONE]" and events.count(b"data: [DONE]") == 1
    for ev in events[:-1]:
        assert ev.startswith(b"data: {") and b"\n" not in ev and b"\r" not in ev
        obj = json.loads(ev[len(b"data: ") :])
        check(obj, "CreateChatCompletionStreamResponse")
        assert "usage" not in obj  # include_usage not asked
    # role chunk, 3 content chunks, finish chunk
    assert len(events) == 1 + 3 + 1 + 1


def test_stream_error_event(http, stack):
    stack[0].fail_with_error = "boom"
    try:
        body = {"model": MODEL, "messages": user("e"), "max_tokens": 3, "stream": True}
        raw = http.post("/v1/chat/completions", json=body).content
        last = raw.split(b"\n\n")[-2]
        err = json.loads(last[len(b"data: ") :])
        check(err, "ErrorResponse")
        assert "boom" in err["error"]["message"]
        r = http.post("/v1/chat/completions", json={**body, "stream": False})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    finally:
        stack[0].fail_with_error = None


# ---- other endpoints -----------------------------------------------------------------------------------


def test_health_version_metrics(http):
    assert http.get("/health").status_code == 200
    v = http.get("/version").json()
    assert isinstance(v["version"], str) and v["served_model_name"] == MODEL
    assert http.get("/metrics").status_code == 200


def test_tokenize_detokenize(http):
    r = http.post("/tokenize", json={"prompt": "abc"}).json()
    assert r["tokens"] == [97, 98, 99] and r["count"] == 3
    r = http.post("/tokenize", json={"messages": user("hi")}).json()
    assert bytes(r["tokens"]).decode() == "<user>:hi|<assistant>:"
    assert http.post("/detokenize", json={"tokens": [104, 105]}).json() == {"prompt": "hi"}
    assert http.post("/detokenize", json={"tokens": [5000]}).status_code == 400


# ---- disconnects, overload, draining -------------------------------------------------------------------


def _wait_until(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def test_disconnect_mid_stream_aborts(stack, http):
    engine = stack[0]
    engine.token_delay = 0.05
    try:
        body = {"model": MODEL, "messages": user("long"), "max_tokens": 10_000, "stream": True}
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            it = r.iter_bytes()
            next(it)
            rid = engine.submitted[-1].request_id
            assert rid in engine.running
        assert _wait_until(lambda: rid not in engine.running)
        assert rid in engine.aborted
    finally:
        engine.token_delay = 0.0


@pytest.mark.parametrize(
    ("path", "prompt", "num_requests"),
    [
        ("/v1/chat/completions", {"messages": user("long2")}, 1),
        ("/v1/completions", {"prompt": ["long d", "long e"]}, 2),  # a batch: every prompt is aborted
    ],
)
def test_disconnect_non_streaming_aborts(stack, path, prompt, num_requests):
    engine = stack[0]
    engine.token_delay = 0.05
    try:
        body = {"model": MODEL, "max_tokens": 10_000, **prompt}
        with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=stack[3].base_url, timeout=0.5) as c:
            c.post(path, json=body)
        rids = [g.request_id for g in engine.submitted[-num_requests:]]
        assert _wait_until(lambda: not any(rid in engine.running for rid in rids))
        assert set(rids) <= set(engine.aborted)
    finally:
        engine.token_delay = 0.0


def test_disconnect_mid_batch_stream_aborts_every_prompt(stack, http):
    engine = stack[0]
    engine.token_delay = 0.05
    try:
        body = {
            "model": MODEL,
            "prompt": ["long a", "long b", "long c"],
            "max_tokens": 10_000,
            "stream": True,
        }
        with http.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            events = [line for line in itertools.islice(lines, 12) if line.startswith("data: ")]
            rids = [g.request_id for g in engine.submitted[-3:]]
            assert len(events) == 6 and len(set(rids)) == 3  # tokens of all three prompts flow
            assert {json.loads(e[6:])["choices"][0]["index"] for e in events} == {0, 1, 2}
            assert all(rid in engine.running for rid in rids)
        assert _wait_until(lambda: not any(rid in engine.running for rid in rids))
        assert set(rids) <= set(engine.aborted)
    finally:
        engine.token_delay = 0.0


@pytest.mark.parametrize("stream", [False, True])
def test_batch_refused_part_way_leaves_nothing_running(stack, http, stream):
    """The engine refuses the second prompt of a batch (queue full): 429, and the first one, already
    submitted, is aborted (all of a batch or nothing); a streamed batch too, before its stream begins."""
    engine = stack[0]
    real_generate = engine.generate
    calls = []

    def generate_once(request):
        calls.append(request.request_id)
        if len(calls) == 2:
            raise EngineOverloaded("fake queue full", retry_after=1.0)
        return real_generate(request)

    engine.generate = generate_once
    try:
        body = {"model": MODEL, "prompt": ["p1", "p2", "p3"], "max_tokens": 3, "stream": stream}
        r = http.post("/v1/completions", json=body)
    finally:
        del engine.generate
    assert r.status_code == 429 and r.json()["error"]["type"]
    assert calls[0] in engine.aborted and not engine.running


def test_overloaded_is_429(stack, http):
    stack[0].overloaded = True
    try:
        r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": user("o")})
        assert r.status_code == 429 and r.headers["retry-after"] == "2"
        check(r.json(), "ErrorResponse")
    finally:
        stack[0].overloaded = False


def test_dead_engine_is_503(stack, http):
    stack[0].dead = True
    try:
        assert http.get("/health").status_code == 503
        r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": user("d")})
        assert r.status_code == 503
        check(r.json(), "ErrorResponse")
    finally:
        stack[0].dead = False
    assert http.get("/health").status_code == 200


def test_draining(stack, http):
    app = stack[2]
    app.state.draining = True
    try:
        assert http.get("/health").status_code == 503
        r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": user("d")})
        assert r.status_code == 503 and "retry-after" in r.headers
        check(r.json(), "ErrorResponse")
    finally:
        app.state.draining = False
    assert http.get("/health").status_code == 200
    assert _wait_until(lambda: app.state.in_flight == 0)


def mp4_data_url(seconds: float = 3.0, rate: int = 10) -> str:
    import av

    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(round(seconds * rate)):
            frame = av.VideoFrame.from_image(Image.new("RGB", (64, 48), (8 * i,) * 3))
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return "data:video/mp4;base64," + base64.b64encode(buf.getvalue()).decode()


def test_video_url(client, stack):
    url = mp4_data_url()
    content = [{"type": "text", "text": "what happens?"}, {"type": "video_url", "video_url": {"url": url}}]
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=1)
    text, images, videos = stack[1].calls[-1]
    assert text == "<user>:what happens?<video>|<assistant>:" and images == []
    (video,) = videos
    assert len(video.frames) == 6 and video.fps == pytest.approx(2.0)  # 3 s at the default 2 fps
    content[1]["video_url"]["max_frames"] = 4  # our extension: fewer frames spread over the whole video
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=1)
    assert len(stack[1].calls[-1][2][0].frames) == 4


class GatedEngine(FakeEngine):
    """FakeEngine whose requests with an id ending in `held_suffix` are queued at submission as usual but
    produce their first token only once `release` is set (a prompt waiting for a free slot)."""

    def __init__(self, held_suffix: str) -> None:
        super().__init__()
        self.held_suffix = held_suffix
        self.release = threading.Event()

    def generate(self, request):
        deltas = super().generate(request)
        return self._after_release(deltas) if request.request_id.endswith(self.held_suffix) else deltas

    async def _after_release(self, deltas):
        while not self.release.is_set():
            await asyncio.sleep(0.01)
        async for d in deltas:
            yield d


def test_streamed_batch_starts_before_every_prompt_has_a_token():
    """A streamed batch answers once all its prompts are queued: the chunks of the prompts that run
    arrive (all the way to their finish) while the last prompt still waits for its first token."""
    engine = GatedEngine(held_suffix="-3")
    app = create_app(engine, FakeProcessor(), ServerSettings(served_model_name=MODEL, model_path="/m"))
    body = {"model": MODEL, "prompt": ["a", "b", "c", "d"], "max_tokens": 2, "stream": True}
    timer = threading.Timer(3.0, engine.release.set)  # without streaming early, only this lets it answer
    with ServerThread(app) as server, httpx.Client(base_url=server.base_url, timeout=30) as c:
        timer.start()
        try:
            with c.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                lines = (line[6:] for line in r.iter_lines() if line.startswith("data: "))
                early: list[dict] = []
                while {0, 1, 2} - {ch["index"] for e in early for ch in e["choices"] if ch["finish_reason"]}:
                    early.append(json.loads(next(lines)))
                released_early = engine.release.is_set()
                engine.release.set()
                late = list(lines)
        finally:
            timer.cancel()
    assert not released_early, "the stream began only after the held prompt's first token"
    assert all(ch["index"] != 3 for e in early for ch in e["choices"])
    assert late[-1] == "[DONE]"
    late_chunks = [json.loads(e) for e in late[:-1]]
    assert {ch["index"] for e in late_chunks for ch in e["choices"]} == {3}
    for chunk in early + late_chunks:
        check_completion_chunk(chunk)
    assert not engine.running
