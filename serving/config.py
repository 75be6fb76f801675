"""Engine settings: one frozen dataclass built once at start-up."""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


@dataclass(frozen=True)
class EngineConfig:
    model: str  # local directory (or a resolved Hugging Face snapshot)
    device: str = "cpu"  # "cpu", "cuda", "cuda:N"
    dtype: str = "auto"  # weights and activations; auto: bfloat16 on GPU, float32 on CPU
    state_dtype: str = "float32"  # recurrent state in the pool
    backend: str = "auto"  # "torch" | "triton" | "auto"
    max_num_seqs: int = 64  # slots, at most (fewer if the memory budget says so)
    max_num_batched_tokens: int = 2048  # token budget of one engine step (chunked prefill)
    max_prefill_chunk: int | None = None
    gpu_memory_utilization: float = 0.9
    max_waiting: int = 1024  # bounded waiting queue; beyond it requests get 429
    max_prompt_len: int = 1_048_576  # memory is constant per request; this bounds work per request
    max_tokens_limit: int = 32_768  # largest max_tokens a request may ask for
    enforce_eager: bool = False  # no CUDA graphs
    # steps with prefill rows of up to piecewise_max_tokens run their stateless parts as CUDA graphs
    # (serving.piecewise_graph): None (default) wherever decode CUDA graphs are captured, True the
    # same but warns where they are not, False never (docs/benchmarks.md: the H100 A/B)
    piecewise_graphs: bool | None = None
    # the largest step (in tokens) the piecewise graphs are captured for; larger steps run eagerly.
    # Graph memory grows with it (at the 4B shape 121 MiB for sizes up to 1024, 174 MiB up to 2048)
    piecewise_max_tokens: int = 2048
    async_output: bool = True  # make and emit a step's text while the device runs the next step
    # enqueue step k+1 before step k's tokens reach the host (decode inputs copied on the device); off
    # by default: it trades time to first token (one step more for a request that arrives during a step)
    # for throughput (docs/benchmarks.md, the H100 A/B)
    async_scheduling: bool = False
    seed: int = 0  # default generator of unseeded sampling

    @property
    def torch_dtype(self) -> torch.dtype:
        """The model dtype; `auto` resolves by device: bf16 on GPU, fp32 on CPU (the exact, batch-invariant
        reference path; pass --dtype bfloat16 to halve weight memory on CPU)."""
        if self.dtype == "auto":
            return (
                torch.float32
                if self.device == "cpu" or (self.device == "auto" and not torch.cuda.is_available())
                else torch.bfloat16
            )
        return DTYPES[self.dtype]

    @property
    def torch_state_dtype(self) -> torch.dtype:
        return DTYPES[self.state_dtype]

    def validate(self) -> None:
        if (self.dtype != "auto" and self.dtype not in DTYPES) or self.state_dtype not in (
            "float32",
            "bfloat16",
        ):
            raise ValueError(f"unsupported dtype {self.dtype!r} / state dtype {self.state_dtype!r}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("need max_num_seqs >= 1 and max_num_batched_tokens >= max_num_seqs")
        if not 0.05 <= self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in [0.05, 1]")
        if self.piecewise_max_tokens < 1:
            raise ValueError("piecewise_max_tokens must be >= 1")
