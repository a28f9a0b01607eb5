"""How the loaded pipeline runs: memory mode, quantization, attention kernel, compilation, acceleration levels.

`RuntimeOptions` is what the server's configuration says; `plan_runtime` checks it against this machine and
the weights on disk *before* anything is loaded (a mode this machine can't run is refused with a plain error at
start-up); `Runtime.apply` then sets the loaded pipeline up, and `Runtime.describe` says what was done, for
/health's capabilities.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from pipelines import fastpath
from pipelines.acceleration import Accelerator
from pipelines.fastpath import (
    FastPath,
    check_attention_backend,
    check_compile_mode,
    choose_fast_path,
    compile_transformer,
    set_attention_backend,
)
from pipelines.hardware import check_cpu_fallback, describe_driver, describe_torch_cuda, nvidia_driver
from pipelines.memory import (
    ComponentSizes,
    GiB,
    MemoryPlan,
    apply_memory_plan,
    component_sizes,
    describe_sizes,
    resolve_plan,
)
from pipelines.quantization import STREAMING_MODES, check_quantization

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
    fast_path: str = "auto"  # auto | on | off: fp8 + cuDNN attention + regional compile in one switch (fastpath)
    compile_warm_up: str = fastpath.DEFAULT_WARM_UP  # warm-up cases with compile: REFS[:PROFILE[:LEVEL]],...
    compile_cache_dir: str | None = None  # inductor's persistent cache (the server: <data_dir>/compile-cache)
    allow_cpu: bool = False  # load full-size weights (> 8 GiB) for the CPU when torch sees no GPU
    max_loaded_loras: int = 4  # request LoRAs kept loaded beside the transformer (pipelines.loras)
    # Which of quantization/attention_backend/compile the configuration sets itself (the fast path leaves those
    # alone). None: those that differ from their defaults. Not a setting: Settings.runtime_options fills it.
    explicit: frozenset[str] | None = None

    def explicitly_set(self) -> frozenset[str]:
        if self.explicit is not None:
            return self.explicit
        defaults = RuntimeOptions.__dataclass_fields__
        return frozenset(n for n in fastpath.FAST_PARTS if getattr(self, n) != defaults[n].default)


@dataclass
class Runtime:
    options: RuntimeOptions
    plan: MemoryPlan
    sizes: ComponentSizes
    accelerator: Accelerator
    fast_path: FastPath | None = None  # what the one switch decided (options already carry its settings)
    compile_seconds: float | None = None  # all warm-up calls together
    warm_up_results: list[dict] = field(default_factory=list)
    compile_cache: str | None = None
    applied: dict = field(default_factory=dict)

    def apply(self, pipe) -> None:
        apply_memory_plan(pipe, self.plan)
        set_attention_backend(pipe.transformer, self.options.attention_backend)
        if self.options.compile:
            self.compile_cache = fastpath.use_compile_cache(self.options.compile_cache_dir)
            compile_transformer(pipe.transformer, self.options.compile_mode)

    def warm_up(self, run, adapter_profiles: tuple[str, ...] = ()) -> None:
        """Run the configured warm-up cases (`run(case)` makes one edit call) and keep their times."""
        levels = tuple(level for level in ("regular", "high") if self.accelerator.specs.get(level))
        cases = fastpath.parse_warm_up(self.options.compile_warm_up, adapter_profiles, levels)
        self.warm_up_results = fastpath.warm_up(run, cases)
        self.compile_seconds = sum(r["seconds"] for r in self.warm_up_results)

    def describe(self) -> dict:
        return {
            "memory": {**self.plan.describe(), "weights_gib": describe_sizes(self.sizes)},
            "fast_path": {
                **(self.fast_path.describe() if self.fast_path else {}),
                "attention_backend": self.options.attention_backend or "default (PyTorch SDPA)",
                "compile": self.options.compile,
                "compile_mode": self.options.compile_mode,
                # the warm-up calls together: compile time plus their few steps (per case in warm_up)
                "compile_seconds": None if self.compile_seconds is None else round(self.compile_seconds, 3),
                "warm_up": self.warm_up_results,  # per case: seconds, graphs compiled (0: compiled code reused)
                "compile_cache_dir": self.compile_cache,
            },
        }


def gpu_capability(device: str | None) -> tuple[int, int] | None:
    """Compute capability of the GPU the transformer would run on (None: the CPU)."""
    if not torch.cuda.is_available() or (device is not None and not device.startswith("cuda")):
        return None
    return torch.cuda.get_device_capability(torch.device(device or "cuda"))


def with_fast_path(options: RuntimeOptions, fast: FastPath) -> RuntimeOptions:
    """`options` with the parts the fast path sets."""
    parts = {n: getattr(fast, n) for n in fastpath.FAST_PARTS if getattr(fast, n) is not None}
    return replace(options, **parts)


def plan_runtime(options: RuntimeOptions, weights_dir: Path, device: str | None, dtype: torch.dtype) -> Runtime:
    """Check `options` against this machine and these weights, before loading them."""
    log.info(
        "torch %s, CUDA build %s, NVIDIA driver %s, CUDA available: %s",
        torch.__version__,
        describe_torch_cuda(),
        describe_driver(nvidia_driver()),
        torch.cuda.is_available(),
    )
    fast = choose_fast_path(options.fast_path, gpu_capability(device), options.explicitly_set())
    configured, options = options, with_fast_path(options, fast)
    check_attention_backend(options.attention_backend)
    if options.compile:
        check_compile_mode(options.compile_mode)
    fastpath.parse_warm_up(options.compile_warm_up)
    accelerator = Accelerator.from_settings(options.acceleration_regular, options.acceleration_high)
    sizes = component_sizes(weights_dir, dtype)
    # before planning: a CUDA build that can't see its GPU (driver too old) is said as that, not as "not enough
    # host RAM" for weights that were never meant for the CPU
    check_cpu_fallback(device or ("cuda" if torch.cuda.is_available() else "cpu"), sizes.total, options.allow_cpu)

    def plan_for(quantization: str) -> MemoryPlan:
        return resolve_plan(
            options.memory_mode,
            sizes,
            device=device,
            text_encoder_device=options.text_encoder_device,
            quantization=quantization,
            reserve_bytes=None if options.memory_reserve_gb is None else int(options.memory_reserve_gb * GiB),
        )

    plan = plan_for(options.quantization)
    if fast.quantization and configured.memory_mode == "auto" and plan.mode in STREAMING_MODES:
        # fp8 would leave the transformer streamed; where the configured quantization (e.g. auto: int4) keeps it
        # resident, that is faster than anything fp8 saves
        alternative = plan_for(configured.quantization)
        if alternative.mode not in STREAMING_MODES:
            plan, options = alternative, replace(options, quantization=alternative.quantization)
            reason = f"; fp8 not used: the transformer would be streamed, {alternative.quantization} keeps it resident"
            fast = replace(fast, quantization=None, reason=fast.reason + reason)
    check_quantization(plan, dtype)
    log.info("fast path %s: %s", fast.setting, fast.reason)
    return Runtime(options=options, plan=plan, sizes=sizes, accelerator=accelerator, fast_path=fast)
