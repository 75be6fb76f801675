"""Unit tests of serving.metrics.Metrics with synthetic engine events."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving.metrics import METRIC_NAMES, Metrics, build_1_2_5_buckets
from serving.types import RequestStats

MODEL = "tiny-vl"


def make_metrics() -> Metrics:
    return Metrics(model_name=MODEL, backend="torch", state_dtype="float32", model_dtype="bfloat16")


def samples(m: Metrics) -> list:
    body, _ = m.render()
    return [s for fam in text_string_to_metric_families(body.decode()) for s in fam.samples]


def value(m: Metrics, name: str, **labels: str) -> float:
    """The value of the one sample called `name` whose labels include `labels`."""
    found = [s.value for s in samples(m) if s.name == name and labels.items() <= s.labels.items()]
    assert len(found) == 1, f"{name}{labels}: {len(found)} samples"
    return found[0]


def bucket(m: Metrics, name: str, le: str, **labels: str) -> float:
    return value(m, f"{name}_bucket", le=le, **labels)


def finished(**kw) -> RequestStats:
    base = dict(
        arrival_time=100.0,
        scheduled_time=100.5,
        first_token_time=101.0,
        prefill_done_time=101.0,
        finish_time=103.0,
        prompt_tokens=40,
        generation_tokens=5,
        finish_reason="length",
        n=1,
        max_tokens=5,
        token_intervals=[0.5, 0.5, 0.5, 0.5],
    )
    base.update(kw)
    return RequestStats(**base)


def test_every_documented_metric_is_exposed_with_model_name():
    m = make_metrics()
    m.on_http("/health", "GET", 200, 0.001)  # labelled families only appear once used
    names = {s.name for s in samples(m)}
    for name in METRIC_NAMES:
        assert {name, name + "_count"} & names, name
    for s in samples(m):
        assert s.name.startswith("infinitevl:"), s.name
        assert s.labels.get("model_name") == MODEL, s


def test_content_type_and_separate_registries():
    a, b = make_metrics(), make_metrics()  # a shared registry would raise on duplicate names
    a.on_request_rejected("overloaded")
    body, content_type = a.render()
    assert content_type.startswith("text/plain; version=0.0.4")
    assert b"infinitevl:requests_rejected_total" in body
    assert value(b, "infinitevl:requests_rejected_total", reason="overloaded") == 0


def test_on_step_sets_gauges_and_counts_tokens():
    m = make_metrics()
    m.on_step(
        num_running=3, num_waiting=7, slots_used=3, slots_total=8, prompt_tokens=100, generation_tokens=0
    )
    m.on_step(num_running=4, num_waiting=6, slots_used=4, slots_total=8, prompt_tokens=0, generation_tokens=4)
    m.on_step(num_running=0, num_waiting=0, slots_used=0, slots_total=8, prompt_tokens=0, generation_tokens=0)
    assert value(m, "infinitevl:num_requests_running") == 0
    assert value(m, "infinitevl:num_requests_waiting") == 0
    assert value(m, "infinitevl:prompt_tokens_total") == 100
    assert value(m, "infinitevl:generation_tokens_total") == 4
    # idle steps (no tokens) are not iterations
    assert value(m, "infinitevl:iteration_tokens_total_count") == 2
    assert value(m, "infinitevl:iteration_tokens_total_sum") == 104
    assert bucket(m, "infinitevl:iteration_tokens_total", "8.0") == 1
    assert bucket(m, "infinitevl:iteration_tokens_total", "64.0") == 1
    assert bucket(m, "infinitevl:iteration_tokens_total", "128.0") == 2


def test_slot_usage_fraction():
    m = make_metrics()
    m.set_cache_info(slots_total=8, bytes_per_slot=127 * 2**20)
    m.on_step(num_running=6, num_waiting=0, slots_used=6, slots_total=8, prompt_tokens=1, generation_tokens=0)
    assert value(m, "infinitevl:kv_cache_usage_perc") == pytest.approx(0.75)
    assert value(m, "infinitevl:slots_used") == 6
    assert value(m, "infinitevl:slots_total") == 8
    assert value(m, "infinitevl:state_bytes_per_slot") == 127 * 2**20
    m.on_step(num_running=0, num_waiting=0, slots_used=0, slots_total=0, prompt_tokens=0, generation_tokens=0)
    assert value(m, "infinitevl:kv_cache_usage_perc") == 0


def test_request_finished_phases():
    m = make_metrics()
    stats = finished()
    m.on_request_finished(stats)
    expected = {
        "e2e_request_latency_seconds": 3.0,
        "request_queue_time_seconds": 0.5,
        "time_to_first_token_seconds": 1.0,
        "request_inference_time_seconds": 2.5,
        "request_prefill_time_seconds": 0.5,
        "request_decode_time_seconds": 2.0,
        "request_time_per_output_token_seconds": 0.5,  # 2 s over 4 intervals
    }
    for name, seconds in expected.items():
        assert value(m, f"infinitevl:{name}_count") == 1, name
        assert value(m, f"infinitevl:{name}_sum") == pytest.approx(seconds), name
    assert value(m, "infinitevl:request_success_total", finished_reason="length") == 1
    assert value(m, "infinitevl:request_success_total", finished_reason="stop") == 0
    assert value(m, "infinitevl:request_prompt_tokens_sum") == 40
    assert value(m, "infinitevl:request_generation_tokens_sum") == 5
    assert value(m, "infinitevl:request_params_max_tokens_sum") == 5
    assert value(m, "infinitevl:request_params_n_sum") == 1


def test_token_intervals_feed_itl_and_its_alias():
    m = make_metrics()
    m.on_request_finished(finished(token_intervals=[0.02, 0.02, 0.2]))
    m.on_request_finished(finished(token_intervals=[0.06]))
    for name in ("infinitevl:inter_token_latency_seconds", "infinitevl:time_per_output_token_seconds"):
        assert value(m, f"{name}_count") == 4
        assert value(m, f"{name}_sum") == pytest.approx(0.3)
        assert bucket(m, name, "0.01") == 0
        assert bucket(m, name, "0.025") == 2
        assert bucket(m, name, "0.075") == 3
        assert bucket(m, name, "0.2") == 4
        assert bucket(m, name, "+Inf") == 4


def test_histogram_counts_equal_requests():
    m = make_metrics()
    for i in range(7):
        m.on_request_finished(finished(finish_reason="stop" if i % 2 else "length", n=1 + i % 3))
    assert value(m, "infinitevl:e2e_request_latency_seconds_count") == 7
    assert value(m, "infinitevl:time_to_first_token_seconds_count") == 7
    assert value(m, "infinitevl:request_success_total", finished_reason="stop") == 3
    assert value(m, "infinitevl:request_success_total", finished_reason="length") == 4
    assert bucket(m, "infinitevl:request_params_n", "1.0") == 3
    assert bucket(m, "infinitevl:request_params_n", "2.0") == 5
    assert bucket(m, "infinitevl:request_params_n", "5.0") == 7


def test_request_aborted_while_waiting_observes_no_phase():
    m = make_metrics()
    stats = RequestStats(arrival_time=5.0, finish_time=6.0, finish_reason="abort", max_tokens=0)
    m.on_request_finished(stats)
    assert value(m, "infinitevl:request_success_total", finished_reason="abort") == 1
    assert value(m, "infinitevl:e2e_request_latency_seconds_count") == 1
    for name in ("time_to_first_token_seconds", "request_queue_time_seconds", "request_decode_time_seconds"):
        assert value(m, f"infinitevl:{name}_count") == 0, name
    assert value(m, "infinitevl:request_params_max_tokens_count") == 0


def test_unforeseen_finish_and_reject_reasons_get_their_own_label():
    m = make_metrics()
    m.on_request_finished(finished(finish_reason="weird"))
    m.on_request_rejected("too_large")
    m.on_request_rejected("draining")
    assert value(m, "infinitevl:request_success_total", finished_reason="weird") == 1
    assert value(m, "infinitevl:requests_rejected_total", reason="too_large") == 1
    assert value(m, "infinitevl:requests_rejected_total", reason="draining") == 1
    assert value(m, "infinitevl:requests_rejected_total", reason="overloaded") == 0


def test_vision_and_http():
    m = make_metrics()
    m.on_vision(num_images=2, num_video_frames=0, seconds=0.03)
    m.on_vision(num_images=0, num_video_frames=16, seconds=0.4)
    assert value(m, "infinitevl:vision_images_total") == 2
    assert value(m, "infinitevl:vision_video_frames_total") == 16
    assert value(m, "infinitevl:vision_encoder_seconds_count") == 2
    assert value(m, "infinitevl:vision_encoder_seconds_sum") == pytest.approx(0.43)
    for status in (200, 200, 503):
        m.on_http("/v1/chat/completions", "POST", status, 0.2)
    route = {"route": "/v1/chat/completions", "method": "POST"}
    assert value(m, "infinitevl:http_requests_total", status="200", **route) == 2
    assert value(m, "infinitevl:http_requests_total", status="503", **route) == 1
    assert value(m, "infinitevl:http_request_duration_seconds_count", **route) == 3


def test_model_info():
    m = Metrics(model_name="x", backend="fla", state_dtype="bfloat16", model_dtype="bfloat16")
    info = [s for s in samples(m) if s.name == "infinitevl:model_info"]
    assert len(info) == 1 and info[0].value == 1
    labels = info[0].labels
    assert (labels["model_name"], labels["backend"], labels["state_dtype"]) == ("x", "fla", "bfloat16")
    assert labels["model_dtype"] == "bfloat16" and labels["version"]


def test_bucket_edges_are_vllms():
    # Edges as written in vLLM's v1 PrometheusStatLogger.
    ttft = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0]
    ttft += [20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
    itl = [
        0.01,
        0.025,
        0.05,
        0.075,
        0.1,
        0.15,
        0.2,
        0.3,
        0.4,
        0.5,
        0.75,
        1.0,
        2.5,
        5.0,
        7.5,
        10.0,
        20.0,
        40.0,
    ]
    itl += [80.0]
    e2e = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0]
    e2e += [480.0, 960.0, 1920.0, 7680.0]
    iteration = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
    m = make_metrics()
    edges: dict[str, list[float]] = {}
    for s in samples(m):
        if s.name.endswith("_bucket") and s.labels["le"] != "+Inf":
            edges.setdefault(s.name.removesuffix("_bucket"), []).append(float(s.labels["le"]))
    assert edges["infinitevl:time_to_first_token_seconds"] == ttft
    assert edges["infinitevl:inter_token_latency_seconds"] == itl
    assert edges["infinitevl:time_per_output_token_seconds"] == itl
    for name in ("e2e_request_latency_seconds", "request_queue_time_seconds", "request_decode_time_seconds"):
        assert edges[f"infinitevl:{name}"] == e2e
    assert edges["infinitevl:iteration_tokens_total"] == iteration
    assert edges["infinitevl:request_params_n"] == [1, 2, 5, 10, 20]
    assert edges["infinitevl:request_prompt_tokens"][:7] == [1, 2, 5, 10, 20, 50, 100]


def test_build_1_2_5_buckets():
    assert build_1_2_5_buckets(100) == (1, 2, 5, 10, 20, 50, 100)
    assert build_1_2_5_buckets(4) == (1, 2)
    assert build_1_2_5_buckets(8192)[-1] == 5000


def test_decode_time_ends_at_last_token_when_known():
    m = make_metrics()
    stats = finished(generation_tokens=3)
    stats.last_token_time = 102.0  # detokenising/stop checks after the last token are not decode time
    m.on_request_finished(stats)
    assert value(m, "infinitevl:request_decode_time_seconds_sum") == pytest.approx(1.0)
    assert value(m, "infinitevl:request_time_per_output_token_seconds_sum") == pytest.approx(0.5)
    assert value(m, "infinitevl:e2e_request_latency_seconds_sum") == pytest.approx(3.0)


def test_steps_are_counted_by_how_their_forward_ran():
    m = make_metrics()
    m.on_step(num_running=1, num_waiting=0, slots_used=1, slots_total=8, prompt_tokens=9, generation_tokens=1,
              mode="eager")  # fmt: skip
    m.on_step(num_running=1, num_waiting=0, slots_used=1, slots_total=8, prompt_tokens=0, generation_tokens=1,
              mode="cuda_graph")  # fmt: skip
    m.on_step(num_running=1, num_waiting=0, slots_used=1, slots_total=8, prompt_tokens=0, generation_tokens=0)
    assert value(m, "infinitevl:engine_steps_total", mode="eager") == 1
    assert value(m, "infinitevl:engine_steps_total", mode="cuda_graph") == 1


def test_engine_counts_eager_and_graph_steps(tiny_ckpt_dir, monkeypatch):
    """The engine labels each step with its runner's answer: on the CPU every step is eager; where
    decode-only steps replay a graph and prefill steps run piecewise graphs (as on a GPU), the
    prefill step is piecewise and the others cuda_graph."""
    from serving.llm import LLM
    from serving.types import SamplingParams

    llm = LLM(str(tiny_ckpt_dir), device="cpu", dtype="float32", max_num_seqs=2)
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    llm.core.metrics = make_metrics()
    llm.generate(["count"], params)
    assert value(llm.core.metrics, "infinitevl:engine_steps_total", mode="eager") == 5
    assert value(llm.core.metrics, "infinitevl:engine_steps_total", mode="cuda_graph") == 0
    llm.core.metrics = make_metrics()
    monkeypatch.setattr(
        llm.core.runner, "step_mode", lambda batch: "cuda_graph" if batch.is_decode_only else "piecewise"
    )
    llm.generate(["count"], params)
    assert value(llm.core.metrics, "infinitevl:engine_steps_total", mode="eager") == 0
    assert value(llm.core.metrics, "infinitevl:engine_steps_total", mode="piecewise") == 1
    assert value(llm.core.metrics, "infinitevl:engine_steps_total", mode="cuda_graph") == 4


def test_engine_counts_every_choice_of_an_n_request(tiny_ckpt_dir):
    """n = 4 choices of 5 tokens each: the generation-token counter and the request histogram count
    all 20 tokens (the prefill step samples the first token of every choice), the inter-token
    latency has each choice's 4 gaps, and the time per output token is one choice's pace."""
    from serving.llm import LLM
    from serving.types import SamplingParams

    llm = LLM(str(tiny_ckpt_dir), device="cpu", dtype="float32", max_num_seqs=4)
    llm.core.metrics = m = make_metrics()
    outs = llm.generate(
        ["count"], SamplingParams(temperature=0.8, max_tokens=5, ignore_eos=True, n=4, seed=1)
    )
    assert sum(len(c.token_ids) for c in outs[0].choices) == 20
    assert value(m, "infinitevl:generation_tokens_total") == 20
    assert value(m, "infinitevl:request_generation_tokens_sum") == 20
    assert value(m, "infinitevl:inter_token_latency_seconds_count") == 16
    itl_mean = value(m, "infinitevl:inter_token_latency_seconds_sum") / 16
    tpot = value(m, "infinitevl:request_time_per_output_token_seconds_sum")
    assert tpot == pytest.approx(itl_mean, rel=0.5)  # about one step a token, not a quarter of one


def test_observe_many_equals_observing_one_by_one() -> None:
    """observe_many (a finished request's token intervals in one go) leaves every bucket and the count
    as observing each value does, the sum within float rounding; values on a bucket edge land in it,
    past the last finite edge in +Inf, and a NaN in none (as observe)."""
    import random

    from prometheus_client import CollectorRegistry, Histogram

    from serving.metrics import ITL_BUCKETS, observe_many

    rng = random.Random(1)
    values = [rng.random() * 0.3 for _ in range(500)] + list(ITL_BUCKETS) + [0.0, 100.0]
    for extra in ([], [float("nan")]):
        rendered = []
        for bulk in (False, True):
            reg = CollectorRegistry()
            child = Histogram("h", "d", ["m"], buckets=ITL_BUCKETS, registry=reg).labels("x")
            if bulk:
                observe_many(values + extra, child)
            else:
                for v in values + extra:
                    child.observe(v)
            samples = [s for f in reg.collect() for s in f.samples if not s.name.endswith("_created")]
            rendered.append({s.name + s.labels.get("le", ""): s.value for s in samples})
        one, many = rendered
        assert one.keys() == many.keys()
        for key in one:
            if key == "h_sum":
                assert (
                    (one[key] != one[key] and many[key] != many[key])
                    if extra
                    else many[key] == pytest.approx(one[key])
                )
            else:
                assert one[key] == many[key], key
        assert one["h_count"] == len(values)


def test_observe_many_falls_back_without_the_histogram_fields() -> None:
    from serving.metrics import observe_many

    class Plain:
        seen: list[float] = []

        def observe(self, v: float) -> None:
            self.seen.append(v)

    p = Plain()
    observe_many([0.1, 0.2], p)
    assert p.seen == [0.1, 0.2]
