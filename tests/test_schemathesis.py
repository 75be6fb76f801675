"""Property-based fuzzing with schemathesis against the real stack (tiny checkpoint, CPU, in-process server).

The app's own `/openapi.json` declares every POST route's JSON body from the pydantic model the route
validates against (the routes read raw JSON to answer OpenAI-style 400s instead of FastAPI's 422s).
schemathesis generates bounded numbers of valid and invalid requests from that document. Checked: no 5xx,
and every error in the OpenAI envelope; afterwards all slots are free and the server is healthy.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fake_engine import ServerThread

from api.app import TokenizeBody, create_app
from api.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest
from api.settings import ServerSettings

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")
pytest.importorskip("serving.build")

MODEL = "tiny"
MAX_EXAMPLES = 30
BODIES = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
    "/tokenize": TokenizeBody,
    "/detokenize": DetokenizeRequest,
}


@pytest.fixture(scope="module")
def server(tiny_ckpt_dir) -> Iterator[tuple[str, Any]]:
    from serving.build import build_engine
    from serving.config import EngineConfig
    from serving.engine import AsyncEngine

    stack = build_engine(
        EngineConfig(model=str(tiny_ckpt_dir), device="cpu", backend="torch", max_num_seqs=4)
    )
    engine = AsyncEngine(stack.core, info={"model": MODEL})
    engine.start()
    # small limits keep every generated request cheap: long prompts and large max_tokens become 400s
    settings = ServerSettings(
        served_model_name=MODEL, model_path=str(tiny_ckpt_dir), max_prompt_len=512, max_tokens_limit=8
    )
    try:
        with ServerThread(create_app(engine, stack.processor, settings)) as srv:
            yield srv.base_url, stack.core
    finally:
        engine.shutdown()


def test_openapi_document_declares_request_bodies(server) -> None:
    doc = httpx.get(server[0] + "/openapi.json", timeout=10).json()
    for path, model in BODIES.items():
        body = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{model.__name__}"}
        assert model.__name__ in doc["components"]["schemas"]


def fuzz_operation(operation: Any, base_url: str, failures: list[str], calls: list[int]) -> None:
    """Run MAX_EXAMPLES generated cases of one operation; record 5xx and non-envelope errors."""

    @hypothesis.settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(hypothesis.HealthCheck),
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
    )
    @hypothesis.given(case=operation.as_strategy())
    def fuzz(case: Any) -> None:
        calls[0] += 1
        if isinstance(case.body, dict) and "model" in case.body and calls[0] % 2:
            case.body["model"] = MODEL  # half the bodies name the served model, to get past the 404
        response = case.call(base_url=base_url, timeout=60)
        if response.status_code >= 500:
            failures.append(f"{operation.label}: {response.status_code} {response.text[:300]}")
        elif response.status_code >= 400:
            body = response.json()
            if not isinstance(body.get("error"), dict) or "message" not in body["error"]:
                failures.append(f"{operation.label}: not the error envelope: {response.text[:300]}")

    fuzz()


def test_fuzz_api(server) -> None:
    base_url, core = server
    schema = schemathesis.openapi.from_url(base_url + "/openapi.json")
    failures: list[str] = []
    calls = [0]

    for result in schema.get_all_operations():
        fuzz_operation(result.ok(), base_url, failures, calls)
    assert not failures, "\n".join(failures[:10])
    assert calls[0] >= MAX_EXAMPLES * len(BODIES)
    assert httpx.get(base_url + "/health", timeout=10).status_code == 200
    for _ in range(200):  # the engine thread frees the last slots after the last answer went out
        if core.pool.num_free == core.pool.num_slots:
            break
        time.sleep(0.05)
    core.check()
    assert core.pool.num_free == core.pool.num_slots and not core.requests
