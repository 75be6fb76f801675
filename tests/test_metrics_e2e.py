"""Black-box: after real traffic against a real server process, /metrics holds every documented metric
with values that agree with what the clients saw."""

from __future__ import annotations

import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving.metrics import METRIC_NAMES
from tests.server_proc import require_cli, running_server

MODEL = "tiny-e2e"
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def traffic(tiny_ckpt_dir):
    """Serve 4 requests (3 chat, 1 streamed completion) and 1 invalid one; return what clients saw and
    the /metrics text read afterwards."""
    require_cli()
    args = ("--model", str(tiny_ckpt_dir), "--served-model-name", MODEL, "--max-num-seqs", "4")
    with running_server(*args) as base_url, httpx.Client(base_url=base_url, timeout=120) as client:
        before = client.get("/metrics")
        usages = [chat(client, f"question {i}") for i in range(3)]
        usages.append(streamed_completion(client))
        bad = client.post("/v1/chat/completions", json={"model": MODEL, "messages": [], "max_tokens": -1})
        after = client.get("/metrics")
    return {"before": before, "after": after, "usages": usages, "bad_status": bad.status_code}


def chat(client: httpx.Client, text: str) -> dict:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,
    }
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] == "length"
    return response.json()["usage"]


def streamed_completion(client: httpx.Client) -> dict:
    body = {
        "model": MODEL,
        "prompt": "once upon a time",
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    usage = None
    with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                usage = json.loads(line[6:]).get("usage") or usage
    assert usage is not None, "no usage chunk in the stream"
    return usage


def parse(text: str) -> list:
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


def total(samples: list, name: str, **labels: str) -> float:
    return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())


def test_metrics_endpoint_format(traffic):
    response = traffic["after"]
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert traffic["before"].status_code == 200


def test_every_documented_metric_is_exposed(traffic):
    samples = parse(traffic["after"].text)
    names = {s.name for s in samples}
    missing = [n for n in METRIC_NAMES if n not in names and n + "_count" not in names]
    assert not missing
    ours = [s for s in samples if s.name.startswith("infinitevl:")]
    assert ours and all(s.labels.get("model_name") == MODEL for s in ours)


def test_request_histograms_count_every_request(traffic):
    samples = parse(traffic["after"].text)
    served = len(traffic["usages"])
    assert total(samples, "infinitevl:request_success_total", finished_reason="length") == served
    assert total(samples, "infinitevl:request_success_total") == served  # the invalid one never ran
    for name in (
        "e2e_request_latency_seconds",
        "time_to_first_token_seconds",
        "request_queue_time_seconds",
        "request_prefill_time_seconds",
        "request_decode_time_seconds",
        "request_prompt_tokens",
        "request_generation_tokens",
        "request_params_max_tokens",
    ):
        assert total(samples, f"infinitevl:{name}_count") == served, name
    assert total(samples, "infinitevl:request_params_max_tokens_sum") == served * MAX_TOKENS


def test_token_counters_agree_with_usage(traffic):
    samples = parse(traffic["after"].text)
    prompt = sum(u["prompt_tokens"] for u in traffic["usages"])
    generated = sum(u["completion_tokens"] for u in traffic["usages"])
    assert generated == len(traffic["usages"]) * MAX_TOKENS
    assert total(samples, "infinitevl:generation_tokens_total") == generated
    assert total(samples, "infinitevl:prompt_tokens_total") == prompt
    assert total(samples, "infinitevl:request_prompt_tokens_sum") == prompt
    assert total(samples, "infinitevl:request_generation_tokens_sum") == generated
    assert total(samples, "infinitevl:iteration_tokens_total_sum") == prompt + generated
    # one gap between each pair of consecutive tokens of a request
    gaps = sum(u["completion_tokens"] - 1 for u in traffic["usages"])
    assert total(samples, "infinitevl:inter_token_latency_seconds_count") == gaps
    assert total(samples, "infinitevl:time_per_output_token_seconds_count") == gaps


def test_counters_grew_from_before(traffic):
    before, after = parse(traffic["before"].text), parse(traffic["after"].text)
    for name in ("infinitevl:generation_tokens_total", "infinitevl:prompt_tokens_total"):
        assert total(after, name) > total(before, name)


def test_gauges_are_sane(traffic):
    samples = parse(traffic["after"].text)
    slots = total(samples, "infinitevl:slots_total")
    assert 1 <= slots <= 4
    assert total(samples, "infinitevl:state_bytes_per_slot") > 0
    assert 0 <= total(samples, "infinitevl:kv_cache_usage_perc") <= 1
    assert 0 <= total(samples, "infinitevl:slots_used") <= slots
    assert 0 <= total(samples, "infinitevl:num_requests_running") <= slots
    assert total(samples, "infinitevl:num_requests_waiting") == 0
    (info,) = [s for s in samples if s.name == "infinitevl:model_info"]
    assert info.value == 1 and info.labels["backend"] and info.labels["version"]


def test_http_metrics_by_route_and_status(traffic):
    samples = parse(traffic["after"].text)
    chat_ok = total(samples, "infinitevl:http_requests_total", route="/v1/chat/completions", status="200")
    assert chat_ok == 3
    assert total(samples, "infinitevl:http_requests_total", route="/v1/completions", status="200") == 1
    status = str(traffic["bad_status"])
    assert status.startswith("4")
    assert total(samples, "infinitevl:http_requests_total", route="/v1/chat/completions", status=status) == 1
    assert total(samples, "infinitevl:http_request_duration_seconds_count", route="/v1/chat/completions") == 4
