"""Fast-path switches for the transformer: fp8, attention kernel and regional torch.compile, and one switch for all.

`fast_path` (FLUX2_FAST_PATH: auto | on | off) is the one switch: `on` means fp8 weights and activations
(pipelines.quantization), cuDNN attention (`_native_cudnn`) and regional compilation on a GPU of compute
capability >= 8.9 (Ada, Hopper, Blackwell); on an Ampere GPU (8.0-8.7) cuDNN attention and compilation (no fp8
there); on older GPUs compilation alone; on the CPU nothing (`choose_fast_path`). Each of `quantization`,
`attention_backend` and `compile`, when set explicitly, overrides its part. `auto` is off for now: the estimate
is 1.09 -> 0.66 s per step at 1024 px with one reference on an H200 (a FLOP-model estimate), and the switch
becomes the default once a GPU run (benchmarks) shows that it pays with the image quality kept. When the memory
mode is `auto` and an fp8 transformer would have to be streamed (model-offload, group-offload) where the
configured quantization (e.g. `auto`: int4) keeps it resident, the configured one is used: streaming costs more
than fp8 saves (`pipelines.runtime.plan_runtime`). /health (`capabilities.fast_path`) and `flux2-server doctor`
say which path runs and why.

The parts, each also one setting:

- `attention_backend` (FLUX2_ATTENTION_BACKEND): a diffusers attention backend name, set with
  `transformer.set_attention_backend`: e.g. `_native_cudnn` (cuDNN SDPA, in every CUDA torch), `flash`
  (flash-attn 2, when installed), `_flash_3` (FlashAttention 3, when built), `native`. Backends whose name
  ends in `_hub` download kernels from a hub at run time and are refused: this server never downloads.
- `compile` (FLUX2_COMPILE): diffusers' `compile_repeated_blocks`, which compiles the transformer's repeated
  blocks once each (regional compilation: seconds instead of minutes). `fullgraph` stays off because the cache
  hooks (acceleration) and offload hooks decide per call outside the graph. The first call at a new shape
  pays the compile. The server warms up at start-up with the cases of `compile_warm_up` (FLUX2_COMPILE_WARM_UP,
  default "1,4,adapters,levels": one and four references at 1024 px on the edit profile, then one reference on
  a profile of each distilled adapter loaded unfused, one and four at the first acceleration level and one at
  the other, 12 steps): after two sequence lengths dynamo marks them dynamic, so other reference counts, sizes
  and step counts reuse the compiled blocks, and the recompiles an adapter switch or a level's cache hooks cause
  happen here rather than in a user's request (`test_fastpath` shows it on the tiny model). A case
  `REFS:PROFILE[:LEVEL]` adds a profile or an acceleration level. Each case's seconds and the number of graphs
  it compiled are reported in capabilities.fast_path.warm_up: the first case's seconds are mostly compile time,
  a case with 0 graphs ran compiled code only. Compiled kernels persist across restarts in `compile_cache_dir`
  (TORCHINDUCTOR_CACHE_DIR, inductor's FX-graph cache, on by default in torch 2.13; default
  <data_dir>/compile-cache): a restart with the same shapes loads them instead of compiling again.
- `compile_mode`: torch.compile's mode. Modes that record CUDA graphs (`reduce-overhead`, `max-autotune`: torch's
  `list_mode_options` has `triton.cudagraphs`) are refused: the model warms up in the loading thread and serves
  from the inference thread (server/worker.py), and CUDA graph trees are thread-local (pytorch#123177). Nor would
  they pay here: they save kernel-launch overhead, milliseconds against 0.6-3.6 s per FLUX.2 step, and need a
  static shape per reference count. `max-autotune-no-cudagraphs` gives the autotuned kernels without graphs.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

FAST_PATH_SETTINGS = ("auto", "on", "off")
FAST_ATTENTION = "_native_cudnn"  # cuDNN SDPA, in every CUDA build of torch (Ampere and newer)
FAST_PARTS = ("quantization", "attention_backend", "compile")  # what the switch sets, unless set explicitly
DEFAULT_WARM_UP = "1,4,adapters,levels"
WARM_UP_SIZE = 1024  # px, output and references: the most common request
COMPILE_BACKEND = "inductor"  # tests swap in "eager" (same dynamo graphs and recompiles, no code generation)


class FastPathError(ValueError):
    """A fast-path setting this machine or install cannot honour, said plainly at start-up."""


def check_attention_backend(name: str | None) -> None:
    if not name:
        return
    from diffusers.models.attention_dispatch import AttentionBackendName

    names = {b.value for b in AttentionBackendName}
    if name not in names:
        raise FastPathError(f"unknown attention backend {name!r}: one of {', '.join(sorted(names))}")
    if name.endswith("_hub"):
        raise FastPathError(
            f"attention backend {name!r} downloads its kernels from a hub at run time; this server never "
            "downloads anything: install the kernel's package instead (e.g. `flash` with flash-attn)"
        )


def set_attention_backend(transformer, name: str | None) -> None:
    """Use diffusers' attention backend `name` for every attention layer (None: leave diffusers' default)."""
    check_attention_backend(name)
    if not name:
        return
    try:
        transformer.set_attention_backend(name)
    except (RuntimeError, ImportError, ValueError) as exc:
        raise FastPathError(f"attention backend {name!r} is not usable here: {exc}") from exc


def check_compile_mode(mode: str | None) -> None:
    """Refuse torch.compile modes that record CUDA graphs (see the module docstring) and unknown modes."""
    if not mode:
        return
    import torch._inductor

    try:
        options = torch._inductor.list_mode_options(mode)
    except (KeyError, RuntimeError) as exc:
        raise FastPathError(f"unknown compile mode {mode!r}: {exc}") from exc
    if options.get("triton.cudagraphs"):
        raise FastPathError(
            f"compile mode {mode!r} records CUDA graphs, which are thread-local in torch (pytorch#123177): this "
            "server compiles and warms up in its loading thread and serves from its inference thread; they would "
            "also save only kernel-launch time, milliseconds of a FLUX.2 step. Use max-autotune-no-cudagraphs "
            "(autotuned kernels, no graphs) or leave FLUX2_COMPILE_MODE unset"
        )


def compile_transformer(transformer, mode: str | None = None) -> None:
    """Regional compilation of the transformer's repeated blocks (diffusers' compile_repeated_blocks)."""
    check_compile_mode(mode)
    kwargs = {"fullgraph": False, "backend": COMPILE_BACKEND}
    if mode:
        kwargs["mode"] = mode
    transformer.compile_repeated_blocks(**kwargs)


def use_compile_cache(directory: str | Path | None) -> str | None:
    """Keep inductor's compiled kernels (FX-graph cache, Triton kernels) under `directory`, across restarts."""
    if not directory:
        return None
    path = Path(directory).resolve()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)  # read by inductor at each compile (cache_dir_utils)
    import torch._inductor.config

    torch._inductor.config.fx_graph_cache = True  # torch's default; said here because the cache is the point
    return str(path)


