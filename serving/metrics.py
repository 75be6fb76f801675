"""Prometheus metrics of one server process.

Names follow vLLM's (`vllm:` -> `infinitevl:`, same suffixes, meaning and bucket edges) so existing
dashboards and alerts carry over; `docs/metrics.md` holds the mapping table. Every series carries a
`model_name` label. Each `Metrics` owns its own `CollectorRegistry`, so tests can build many.

Engine-side methods run on the engine thread once per step or per finished request; they only touch
pre-bound children (one lock each inside prometheus_client), never look labels up by name.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from importlib import metadata

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.exposition import generate_latest

from serving.types import RequestStats

PREFIX = "infinitevl:"
# The classic text format: every Prometheus 2.x and 3.x scraper reads it (our names need no escaping).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# The gauge the HorizontalPodAutoscaler scales on (through prometheus-adapter, renamed with `_`).
AUTOSCALING_METRIC = "infinitevl:num_requests_waiting"

FINISH_REASONS = ("stop", "length", "abort", "error", "timeout")
REJECT_REASONS = ("overloaded", "invalid", "draining")
STEP_MODES = ("cuda_graph", "piecewise", "eager")  # serving.runner.ModelRunner.step_mode

# Bucket edges, identical to vLLM's (seconds unless noted).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TTFT_BUCKETS += (20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
ITL_BUCKETS += (20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0)
REQUEST_LATENCY_BUCKETS += (60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
PARAMS_N_BUCKETS = (1, 2, 5, 10, 20)
# Ours (no vLLM counterpart).
VISION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
HTTP_BUCKETS += (600.0,)

DEFAULT_MAX_MODEL_LEN = 1 << 20  # tokens; upper edge of the 1-2-5 token-count buckets


def build_1_2_5_buckets(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to and including `max_value` (vLLM's token-count buckets)."""
    buckets: list[int] = []
    scale = 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_value:
                return tuple(buckets)
            buckets.append(mantissa * scale)
        scale *= 10


def package_version() -> str:
    """Installed version of this package, else the source tree's `serving.version`, else "unknown"."""
    try:
        return metadata.version("infinitevl-serve")
    except metadata.PackageNotFoundError:
        pass
    try:
        from serving.version import __version__
    except ImportError:
        return "unknown"
    return str(__version__)


