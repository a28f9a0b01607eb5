"""How the loaded pipeline runs: memory mode, quantization, attention kernel, compilation, acceleration levels.

`RuntimeOptions` is what the server's configuration says; `plan_runtime` checks it against this machine and
the weights on disk *before* anything is loaded (a mode this machine can't run is refused with a plain error at
start-up); `Runtime.apply` then sets the loaded pipeline up, and `Runtime.describe` says what was done, for
/health's capabilities.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipelines.acceleration import Accelerator
from pipelines.fastpath import check_attention_backend, compile_transformer, set_attention_backend
from pipelines.memory import (
    ComponentSizes,
    GiB,
    MemoryPlan,
    apply_memory_plan,
    component_sizes,
    describe_sizes,
    resolve_plan,
)

log = logging.getLogger(__name__)


@dataclass
class RuntimeOptions:
    memory_mode: str = "auto"  # auto | full | multi-gpu | offload-text-encoder | model-offload | group-offload
    text_encoder_device: str | None = None  # e.g. cuda:1 (multi-gpu)
    quantization: str = "auto"  # none | int8 | fp8 | int4 | auto (transformer weights; auto may quantize both)
    memory_reserve_gb: float | None = None  # GPU memory kept for activations; None: estimated per request size
    attention_backend: str | None = None  # a diffusers attention backend, e.g. _native_cudnn, flash, _flash_3
    compile: bool = False  # regional torch.compile of the transformer's repeated blocks
    compile_mode: str | None = None  # torch.compile mode, e.g. max-autotune-no-cudagraphs
    acceleration_regular: str | None = None  # a cache spec (pipelines.acceleration); None: the default
    acceleration_high: str | None = None


@dataclass
class Runtime:
    options: RuntimeOptions
    plan: MemoryPlan
    sizes: ComponentSizes
    accelerator: Accelerator
    compile_seconds: float | None = None
    applied: dict = field(default_factory=dict)

    def apply(self, pipe) -> None:
        apply_memory_plan(pipe, self.plan)
        set_attention_backend(pipe.transformer, self.options.attention_backend)
        if self.options.compile:
            compile_transformer(pipe.transformer, self.options.compile_mode)

    def describe(self) -> dict:
        return {
            "memory": {**self.plan.describe(), "weights_gib": describe_sizes(self.sizes)},
            "fast_path": {
                "attention_backend": self.options.attention_backend or "default (PyTorch SDPA)",
                "compile": self.options.compile,
                "compile_mode": self.options.compile_mode,
                "compile_seconds": None if self.compile_seconds is None else round(self.compile_seconds, 3),
            },
        }


def plan_runtime(options: RuntimeOptions, weights_dir: Path, device: str | None, dtype: torch.dtype) -> Runtime:
    """Check `options` against this machine and these weights, before loading them."""
    check_attention_backend(options.attention_backend)
    accelerator = Accelerator.from_settings(options.acceleration_regular, options.acceleration_high)
    sizes = component_sizes(weights_dir, dtype)
    plan = resolve_plan(
        options.memory_mode,
        sizes,
        device=device,
        text_encoder_device=options.text_encoder_device,
        quantization=options.quantization,
        reserve_bytes=None if options.memory_reserve_gb is None else int(options.memory_reserve_gb * GiB),
    )
    return Runtime(options=options, plan=plan, sizes=sizes, accelerator=accelerator)


def timed_warm_up(run) -> float:
    """Seconds of one call (with compilation enabled: mostly compile time), synchronised on CUDA."""
    started = time.perf_counter()
    run()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started
