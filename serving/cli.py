"""`infinitevl` command line: serve, tiny-checkpoint, generate."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger("infinitevl")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="checkpoint directory or Hugging Face repo id (default: the embedded tiny checkpoint)",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float32", "float16"],
        help="auto: bf16 on GPU, fp32 on CPU",
    )
    p.add_argument(
        "--state-dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="recurrent state dtype in the pool",
    )
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument("--max-num-seqs", type=int, default=64, help="slots in the state pool (upper bound)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget of one engine step")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--max-waiting", type=int, default=1024, help="bounded waiting queue; beyond it: 429")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument(
        "--piecewise-graphs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="steps with prefill rows of up to --piecewise-max-tokens tokens run everything but the "
        "stateful mixers as CUDA graphs (a third less host time per such step on an H100). Default: on "
        "wherever decode CUDA graphs are captured (GPU, Triton backend, no --enforce-eager)",
    )
    p.add_argument(
        "--piecewise-max-tokens",
        type=int,
        default=2048,
        help="the largest step (tokens) the piecewise graphs are captured for, at most the step token "
        "budget; larger steps run eagerly. More covers more prefill steps, for more graph memory "
        "(174 MiB at 2048 for the 4B model, 121 MiB at 1024)",
    )
    p.add_argument(
        "--disable-async-output",
        action="store_true",
        help="detokenize and emit each step's tokens before the next step is launched, not while it runs",
    )
    p.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="enqueue each step before the tokens of the step still running reach the host (its decode "
        "inputs are copied on the device), so the device never waits for the host between steps; a "
        "finishing request may cost one discarded row. Off by default: more throughput (2-13%% on an H100), "
        "but a request arriving during a step waits one step longer for its first token",
    )
    p.add_argument("--seed", type=int, default=0)


def engine_config_from_args(args: argparse.Namespace, model_path: str):
    from serving.config import EngineConfig

    return EngineConfig(
        model=model_path,
        device=args.device,
        dtype=args.dtype,
        state_dtype=args.state_dtype,
        backend=args.backend,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_waiting=args.max_waiting,
        max_prompt_len=getattr(args, "max_prompt_len", None) or 1_048_576,
        max_tokens_limit=getattr(args, "max_tokens_limit", 32_768) or 2**31 - 1,  # 0: no cap
        enforce_eager=args.enforce_eager,
        piecewise_graphs=getattr(args, "piecewise_graphs", None),
        piecewise_max_tokens=getattr(args, "piecewise_max_tokens", 2048),
        async_output=not getattr(args, "disable_async_output", False),
        async_scheduling=bool(getattr(args, "async_scheduling", False)),
        seed=args.seed,
    )


def _model_path(args: argparse.Namespace) -> str:
    if args.model:
        return args.model
    from model.tiny import default_tiny_checkpoint_dir

    path = default_tiny_checkpoint_dir()
    logger.info("no --model given: serving the embedded tiny checkpoint at %s", path)
    return str(path)


def cmd_serve(args: argparse.Namespace) -> int:
    from api.app import create_app
    from api.settings import settings_from_args
    from serving.build import build_engine
    from serving.engine import AsyncEngine
    from serving.metrics import Metrics
    from serving.version import __version__

    model_path = _model_path(args)
    if not args.model and not args.served_model_name:
        args.served_model_name = "infinitevl"  # the embedded tiny checkpoint
    config = engine_config_from_args(args, model_path)
    settings = settings_from_args(args, model_path=model_path)
    stack = build_engine(config)
    metrics = Metrics(
        model_name=settings.served_model_name,
        backend=stack.backend,
        state_dtype=config.state_dtype,
        model_dtype=str(config.torch_dtype).removeprefix("torch."),
    )
    metrics.set_cache_info(slots_total=stack.layout.num_slots, bytes_per_slot=stack.layout.bytes_per_slot)
    stack.core.metrics = metrics
    engine = AsyncEngine(
        stack.core,
        info={
            "version": __version__,
            "model": settings.served_model_name,
            "model_path": str(stack.model_dir),
            "backend": stack.backend,
            "device": config.device,
            "dtype": str(config.torch_dtype).removeprefix("torch."),
            "state_dtype": config.state_dtype,
            "vocab_size": stack.core.runner.model.config.text.vocab_size,
            "num_slots": stack.layout.num_slots,
            "bytes_per_slot": stack.layout.bytes_per_slot,
        },
    )
    engine.start()
    app = create_app(engine, stack.processor, settings, metrics=metrics)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=5,
        http=head_timeout_protocol(settings.request_read_timeout_s),
    )
    server = DrainingServer(config, app=app, shutdown_timeout=args.shutdown_timeout)
    server.run()
    engine.shutdown()
    return 0


class HeadTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request head (request line and headers): a
    connection that has not sent a whole head `head_timeout_s` seconds after it opened, or after the
    first byte of a later request arrived, is closed, with a 408 if part of a head came. (uvicorn's own
    keep-alive timeout starts only after a response; the body's deadline is the app's, api.middleware.Gate.)"""

    head_timeout_s: float = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._on_head_timeout)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the head is complete: the app has the request
            self._cancel_head_timer()
        elif self._head_timer is None:  # the first bytes of the next request's head
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._on_head_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _on_head_timeout(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        partial_head, _ = self.conn.trailing_data
        if partial_head.strip():
            self.transport.write(_head_timeout_response(self.head_timeout_s))
        self.transport.close()


def _head_timeout_response(seconds: float) -> bytes:
    """A raw 408 in the OpenAI error envelope (h11 cannot answer a request it has not parsed)."""
    from api.errors import error_body

    message = f"the request head (request line and headers) was not received within {seconds:g} s"
    body = json.dumps(error_body(message, "timeout_error", None, "request_read_timeout")).encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\nx-request-id: {uuid.uuid4().hex}\r\n\r\n"
    )
    return head.encode("ascii") + body