class Metrics:
    """All metrics of one server; `render()` produces the /metrics body."""

    def __init__(
        self,
        *,
        model_name: str,
        backend: str,
        state_dtype: str,
        model_dtype: str,
        registry: CollectorRegistry | None = None,
        max_model_len: int = DEFAULT_MAX_MODEL_LEN,
    ) -> None:
        disable_created_metrics()  # process-wide, as vLLM does: no `*_created` series
        self.model_name = model_name
        self.registry = registry if registry is not None else CollectorRegistry()
        self._build_scheduler_metrics()
        self._build_token_metrics(max_model_len)
        self._build_latency_metrics()
        self._build_own_metrics()
        info = Gauge(
            f"{PREFIX}model_info",
            "Static facts about the served model; the value is always 1.",
            ["model_name", "backend", "state_dtype", "model_dtype", "version"],
            registry=self.registry,
        )
        info.labels(model_name, backend, state_dtype, model_dtype, package_version()).set(1)

    # -- construction -------------------------------------------------------------------------------

    def _gauge(self, name: str, doc: str) -> Gauge:
        metric = Gauge(PREFIX + name, doc, ["model_name"], registry=self.registry)
        return metric.labels(self.model_name)

    def _counter(self, name: str, doc: str) -> Counter:
        metric = Counter(PREFIX + name, doc, ["model_name"], registry=self.registry)
        return metric.labels(self.model_name)

    def _histogram(self, name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
        metric = Histogram(PREFIX + name, doc, ["model_name"], buckets=buckets, registry=self.registry)
        return metric.labels(self.model_name)

    def _build_scheduler_metrics(self) -> None:
        self.num_requests_running = self._gauge(
            "num_requests_running", "Number of requests in model execution batches."
        )
        self.num_requests_waiting = self._gauge(
            "num_requests_waiting", "Number of requests waiting to be processed (drives autoscaling)."
        )
        self.kv_cache_usage_perc = self._gauge(
            "kv_cache_usage_perc", "Fraction of state slots in use (1 means 100 percent usage)."
        )
        self.slots_total = self._gauge("slots_total", "Number of state slots (max concurrent requests).")
        self.slots_used = self._gauge("slots_used", "Number of state slots held by requests.")
        self.state_bytes_per_slot = self._gauge(
            "state_bytes_per_slot", "Device bytes of one slot (recurrent, conv and window state)."
        )

    def _build_token_metrics(self, max_model_len: int) -> None:
        token_buckets = build_1_2_5_buckets(max_model_len)
        self.prompt_tokens = self._counter("prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = self._counter("generation_tokens", "Number of generation tokens processed.")
        self.iteration_tokens = self._histogram(
            "iteration_tokens_total",
            "Histogram of number of tokens per engine_step.",
            ITERATION_TOKENS_BUCKETS,
        )
        self.request_prompt_tokens = self._histogram(
            "request_prompt_tokens", "Number of prefill tokens processed.", token_buckets
        )
        self.request_generation_tokens = self._histogram(
            "request_generation_tokens", "Number of generation tokens processed.", token_buckets
        )
        self.request_params_n = self._histogram(
            "request_params_n", "Histogram of the n request parameter.", PARAMS_N_BUCKETS
        )
        self.request_params_max_tokens = self._histogram(
            "request_params_max_tokens", "Histogram of the max_tokens request parameter.", token_buckets
        )
        success = Counter(
            f"{PREFIX}request_success",
            "Count of finished requests, by finish reason.",
            ["model_name", "finished_reason"],
            registry=self.registry,
        )
        self._success = {reason: success.labels(self.model_name, reason) for reason in FINISH_REASONS}
        self._success_family = success

    def _build_latency_metrics(self) -> None:
        self.ttft = self._histogram(
            "time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS
        )
        self.inter_token_latency = self._histogram(
            "inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", ITL_BUCKETS
        )
        self.time_per_output_token = self._histogram(
            "time_per_output_token_seconds",
            "Histogram of time per output token in seconds. DEPRECATED: same as inter_token_latency_seconds.",
            ITL_BUCKETS,
        )
        self.request_time_per_output_token = self._histogram(
            "request_time_per_output_token_seconds",
            "Histogram of decode time divided by (generation tokens - 1), per request.",
            ITL_BUCKETS,
        )
        phases = {
            "e2e_request_latency_seconds": "Histogram of e2e request latency in seconds.",
            "request_queue_time_seconds": "Histogram of time spent in WAITING phase for request.",
            "request_inference_time_seconds": "Histogram of time spent in RUNNING phase for request.",
            "request_prefill_time_seconds": "Histogram of time spent in PREFILL phase for request.",
            "request_decode_time_seconds": "Histogram of time spent in DECODE phase for request.",
        }
        self._phase = {
            name: self._histogram(name, doc, REQUEST_LATENCY_BUCKETS) for name, doc in phases.items()
        }

    def _build_own_metrics(self) -> None:
        self.vision_images = self._counter("vision_images", "Images run through the vision encoder.")
        self.vision_video_frames = self._counter(
            "vision_video_frames", "Video frames run through the vision encoder."
        )
        self.vision_encoder_seconds = self._histogram(
            "vision_encoder_seconds", "Histogram of vision encoder time per call in seconds.", VISION_BUCKETS
        )
        rejected = Counter(
            f"{PREFIX}requests_rejected",
            "Requests refused before reaching the engine, by reason.",
            ["model_name", "reason"],
            registry=self.registry,
        )
        self._rejected_family = rejected
        self._rejected = {reason: rejected.labels(self.model_name, reason) for reason in REJECT_REASONS}
        steps = Counter(
            f"{PREFIX}engine_steps",
            "Engine steps by how their forward ran: cuda_graph (a captured decode step replayed), piecewise "
            "(a step with prefill rows of up to --piecewise-max-tokens tokens: its stateless parts replayed "
            "as CUDA graphs, the mixers eager) or eager (larger steps with prefill rows, and all steps "
            "without CUDA graphs). An eager step's launch holds the host for its whole forward, a piecewise "
            "step's for about two thirds of that, so their share drives the tail of the inter-token latency.",
            ["model_name", "mode"],
            registry=self.registry,
        )
        self._steps = {mode: steps.labels(self.model_name, mode) for mode in STEP_MODES}
        self._http_requests = Counter(
            f"{PREFIX}http_requests",
            "HTTP requests served, by route template, method and status code.",
            ["model_name", "route", "method", "status"],
            registry=self.registry,
        )
        self._http_duration = Histogram(
            f"{PREFIX}http_request_duration_seconds",
            "Histogram of HTTP request handling time in seconds (until the last byte of a stream).",
            ["model_name", "route", "method"],
            buckets=HTTP_BUCKETS,
            registry=self.registry,
        )

    # -- engine side --------------------------------------------------------------------------------

    def on_step(
        self,
        *,
        num_running: int,
        num_waiting: int,
        slots_used: int,
        slots_total: int,
        prompt_tokens: int,
        generation_tokens: int,
        mode: str | None = None,
    ) -> None:
        """Record one engine step: queue gauges, slot use, the tokens it computed and how its forward
        ran (`mode`: one of STEP_MODES; None when no forward ran, a refresh of the gauges)."""
        self.num_requests_running.set(num_running)
        self.num_requests_waiting.set(num_waiting)
        self.slots_used.set(slots_used)
        self.slots_total.set(slots_total)
        self.kv_cache_usage_perc.set(slots_used / slots_total if slots_total > 0 else 0.0)
        if prompt_tokens:
            self.prompt_tokens.inc(prompt_tokens)
        if generation_tokens:
            self.generation_tokens.inc(generation_tokens)
        if prompt_tokens + generation_tokens > 0:
            self.iteration_tokens.observe(prompt_tokens + generation_tokens)
        if mode is not None:
            self._steps[mode].inc()

    def on_request_finished(self, stats: RequestStats) -> None:
        """Record a finished request: its finish reason, sizes and phase latencies.

        A phase whose timestamps are missing (e.g. aborted while waiting) is not observed.
        """
        self._success_counter(stats.finish_reason).inc()
        self.request_prompt_tokens.observe(stats.prompt_tokens)
        self.request_generation_tokens.observe(stats.generation_tokens)
        self.request_params_n.observe(stats.n)
        if stats.max_tokens > 0:
            self.request_params_max_tokens.observe(stats.max_tokens)
        observe_many(stats.token_intervals, self.inter_token_latency, self.time_per_output_token)
        self._observe_phases(stats)

    def _success_counter(self, reason: str) -> Counter:
        child = self._success.get(reason)
        if child is None:  # an unforeseen reason still counts, under its own label
            child = self._success[reason] = self._success_family.labels(self.model_name, reason)
        return child

    def _observe_phases(self, stats: RequestStats) -> None:
        arrival, scheduled = stats.arrival_time, stats.scheduled_time
        first, finish = stats.first_token_time, stats.finish_time
        if finish is not None:
            self._phase["e2e_request_latency_seconds"].observe(finish - arrival)
        if scheduled is not None:
            self._phase["request_queue_time_seconds"].observe(scheduled - arrival)
        if first is not None:
            self.ttft.observe(first - arrival)
        if scheduled is not None and finish is not None:
            self._phase["request_inference_time_seconds"].observe(finish - scheduled)
        if scheduled is not None and first is not None:
            prefill_end = stats.prefill_done_time if stats.prefill_done_time is not None else first
            self._phase["request_prefill_time_seconds"].observe(prefill_end - scheduled)
        # Decode ends at the last token when the engine records it (vLLM's definition), else at finish.
        last = getattr(stats, "last_token_time", None) or finish
        if first is not None and last is not None:
            self._phase["request_decode_time_seconds"].observe(last - first)
            # per output token of one choice: n choices decode side by side, not one after another
            per_choice = stats.longest_choice_tokens or stats.generation_tokens
            if per_choice > 1:
                self.request_time_per_output_token.observe((last - first) / (per_choice - 1))

    def on_vision(self, *, num_images: int, num_video_frames: int, seconds: float) -> None:
        """Record one vision-encoder call over `num_images` images and `num_video_frames` frames."""
        if num_images:
            self.vision_images.inc(num_images)
        if num_video_frames:
            self.vision_video_frames.inc(num_video_frames)
        self.vision_encoder_seconds.observe(seconds)

    def set_cache_info(self, *, slots_total: int, bytes_per_slot: int) -> None:
        """Record the slot pool's fixed size (once, at start-up)."""
        self.slots_total.set(slots_total)
        self.state_bytes_per_slot.set(bytes_per_slot)

    def on_request_rejected(self, reason: str) -> None:
        """Count a request refused before the engine ("overloaded", "invalid", "draining", ...)."""
        child = self._rejected.get(reason)
        if child is None:
            child = self._rejected[reason] = self._rejected_family.labels(self.model_name, reason)
        child.inc()

    # -- API side -----------------------------------------------------------------------------------

    def on_http(self, route: str, method: str, status: int, seconds: float) -> None:
        """Record one HTTP request. `route` must be the route template ("/v1/chat/completions"),
        never the raw path, to keep label cardinality bounded."""
        self._http_requests.labels(self.model_name, route, method, str(status)).inc()
        self._http_duration.labels(self.model_name, route, method).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of every metric: (body, content type)."""
        return generate_latest(self.registry), CONTENT_TYPE


# Every metric family this module exports, as named in the exposition (counters with `_total`).
METRIC_NAMES: tuple[str, ...] = tuple(
    PREFIX + name
    for name in (
        "num_requests_running",
        "num_requests_waiting",
        "kv_cache_usage_perc",
        "slots_total",
        "slots_used",
        "state_bytes_per_slot",
        "prompt_tokens_total",
        "generation_tokens_total",
        "iteration_tokens_total",
        "request_success_total",
        "request_prompt_tokens",
        "request_generation_tokens",
        "request_params_n",
        "request_params_max_tokens",
        "time_to_first_token_seconds",
        "inter_token_latency_seconds",
        "time_per_output_token_seconds",
        "request_time_per_output_token_seconds",
        "e2e_request_latency_seconds",
        "request_queue_time_seconds",
        "request_inference_time_seconds",
        "request_prefill_time_seconds",
        "request_decode_time_seconds",
        "vision_images_total",
        "vision_video_frames_total",
        "vision_encoder_seconds",
        "requests_rejected_total",
        "http_requests_total",
        "http_request_duration_seconds",
        "model_info",
    )
)


def observe_many(values: Sequence[float], *children: Histogram) -> None:
    """`child.observe(v)` for every v of `values` and every child (a request's token intervals at its
    finish: hundreds at once, on the engine thread): each bucket's count and the sum taken once, one
    lock each, instead of two per value (about 10 times faster); children with the same bucket bounds
    share one counting pass. Falls back to `observe` where prometheus_client's histogram lacks the
    fields used. The sum may differ from sequential adds in the last bits (summation order)."""
    counted: dict[tuple[float, ...], list[int]] = {}
    value_sum = sum(values)
    for child in children:
        bounds = getattr(child, "_upper_bounds", None)
        buckets = getattr(child, "_buckets", None)
        total = getattr(child, "_sum", None)
        if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
            for v in values:
                child.observe(v)
            continue
        child._raise_if_not_observable()
        counts = counted.get(tuple(bounds))
        if counts is None:
            counts = counted[tuple(bounds)] = [0] * len(bounds)
            for v in values:
                if v == v:  # observe counts a NaN in no bucket (it is <= no bound)
                    counts[bisect_left(bounds, v)] += 1  # the first bound >= v, as observe finds it
        total.inc(value_sum)
        for i, n in enumerate(counts):
            if n:
                buckets[i].inc(n)