@dataclass(frozen=True)
class FastPath:
    """What the one switch decided: the settings it sets (None: left as configured), and why."""

    setting: str
    quantization: str | None
    attention_backend: str | None
    compile: bool | None
    reason: str

    @property
    def active(self) -> bool:
        return any(v not in (None, False) for v in (self.quantization, self.attention_backend, self.compile))

    def describe(self) -> dict:
        return {**asdict(self), "active": self.active}


def choose_fast_path(setting: str, capability: tuple[int, int] | None, explicit: set[str] | frozenset[str]) -> FastPath:
    """The fast path for `setting` on a GPU of compute `capability` (None: no CUDA GPU). `explicit`: the names
    of FAST_PARTS the configuration sets itself, which the switch leaves alone."""
    if setting not in FAST_PATH_SETTINGS:
        raise FastPathError(f"fast_path must be one of {', '.join(FAST_PATH_SETTINGS)}, got {setting!r}")
    if setting == "off":
        return FastPath(setting, None, None, None, "off by configuration (FLUX2_FAST_PATH=off)")
    if setting == "auto":
        return FastPath(
            setting,
            None,
            None,
            None,
            "auto: off until a GPU run shows that fp8 + cuDNN attention + regional compile pays with the image "
            "quality kept; FLUX2_FAST_PATH=on turns it on",
        )
    if capability is None:
        return FastPath(
            setting, None, None, None, "on, but no CUDA GPU: fp8, cuDNN attention and compile are GPU parts"
        )
    gpu = f"compute capability {capability[0]}.{capability[1]}"
    if capability >= (8, 9):
        parts, why = (
            {"quantization": "fp8", "attention_backend": FAST_ATTENTION, "compile": True},
            f"{gpu} (Ada/Hopper+)",
        )
    elif capability >= (8, 0):
        parts = {"quantization": None, "attention_backend": FAST_ATTENTION, "compile": True}
        why = f"{gpu}: fp8 needs 8.9, so bf16 weights"
    else:
        parts = {"quantization": None, "attention_backend": None, "compile": True}
        why = f"{gpu}: fp8 needs 8.9 and cuDNN attention 8.0, so regional compile only"
    kept = sorted(name for name in FAST_PARTS if name in explicit and parts[name] not in (None, False))
    for name in kept:
        parts[name] = None
    set_parts = [f"{k}={v}" for k, v in parts.items() if v is not None]
    reason = f"on, {why}: " + (", ".join(set_parts) or "nothing left to set")
    if kept:
        reason += f"; {', '.join(kept)} as configured"
    return FastPath(setting, parts["quantization"], parts["attention_backend"], parts["compile"], reason)


