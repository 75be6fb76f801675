"""Offline throughput of the engine core (no HTTP): N prompts, fixed output length, greedy, ignore_eos.

    python benchmarks/bench_offline.py [--model DIR] [--num-prompts 32] [--prompt-len 64] [--output-len 32]

Prints a table and writes JSON (--out). With no --model it runs on the embedded tiny checkpoint (CPU)."""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import torch

from serving.llm import LLM
from serving.types import SamplingParams


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--out", default=None, help="write results as JSON here")
    args = p.parse_args()
    if args.model is None:
        from model.tiny import default_tiny_checkpoint_dir

        args.model = str(default_tiny_checkpoint_dir())
    llm = LLM(
        args.model,
        device=args.device,
        dtype=args.dtype,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )
    vocab = llm.core.runner.model.config.text.vocab_size
    gen = torch.Generator().manual_seed(0)
    sp = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    prompts = [
        torch.randint(0, min(vocab, 1000), (args.prompt_len,), generator=gen).tolist()
        for _ in range(args.num_prompts)
    ]
    llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=2))  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp)
    dt = time.perf_counter() - t0
    out_tokens = sum(len(c.token_ids) for o in outs for c in o.choices)
    in_tokens = args.num_prompts * args.prompt_len
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "commit": commit,
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available() and args.device != "cpu"
        else platform.processor() or "cpu",
        "model": args.model,
        "num_prompts": args.num_prompts,
        "prompt_len": args.prompt_len,
        "output_len": args.output_len,
        "seconds": round(dt, 3),
        "output_tokens_per_s": round(out_tokens / dt, 1),
        "total_tokens_per_s": round((out_tokens + in_tokens) / dt, 1),
        "slots": llm.stack.layout.num_slots,
    }
    print("| prompts | prompt len | output len | seconds | output tok/s | total tok/s |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {args.num_prompts} | {args.prompt_len} | {args.output_len} | {result['seconds']} | "
        f"{result['output_tokens_per_s']} | {result['total_tokens_per_s']} |"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