def head_timeout_protocol(head_timeout_s: float) -> type[HeadTimeoutProtocol]:
    """`HeadTimeoutProtocol` with this deadline, for uvicorn.Config(http=...)."""
    return type("HeadTimeoutProtocol", (HeadTimeoutProtocol,), {"head_timeout_s": head_timeout_s})


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT: /health turns 503 and new requests get 503 (app.state.draining), requests in
    flight finish (up to shutdown_timeout seconds), then uvicorn shuts down and the process exits 0.
    A second signal exits at once."""

    def __init__(self, config: uvicorn.Config, *, app, shutdown_timeout: float) -> None:
        super().__init__(config)
        self._app = app
        self._shutdown_timeout = shutdown_timeout
        self._draining = False

    def handle_exit(self, sig, frame) -> None:  # called from uvicorn's signal handler
        if self._draining:
            return super().handle_exit(sig, frame)
        self._draining = True
        self._app.state.draining = True
        logger.info("signal %s: draining (up to %.0f s)", sig, self._shutdown_timeout)
        threading.Thread(target=self._wait_then_exit, daemon=True).start()

    def _wait_then_exit(self) -> None:
        deadline = time.monotonic() + self._shutdown_timeout
        while time.monotonic() < deadline and getattr(self._app.state, "in_flight", 0) > 0:
            time.sleep(0.1)
        left = getattr(self._app.state, "in_flight", 0)
        if left:
            logger.warning("shutdown timeout: %d request(s) still in flight", left)
        self.should_exit = True


def cmd_tiny_checkpoint(args: argparse.Namespace) -> int:
    from pathlib import Path

    from model.tiny import write_tiny_checkpoint

    out = write_tiny_checkpoint(Path(args.path), seed=args.seed)
    print(out)
    return 0


def cmd_plan_pool(args: argparse.Namespace) -> int:
    """Pool layout for a checkpoint config on a GPU of a given size, without a GPU: weights counted on the
    meta device, the activation workspace given (measure it with a real start-up on the device)."""
    import torch

    from cache.pool import plan_pool
    from model.backends import get_backend
    from model.config import load_config, parse_config
    from model.infinitevl import InfiniteVLForCausalLM
    from serving.config import DTYPES

    path = Path(args.config)
    cfg = parse_config(json.loads(path.read_text())) if path.is_file() else load_config(path)
    with torch.device("meta"):
        model = InfiniteVLForCausalLM(cfg, get_backend("torch", "cpu"))
    dtype = DTYPES[args.dtype]
    weight_bytes = sum(p.numel() for p in model.parameters()) * torch.empty((), dtype=dtype).element_size()
    budget = (
        int(args.memory_gib * 2**30 * args.gpu_memory_utilization)
        - weight_bytes
        - int(args.workspace_gib * 2**30)
    )
    layout = plan_pool(
        cfg.text,
        state_dtype=DTYPES[args.state_dtype],
        model_dtype=dtype,
        max_num_seqs=args.max_num_seqs,
        memory_budget_bytes=budget,
    )
    print(
        f"weights {weight_bytes / 2**30:.2f} GiB, workspace {args.workspace_gib:.2f} GiB, pool budget {budget / 2**30:.2f} GiB"
    )
    print(layout.describe())
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from serving.llm import LLM, Prompt
    from serving.types import SamplingParams

    llm = LLM(_model_path(args), **_engine_kwargs(args))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    prompts = [Prompt(messages=[{"role": "user", "content": p}]) for p in args.prompt]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    dt = time.perf_counter() - t0
    for o in outs:
        for ch in o.choices:
            print(f"[{o.request_id}.{ch.index}] ({ch.finish_reason}) {ch.text!r}")
    ntok = sum(len(ch.token_ids) for o in outs for ch in o.choices)
    print(f"{ntok} tokens in {dt:.2f} s ({ntok / dt:.1f} tok/s)", file=sys.stderr)
    return 0


def _engine_kwargs(args: argparse.Namespace) -> dict:
    cfg = engine_config_from_args(args, "")
    return {k: getattr(cfg, k) for k in cfg.__dataclass_fields__ if k != "model"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infinitevl", description="InfiniteVL serving engine")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    add_engine_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    serve.add_argument(
        "--shutdown-timeout",
        type=float,
        default=60.0,
        help="seconds to let requests in flight finish on SIGTERM",
    )
    from api.settings import add_server_args

    add_server_args(serve)
    serve.set_defaults(func=cmd_serve)

    tiny = sub.add_parser(
        "tiny-checkpoint", help="write the tiny test checkpoint (real architecture, random weights)"
    )
    tiny.add_argument("path")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=cmd_tiny_checkpoint)

    plan = sub.add_parser("plan-pool", help="print the state-pool layout for a config and a GPU memory size")
    plan.add_argument("config", help="a config.json file or a checkpoint directory holding one")
    plan.add_argument("--memory-gib", type=float, default=80.0)
    plan.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    plan.add_argument(
        "--workspace-gib", type=float, default=2.0, help="activation workspace of the warm-up pass"
    )
    plan.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    plan.add_argument("--state-dtype", default="float32", choices=["float32", "bfloat16"])
    plan.add_argument("--max-num-seqs", type=int, default=None)
    plan.set_defaults(func=cmd_plan_pool)

    gen = sub.add_parser("generate", help="offline generation from the command line")
    add_engine_args(gen)
    gen.add_argument("--prompt", action="append", required=True)
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.set_defaults(func=cmd_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