@dataclass(frozen=True)
class WarmUpCase:
    """One warm-up call: `references` reference images of `size` px (0: text to image), output `size` px, on
    `profile`."""

    references: int
    profile: str = "edit"
    acceleration: str = "none"
    size: int = 1024

    @property
    def label(self) -> str:
        label = f"{self.references} reference{'' if self.references == 1 else 's'}, {self.size} px, {self.profile}"
        return label + (f", acceleration {self.acceleration}" if self.acceleration != "none" else "")


def parse_warm_up(
    spec: str | None, adapter_profiles: tuple[str, ...] = (), levels: tuple[str, ...] = ()
) -> list[WarmUpCase]:
    """`"1,4,1:turbo,4:edit:high"`: comma-separated cases REFS[:PROFILE[:LEVEL]]; `adapters` stands for one
    reference on each of `adapter_profiles` (a profile per distilled adapter loaded unfused: switching to it
    recompiles the blocks once, as peft's adapter state is part of what dynamo guards), `levels` for one and
    four references at the first of `levels` and one at the others (the acceleration levels configured: the
    cache hooks wrap the blocks' forward in code of their own, which needs its own two shapes to go dynamic)."""
    from pipelines.acceleration import LEVELS
    from pipelines.profiles import PROFILES

    cases = []
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        if item.strip() == "adapters":
            cases += [WarmUpCase(1, profile, "none", WARM_UP_SIZE) for profile in adapter_profiles]
            continue
        if item.strip() == "levels":  # the hooks' code is shared by the levels: two shapes on the first suffice
            first = [WarmUpCase(4, "edit", levels[0], WARM_UP_SIZE)] if levels else []
            cases += [WarmUpCase(1, "edit", level, WARM_UP_SIZE) for level in levels[:1]] + first
            cases += [WarmUpCase(1, "edit", level, WARM_UP_SIZE) for level in levels[1:]]
            continue
        parts = item.strip().split(":")
        if len(parts) > 3 or not parts[0].isdigit() or not 0 <= int(parts[0]) <= 4:
            raise FastPathError(f"warm-up case {item!r}: REFS[:PROFILE[:LEVEL]] with REFS 0-4 (0: text to image)")
        refs, profile, level = parts + ["edit", "none"][len(parts) - 1 :]
        if profile not in PROFILES or level not in LEVELS or (level != "none" and profile != "edit"):
            raise FastPathError(
                f"warm-up case {item!r}: profile one of {', '.join(PROFILES)}, level one of {', '.join(LEVELS)} "
                "(levels on the edit profile only)"
            )
        cases.append(WarmUpCase(int(refs), profile, level, WARM_UP_SIZE))
    return cases


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (a warm-up case's difference: its compiles)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def warm_up(run: Callable[[WarmUpCase], None], cases: list[WarmUpCase]) -> list[dict]:
    """Run each case once; its seconds (synchronised on CUDA) and the graphs it compiled."""
    results = []
    for case in cases:
        graphs, started = compiled_graphs(), time.perf_counter()
        run(case)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        results.append(
            {"case": case.label, "seconds": round(seconds, 3), "graphs_compiled": compiled_graphs() - graphs}
        )
        log.info("warm-up %s: %.1f s, %d graph(s) compiled", case.label, seconds, results[-1]["graphs_compiled"])
    return results
