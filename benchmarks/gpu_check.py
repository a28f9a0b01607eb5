"""The most one GPU run can tell: FLUX.2's GPU paths checked and timed in one process, in about 7 minutes on an H200.

    python -m benchmarks.gpu_check [--out PATH] [--time-limit 400] [--sections a,b,...]
    python -m benchmarks.gpu_check --smoke --out /tmp/gpu_check.json   # every section on the CPU, tiny sizes (CI)

GPU time for this project comes in slots of about 15 minutes, machine start-up included, so this script is built to
return data whatever happens: sections run in priority order, each with a time budget (work left when the budget
is spent is recorded as skipped, and a section that overruns by a quarter is interrupted and recorded as timed out)
and catching its own errors (the error's text goes into that section's JSON, then the next section runs); the
whole run stops starting sections at `--time-limit`; the JSON file is rewritten after every measurement. It does
not import the `server` package (the GPU machine has no pydantic or fastapi); it uses `pipelines` and `weights`.

Sections, in priority order (the names are the JSON keys):

- `environment`: GPU, capability, memory, driver, torch/CUDA/cuDNN versions, library versions, C compiler
  (Triton needs one), and each diffusers attention backend probed on a real call (hub backends, which download
  kernels, are not tried), timed at the step's attention shapes.
- `memory_modes`: every memory mode and quantization through `pipelines.load_editor` + `edit` on the tiny model:
  ok, refused (with the server's reason) or the error; load and edit seconds; pixels against `full`/`none`.
- `transformer_step`: FLUX.2 [dev]'s transformer at its real configuration, random bf16 weights built on the GPU,
  one denoising step at 1 and 4 references of 1024² (8,704 and 20,992 tokens with the 512 text tokens), PyTorch
  SDPA (`native`) against cuDNN attention (`_native_cudnn`); peak memory; FLOPs counted by torch's FlopCounterMode.
- `lora`: a random LoRA (peft, every linear layer of the blocks, `--lora-ranks`) on that transformer, unfused:
  step time without it, with it enabled, and loaded but disabled.
- `fp8_eager`: the transformer quantized to fp8 by the server's own `quantize_transformer` (torchao), step time
  and its output's relative difference from bf16.
- `fp8_compile`: that fp8 transformer with cuDNN attention, compiled regionally by the server's
  `compile_transformer`: compile seconds at 1 reference, recompile seconds at 4, and the compiled step times.
- `text_encoder`: the 24B Mistral text model (random, bf16) encoding a 512-token prompt whole (40 decoder layers and
  the language-model head) and cut to 31 layers without the head (FLUX.2 reads hidden states 10/20/30: checked
  bit-identical); host->device copy GB/s, pinned and
  pageable, and what streaming the encoder would cost at that rate.
- `vae`: FLUX.2's VAE (real configuration, random weights) encoding and decoding 1024².
- `end_to_end`: the server's editor against plain diffusers `Flux2Pipeline` on the same inputs: the tiny model
  (bit parity, overhead), then full size with random weights when time is left; base `edit` profile, 4 steps.

`--smoke` runs every section on the CPU with the tiny model's configurations and tiny shapes (seconds): what only
a GPU has (cuDNN attention, fp8, CUDA streams, host->device copies, the memory modes that move weights) is recorded
as `unavailable` with the reason, not left out; fp8 is stood in for by int8 (weight-only, runs on a CPU) and
inductor by dynamo's `eager` backend (inductor's CPU code generation takes a minute), so the code paths run in CI.

Statuses: `ok`; `partial` (a section whose budget ran out before all its cases); `errors` (a section with failed
cases); `error` (the case or section raised: its text and traceback tail are recorded); `timeout`; `skipped` (no
time left, or a case it needs failed); `unavailable` (this machine can't run it: the reason says why); `refused`
(the server refused the configuration, with its reason).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

STARTED = time.monotonic()  # the process's start: a run's time limit counts its imports too
GiB = 1024**3
PROMPT = "Turn the scene into a snowy winter evening, keep the composition"
LIBRARIES = (
    "diffusers",
    "transformers",
    "peft",
    "accelerate",
    "torchao",
    "huggingface-hub",
    "safetensors",
    "tokenizers",
    "triton",
    "numpy",
    "pillow",
)
# (name, seconds of budget) in priority order; `--smoke` runs the same list.
SECTIONS = (
    ("environment", 20),
    ("memory_modes", 45),
    ("transformer_step", 70),
    ("lora", 35),
    ("fp8_eager", 35),
    ("fp8_compile", 120),
    ("text_encoder", 30),
    ("vae", 15),
    ("end_to_end", 60),
)
HARD_LIMIT_FACTOR, HARD_LIMIT_GRACE_S = 1.25, 5.0  # a section past budget x factor + grace is interrupted (SIGALRM)
MIN_SECTION_S = 8.0  # don't start a section with less than this left of the run
E2E_STEPS = 4  # end to end: the base `edit` profile at 4 steps (no distilled adapter, so diffusers runs the same)


@dataclass(frozen=True)
class Scale:
    """Shapes of one run: FLUX.2 [dev]'s real ones on a GPU, tiny ones for the CPU smoke run."""

    name: str
    tokens_per_image: int  # 1024² output: a 128x128 latent, patchified 2x2 -> 64x64 = 4,096 tokens
    text_tokens: int  # Flux2Pipeline pads every prompt to 512 tokens
    references: tuple[int, ...]
    image_size: int  # VAE and end-to-end output and reference size, px
    text_layers: tuple[int, int]  # the whole encoder, and cut to what FLUX.2 reads
    h2d_bytes: int
    repeats: int


FULL = Scale("full", 4096, 512, (1, 4), 1024, (40, 31), 2 * GiB, 3)
SMOKE = Scale("smoke", 64, 16, (1, 4), 64, (40, 31), 16 * 1024**2, 2)


class SectionTimeout(BaseException):
    """Raised by SIGALRM in a section that overran its hard limit (BaseException: library code must not catch it)."""


class Unavailable(Exception):
    """This machine can't run the case (no CUDA, no fp8, ...): recorded as `unavailable` with the reason."""


class Skipped(Exception):
    """A case that can't run because something it needs did not (recorded as `skipped` with the reason)."""


class Refused(Exception):
    """The server refused the configuration at start-up (recorded as `refused` with its reason)."""


# ----------------------------------------------------------------------------------------------------------- timing


_ON_CUDA = False  # set by Check: this run's device is a GPU (a --smoke run on a GPU box stays on the CPU)


def cuda() -> bool:
    return _ON_CUDA


def sync() -> None:
    if cuda():
        torch.cuda.synchronize()


def free_memory() -> None:
    gc.collect()
    if cuda():
        torch.cuda.empty_cache()


def once(fn: Callable[[], object]) -> float:
    """Seconds of one call: CUDA events around it on a GPU (synchronised first), the host clock on a CPU."""
    if cuda():
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def bench(fn: Callable[[], object], box: Box, repeats: int) -> dict:
    """A warm-up call (its time is `first_s`), then up to `repeats` timed calls (fewer once the budget is spent)."""
    first = once(fn)
    times = []
    for _ in range(repeats):
        if times and box.over():
            break
        times.append(once(fn))
    return {
        "first_s": round(first, 4),
        "median_s": round(statistics.median(times), 4),
        "min_s": round(min(times), 4),
        "runs": len(times),
    }


@contextlib.contextmanager
def peak_memory(record: dict, key: str = "peak_gib"):
    """Record the peak of allocated GPU memory (GiB) over the block; None on a CPU."""
    if cuda():
        sync()
        torch.cuda.reset_peak_memory_stats()
    try:
        yield
    finally:
        record[key] = round(torch.cuda.max_memory_allocated() / GiB, 2) if cuda() else None


def gib(n: float) -> float:
    return round(n / GiB, 3)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """‖a − b‖ / ‖b‖ in float64 (on the CPU); None where either holds a non-finite value (random weights can)."""
    a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
    value = float((a64 - b64).norm() / b64.norm().clamp_min(1e-30))
    return value if math.isfinite(value) else None


def rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


# -------------------------------------------------------------------------------------------------- run and report


class Box:
    """A section's time budget: `over()` once spent (work left is skipped); interrupted at `hard_s`."""

    def __init__(self, budget_s: float):
        self.budget_s = budget_s
        self.hard_s = budget_s * HARD_LIMIT_FACTOR + HARD_LIMIT_GRACE_S
        self.started = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def over(self) -> bool:
        return self.elapsed() >= self.budget_s


class Check:
    """One run: its options, the report being written, and what sections share (the tiny model, the transformer)."""

    def __init__(self, args: argparse.Namespace, started: float | None = None):
        self.args = args
        self.started = time.monotonic() if started is None else started
        self.smoke = args.smoke
        self.scale = SMOKE if args.smoke else FULL
        global _ON_CUDA
        self.device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
        _ON_CUDA = self.device.type == "cuda"
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.deadline = self.started + args.time_limit
        self.out: Path = args.out
        self.report = {
            "check": "benchmarks.gpu_check",
            "command": " ".join(["python", "-m", "benchmarks.gpu_check", *args.argv]),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "mode": "smoke (CPU, tiny shapes: says nothing about speed)" if args.smoke else "full",
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "scale": vars(self.scale) | {"references": list(self.scale.references)},
            "time_limit_s": args.time_limit,
            "sections": {},
        }
        self._tiny_dir: Path | None = None
        self._scratch = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        self.transformer = None  # the full-size (or smoke) transformer the step sections share
        self.transformer_state = ""  # "bf16", "fp8", "int8", "compiled", ...
        self.bf16_output: torch.Tensor | None = None  # the 1-reference step's output in bf16, for comparisons
        self.cudnn_ok = False  # cuDNN attention ran in `transformer_step`

    def write(self) -> None:
        self.report["elapsed_s"] = round(time.monotonic() - self.started, 1)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        partial = self.out.with_name(self.out.name + ".partial")
        partial.write_text(json.dumps(self.report, indent=2, default=str) + "\n")
        partial.replace(self.out)

    def close(self) -> None:
        self.drop_transformer()
        shutil.rmtree(self._scratch, ignore_errors=True)

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def tiny_dir(self) -> Path:
        """The tiny FLUX.2 (weights.tiny), built once per run into a scratch directory."""
        if self._tiny_dir is None:
            from weights.tiny import build_tiny

            self._tiny_dir = build_tiny(self._scratch / "FLUX.2-tiny")
        return self._tiny_dir

    def drop_transformer(self) -> None:
        self.transformer, self.transformer_state = None, ""
        free_memory()

    def case(self, entry: dict, name: str, box: Box, fn: Callable[[dict], object]) -> dict:
        """Run one case `fn(record)`, recording its status, seconds and any error; the JSON is rewritten after."""
        record: dict = {"status": "running"}
        entry.setdefault("cases", {})[name] = record
        if box.over():
            record.update(status="skipped", reason=f"the section's budget ({box.budget_s:.0f} s) was spent")
            return record
        started = time.monotonic()
        try:
            fn(record)
            record["status"] = "ok"
        except Unavailable as exc:
            record.update(status="unavailable", reason=str(exc))
        except Skipped as exc:
            record.update(status="skipped", reason=str(exc))
        except Refused as exc:
            record.update(status="refused", reason=str(exc))
        except SectionTimeout:
            record.update(status="timeout", error=f"interrupted after {box.elapsed():.0f} s (section's hard limit)")
            raise
        except Exception as exc:  # noqa: BLE001 (any failure is a finding: recorded, then on to the next case)
            record.update(status="error", error=f"{type(exc).__name__}: {exc}", traceback=tail(exc))
            free_memory()
        finally:
            record["seconds"] = round(time.monotonic() - started, 2)
            self.write()
        return record

    def run_section(self, name: str, budget_s: float, fn: Callable[[Check, Box, dict], None]) -> None:
        entry: dict = {"status": "running", "budget_s": budget_s}
        self.report["sections"][name] = entry
        left = self.time_left()
        if left < MIN_SECTION_S:
            entry.update(status="skipped", reason=f"the run's time limit: {max(left, 0):.0f} s left")
            self.write()
            return
        box = Box(min(budget_s, left))
        alarm = _arm(min(box.hard_s, left))
        started = time.monotonic()
        try:
            self._run(fn, box, entry, started)
        except SectionTimeout:  # fired while the section's failure was being recorded
            entry.update(status="timeout", error=f"interrupted after {time.monotonic() - started:.0f} s")
        finally:
            _disarm(alarm)
            entry["seconds"] = round(time.monotonic() - started, 2)
            if entry["status"] in ("timeout", "error"):
                self.drop_transformer()  # whatever the section was doing to the shared transformer is half done
            free_memory()
            self.write()
        print(f"[{self.report['elapsed_s']:6.1f} s] {name}: {entry['status']} {entry.get('headline', '')}", flush=True)

    def _run(self, fn: Callable[[Check, Box, dict], None], box: Box, entry: dict, started: float) -> None:
        try:
            fn(self, box, entry)
            statuses = [c["status"] for c in entry.get("cases", {}).values()]
            if "error" in statuses or "timeout" in statuses:
                entry["status"] = "errors"
            elif box.over() and any(
                c["status"] == "skipped" and "budget" in c.get("reason", "") for c in entry.get("cases", {}).values()
            ):
                entry["status"] = "partial"
            elif statuses and all(s == "unavailable" for s in statuses):
                entry.update(status="unavailable", reason="; ".join(c["reason"] for c in entry["cases"].values()))
            else:
                entry["status"] = "ok"
        except SectionTimeout:
            entry.update(status="timeout", error=f"interrupted after {time.monotonic() - started:.0f} s")
        except Unavailable as exc:
            entry.update(status="unavailable", reason=str(exc))
        except Skipped as exc:  # a case it needed failed (that case's record says why)
            failed = any(c["status"] in ("error", "timeout") for c in entry.get("cases", {}).values())
            entry.update(status="errors" if failed else "skipped", reason=str(exc))
        except Exception as exc:  # noqa: BLE001
            entry.update(status="error", error=f"{type(exc).__name__}: {exc}", traceback=tail(exc))


def tail(exc: BaseException, lines: int = 8) -> str:
    return "".join(traceback.format_exception(exc)[-lines:])


def _on_alarm(signum, frame):
    raise SectionTimeout()


def _arm(seconds: float) -> bool:
    if not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        return False  # no hard limit where signals can't interrupt; the soft budget still applies
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1.0))
    return True


def _disarm(armed: bool) -> None:
    if armed:
        signal.setitimer(signal.ITIMER_REAL, 0)


# ----------------------------------------------------------------------------------------------- model building


def transformer_config(check: Check) -> dict:
    from diffusers import Flux2Transformer2DModel

    from benchmarks.speed import FULL_SIZE_TRANSFORMER  # FLUX.2 [dev]'s real configuration (sources cited there)

    if check.smoke:
        return dict(Flux2Transformer2DModel.load_config(check.tiny_dir() / "transformer"))
    return dict(FULL_SIZE_TRANSFORMER)


def build_on_device(check: Check, make: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build a module with random weights directly on the run's device in the run's dtype (no CPU copy)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(check.dtype)
    try:
        with torch.device(check.device):
            module = make()
    finally:
        torch.set_default_dtype(previous)
    return module.eval().requires_grad_(False)


def shared_transformer(check: Check, record: dict | None = None):
    """The transformer the step sections share, built (bf16 on a GPU) on first use or after a section spoilt it."""
    if check.transformer is None:
        from diffusers import Flux2Transformer2DModel

        config = transformer_config(check)
        started = time.monotonic()
        check.transformer = build_on_device(check, lambda: Flux2Transformer2DModel.from_config(config))
        sync()
        check.transformer_state = "bf16" if check.dtype == torch.bfloat16 else "fp32"
        if record is not None:
            params = sum(p.numel() for p in check.transformer.parameters())
            record.update(build_s=round(time.monotonic() - started, 2), parameters_b=round(params / 1e9, 3))
            record["weights_gib"] = gib(params * check.dtype.itemsize)
    return check.transformer


def step_inputs(check: Check, config: dict, references: int, seed: int = 0) -> dict:
    """One denoising step's inputs as Flux2Pipeline builds them: output + reference latents, 512 text tokens."""
    from diffusers import Flux2Pipeline

    side = math.isqrt(check.scale.tokens_per_image)
    channels = config["in_channels"]
    latent = torch.empty(1, channels, side, side)
    ids = [Flux2Pipeline._prepare_latent_ids(latent)]
    if references:
        ids.append(Flux2Pipeline._prepare_image_ids([latent] * references))
    generator = torch.Generator().manual_seed(seed)
    tokens = check.scale.tokens_per_image * (1 + references)
    hidden = torch.randn(1, tokens, channels, generator=generator)
    text = torch.randn(1, check.scale.text_tokens, config["joint_attention_dim"], generator=generator)
    on = {"device": check.device, "dtype": check.dtype}
    return {
        "hidden_states": hidden.to(**on),
        "encoder_hidden_states": text.to(**on),
        "timestep": torch.full((1,), 0.5, **on),
        "guidance": torch.full((1,), 2.5, **on) if config.get("guidance_embeds", True) else None,
        "img_ids": torch.cat(ids, dim=1).to(check.device),
        "txt_ids": Flux2Pipeline._prepare_text_ids(text).to(check.device),
        "return_dict": False,
    }


def step(transformer, inputs: dict) -> torch.Tensor:
    with torch.inference_mode():
        return transformer(**inputs)[0]


def quantize(check: Check, transformer, quantization: str) -> None:
    """The server's own quantization of the transformer (its layer filter included)."""
    from pipelines.quantization import quantize_transformer

    quantize_transformer(transformer, quantization, str(check.device))


def fp8_or_stand_in(check: Check) -> tuple[str, str | None]:
    """fp8 where this GPU runs it; else int8 weight-only as the CPU stand-in, with the reason fp8 is unavailable."""
    from pipelines.memory import fp8_capable

    if check.device.type == "cuda" and fp8_capable(str(check.device)):
        return "fp8", None
    why = (
        "no CUDA device (smoke run)"
        if check.device.type != "cuda"
        else f"compute capability {torch.cuda.get_device_capability()} < (8, 9)"
    )
    return "int8", f"fp8 unavailable: {why}; int8 weight-only stands in so the code path runs"


# ----------------------------------------------------------------------------------------------------- sections


def section_environment(check: Check, box: Box, entry: dict) -> None:
    entry["python"] = platform.python_version()
    entry["platform"] = platform.platform()
    entry["cpu_count"] = os.cpu_count()
    with contextlib.suppress(ValueError, OSError, AttributeError):
        entry["host_memory_gib"] = gib(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    entry["torch"] = {
        "version": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": cuda(),
        "device_count": torch.cuda.device_count() if cuda() else 0,
    }
    entry["libraries"] = {name: _version(name) for name in LIBRARIES}
    entry["c_compiler"] = shutil.which("cc") or shutil.which("gcc")  # Triton builds its launcher with one
    entry["inductor_cache_dir"] = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if cuda():
        props = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info(0)
        entry["gpu"] = {
            "name": props.name,
            "capability": list(torch.cuda.get_device_capability(0)),
            "memory_gib": gib(total),
            "free_gib": gib(free),
            "multiprocessors": props.multi_processor_count,
            "driver": _driver_version(),
        }
        entry["sdpa_enabled"] = {
            "flash": torch.backends.cuda.flash_sdp_enabled(),
            "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
            "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
            "math": torch.backends.cuda.math_sdp_enabled(),
        }
    else:
        entry["gpu"] = None
        entry["why_no_gpu"] = (
            "a CPU build of torch"
            if torch.version.cuda is None
            else f"torch is a CUDA {torch.version.cuda} build but sees no GPU (no device, or a driver too old for it)"
        )
    check.write()
    check.case(entry, "attention_backends", box, lambda r: probe_attention_backends(check, box, r))
    usable = [n for n, b in entry["cases"]["attention_backends"].get("backends", {}).items() if b["status"] == "ok"]
    entry["headline"] = f"{entry['gpu']['name'] if entry['gpu'] else 'no GPU'}; attention usable: {', '.join(usable)}"


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _driver_version() -> str | None:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
            check=False,
            capture_output=True,
            text=True,
            timeout=15,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        return None


UNFUSED_ATTENTION = {  # backends that materialise the S x S scores: probed, not timed at FLUX.2's lengths
    "flex": "flex attention without torch.compile runs unfused",
    "_native_math": "PyTorch's math SDPA materialises the scores",
}


def probe_attention_backends(check: Check, box: Box, record: dict) -> None:
    """Each diffusers attention backend tried on a small real call (and compared with `native`, PyTorch SDPA); the
    usable fused ones then timed at the step's sequence lengths with FLUX.2's heads."""
    from diffusers.models import attention_dispatch as dispatch

    if check.device.type != "cuda" and not check.smoke:
        raise Unavailable("no CUDA device: FLUX.2's attention shapes are for a GPU (--smoke probes tiny ones)")
    heads, head_dim = (48, 128) if not check.smoke else (2, 16)
    lengths = [check.scale.tokens_per_image * (1 + n) + check.scale.text_tokens for n in check.scale.references]
    record["shape"] = {"heads": heads, "head_dim": head_dim, "sequence_lengths": lengths, "layout": "B, S, H, D"}
    generator = torch.Generator().manual_seed(0)

    def qkv(length: int) -> list[torch.Tensor]:
        return [
            torch.randn(1, length, heads, head_dim, generator=generator).to(check.device, check.dtype) for _ in "qkv"
        ]

    probe = qkv(256)
    requirements = getattr(dispatch, "_check_attention_backend_requirements", None)
    names = dispatch.AttentionBackendName
    backends: dict = {}
    record["backends"] = backends
    native = None
    for backend in [names.NATIVE, *(b for b in names if b != names.NATIVE)]:
        name = backend.value
        if name.endswith("_hub"):
            backends[name] = {"status": "unavailable", "reason": "downloads kernels at run time: not tried"}
            continue
        try:
            if requirements is not None:
                requirements(backend)
            out = dispatch.dispatch_attention_fn(*probe, backend=backend)
            sync()
        except Exception as exc:  # noqa: BLE001 (a backend that can't run here is what the probe finds out)
            backends[name] = {"status": "unavailable", "reason": f"{type(exc).__name__}: {str(exc)[:300]}"}
            continue
        result: dict = {"status": "ok"}
        backends[name] = result
        if native is None:
            native = out
        else:
            result["rel_diff_vs_native"] = rounded(rel_diff(out, native), 6)
        if name in UNFUSED_ATTENTION:
            result["not_timed"] = UNFUSED_ATTENTION[name]
            continue
        for length in lengths:
            if box.over():
                result.setdefault("not_timed", f"the section's budget was spent before {length} tokens")
                break
            q, k, v = qkv(length)
            timing = bench(lambda q=q, k=k, v=v, b=backend: dispatch.dispatch_attention_fn(q, k, v, backend=b), box, 5)
            result[f"ms_at_{length}"] = round(timing["median_s"] * 1000, 3)
        check.write()


def section_memory_modes(check: Check, box: Box, entry: dict) -> None:
    """Every memory mode (bf16), then every quantization with everything resident, then two mixes the card plans
    use or may use (fp8 and int4 transformers with a streamed text encoder; int8 weights streamed block by block, which
    only a GPU shows works with torchao's tensors), on the tiny model."""
    from pipelines.memory import MODES, QUANTIZATIONS

    tiny = check.tiny_dir()
    plan = [(mode, "none") for mode in MODES]
    plan += [("full", q) for q in QUANTIZATIONS if q != "none"]
    plan += [("offload-text-encoder", "fp8"), ("offload-text-encoder", "int4"), ("group-offload", "int8")]
    baseline: dict = {}

    for mode, quantization in plan:
        check.case(
            entry,
            f"{mode}/{quantization}",
            box,
            lambda r, mode=mode, quantization=quantization: _memory_case(check, tiny, mode, quantization, baseline, r),
        )
    cases = entry["cases"]
    ok = [k for k, c in cases.items() if c["status"] == "ok"]
    bad = [f"{k}: {c['status']}" for k, c in cases.items() if c["status"] not in ("ok", "refused", "unavailable")]
    entry["headline"] = f"{len(ok)}/{len(cases)} ran" + (f"; {', '.join(bad)}" if bad else "")


def _memory_case(check: Check, tiny: Path, mode: str, quantization: str, baseline: dict, record: dict) -> None:
    import numpy as np
    import PIL.Image

    from pipelines import EditCall, load_editor
    from pipelines.fastpath import FastPathError
    from pipelines.hardware import CPUFallbackError
    from pipelines.memory import MemoryModeError
    from pipelines.quantization import QuantizationError
    from pipelines.runtime import RuntimeOptions

    options = RuntimeOptions(
        memory_mode=mode,
        quantization=quantization,
        text_encoder_device="cuda:1" if mode == "multi-gpu" else None,
    )
    started = time.monotonic()
    try:
        editor = load_editor(tiny, device=str(check.device), options=options)
    except (MemoryModeError, FastPathError, QuantizationError, CPUFallbackError) as exc:
        # the server's own refusal, said before loading (other errors, a ValueError from a library among them, are
        # failures and recorded as such)
        if check.device.type == "cpu":
            raise Unavailable(f"refused by the server on a CPU: {exc}") from exc
        raise Refused(str(exc)) from exc
    sync()
    record["load_s"] = round(time.monotonic() - started, 3)
    record["memory"] = editor.capabilities().get("memory")
    size = 256 if not check.smoke else 64
    reference = PIL.Image.new("RGB", (size, size), (120, 40, 200))
    call = EditCall(images=[reference], prompt=PROMPT, width=size, height=size, profile="flash", seed=1)
    images = []
    with peak_memory(record):
        record["first_edit_s"] = round(once(lambda: images.append(editor.edit(call).images[0])), 3)
        record["edit_s"] = round(once(lambda: images.append(editor.edit(call).images[0])), 3)
    image = np.asarray(images[-1])
    if (mode, quantization) == ("full", "none"):
        baseline["image"] = image
    elif "image" in baseline:
        record["max_pixel_diff_vs_full_none"] = int(np.abs(image.astype(int) - baseline["image"].astype(int)).max())


def section_transformer_step(check: Check, box: Box, entry: dict) -> None:
    config = transformer_config(check)
    entry["config"] = {k: v for k, v in config.items() if not k.startswith("_")}

    def build(r):
        shared_transformer(check, r)

    check.case(entry, "build", box, build)
    if check.transformer is None:
        raise Skipped("the transformer could not be built")
    from torch.utils.flop_counter import FlopCounterMode

    from pipelines.fastpath import set_attention_backend

    transformer = check.transformer
    for references in check.scale.references:
        inputs = step_inputs(check, config, references)
        tokens = inputs["hidden_states"].shape[1] + check.scale.text_tokens
        outputs: dict = {}
        for backend in ("native", "_native_cudnn"):

            def run(r, backend=backend, inputs=inputs, tokens=tokens, references=references, outputs=outputs):
                if backend == "_native_cudnn" and check.device.type != "cuda":
                    raise Unavailable("cuDNN attention needs CUDA")
                set_attention_backend(transformer, backend)
                r["tokens"] = tokens
                with peak_memory(r):
                    r.update(
                        bench(lambda: outputs.__setitem__(backend, step(transformer, inputs)), box, check.scale.repeats)
                    )
                if backend == "native":
                    r["finite"] = bool(torch.isfinite(outputs["native"]).all())
                    if references == check.scale.references[0]:
                        check.bf16_output = outputs["native"].float().cpu()
                    with FlopCounterMode(display=False) as counter:
                        step(transformer, inputs)
                    r["flop"] = counter.get_total_flops()
                    r["tflop_per_s"] = round(r["flop"] / 1e12 / r["median_s"], 1)
                else:
                    r["rel_diff_vs_native"] = rounded(rel_diff(outputs[backend], outputs["native"]), 6)
                    check.cudnn_ok = True

            check.case(entry, f"{references}_ref/{backend}", box, run)
        free_memory()
    set_attention_backend(transformer, "native")
    entry["headline"] = "; ".join(
        f"{k} {c['median_s']} s" for k, c in entry["cases"].items() if c["status"] == "ok" and "median_s" in c
    )


def section_lora(check: Check, box: Box, entry: dict) -> None:
    """Step time at one reference: without a LoRA, with a random one enabled (unfused, as plain diffusers runs the
    distilled adapter), and loaded but disabled; for each rank asked for."""
    from peft import LoraConfig

    transformer = shared_transformer(check)
    if check.transformer_state not in ("bf16", "fp32"):
        raise Skipped(f"the shared transformer is {check.transformer_state}, not the unquantized one")
    config = transformer_config(check)
    inputs = step_inputs(check, config, check.scale.references[0])
    targets = [
        n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear) and "transformer_blocks" in n
    ]
    entry["target_modules"] = len(targets)
    entry["rank_note"] = "random weights; the real distilled adapter's rank is not known here (--lora-ranks)"
    check.case(
        entry, "no_lora", box, lambda r: r.update(bench(lambda: step(transformer, inputs), box, check.scale.repeats))
    )
    for rank in check.args.lora_ranks:
        name = f"rank{rank}"

        def run(r, rank=rank, name=name):
            torch.manual_seed(rank)
            started = time.monotonic()
            lora = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False)
            transformer.add_adapter(lora, adapter_name=name)  # random A and B (never time on zeros)
            for key, param in transformer.named_parameters():  # peft makes adapters float32: the serving dtype
                if f".{name}." in key:
                    param.data = param.data.to(check.dtype)
            sync()
            r["add_s"] = round(time.monotonic() - started, 2)
            r["lora_parameters_m"] = round(
                sum(p.numel() for n, p in transformer.named_parameters() if name in n) / 1e6, 1
            )
            try:
                transformer.set_adapter(name)
                transformer.enable_adapters()
                with peak_memory(r):
                    r["enabled"] = bench(lambda: step(transformer, inputs), box, check.scale.repeats)
                transformer.disable_adapters()
                r["disabled"] = bench(lambda: step(transformer, inputs), box, check.scale.repeats)
            finally:
                transformer.unload_lora()  # every peft layer out: the plain transformer again
                free_memory()

        check.case(entry, name, box, run)
    if any(c["status"] == "error" for c in entry["cases"].values()):
        check.drop_transformer()  # a failed add/remove may have left peft layers in it
    base = entry["cases"]["no_lora"].get("median_s")
    parts = [f"none {base} s"] + [
        f"{k} on {c['enabled']['median_s']} s / off {c['disabled']['median_s']} s"
        for k, c in entry["cases"].items()
        if c["status"] == "ok" and "enabled" in c
    ]
    entry["headline"] = "; ".join(parts)


def section_fp8_eager(check: Check, box: Box, entry: dict) -> None:
    quantization, stand_in = fp8_or_stand_in(check)
    entry["quantization"] = quantization
    if stand_in:
        entry["cases"] = {"fp8": {"status": "unavailable", "reason": stand_in}}
    config = transformer_config(check)
    transformer = shared_transformer(check)
    if check.transformer_state not in ("bf16", "fp32"):
        check.drop_transformer()
        transformer = shared_transformer(check)

    def run_quantize(r):
        before = torch.cuda.memory_allocated() if cuda() else None
        r["seconds_to_quantize"] = round(once(lambda: quantize(check, transformer, quantization)), 2)
        check.transformer_state = quantization
        if before is not None:
            r["gpu_memory_freed_gib"] = gib(before - torch.cuda.memory_allocated())

    record = check.case(entry, f"quantize_{quantization}", box, run_quantize)
    if record["status"] != "ok":
        check.drop_transformer()
        raise Skipped(f"quantizing to {quantization} failed")
    for references in check.scale.references:

        def run(r, references=references):
            inputs = step_inputs(check, config, references)
            with peak_memory(r):
                out = {}
                r.update(bench(lambda: out.__setitem__("y", step(transformer, inputs)), box, check.scale.repeats))
            if references == check.scale.references[0] and check.bf16_output is not None:
                r["rel_diff_vs_bf16"] = rounded(rel_diff(out["y"], check.bf16_output), 5)

        check.case(entry, f"{references}_ref/{quantization}", box, run)
    entry["headline"] = "; ".join(
        f"{k} {c['median_s']} s" for k, c in entry["cases"].items() if c["status"] == "ok" and "median_s" in c
    )


def section_fp8_compile(check: Check, box: Box, entry: dict) -> None:
    """Regional compile of the quantized transformer: the first call at one reference (compile), steady state, the
    first call at four references (recompile: a new shape), steady state there."""
    from pipelines.fastpath import compile_transformer, set_attention_backend

    quantization, stand_in = fp8_or_stand_in(check)
    entry["quantization"] = quantization
    if stand_in:
        entry["cases"] = {"fp8": {"status": "unavailable", "reason": stand_in}}
    if check.transformer_state != quantization:
        check.drop_transformer()
        quantize(check, shared_transformer(check), quantization)
        check.transformer_state = quantization
    transformer = check.transformer
    config = transformer_config(check)
    backend = "_native_cudnn" if check.cudnn_ok else "native"
    entry["attention_backend"] = backend
    set_attention_backend(transformer, backend)
    entry["compiler"] = "inductor (pipelines.fastpath.compile_transformer)"
    if check.smoke:  # inductor's CPU code generation takes a minute on a CI machine: dynamo alone runs the path
        entry["compiler"] = "dynamo 'eager' backend (smoke run: inductor unavailable in the time)"

    def eager_step(r):  # the same transformer and attention before compiling: what compile is measured against
        inputs = step_inputs(check, config, check.scale.references[0])
        r.update(bench(lambda: step(transformer, inputs), box, check.scale.repeats))

    check.case(entry, "eager_1_ref", box, eager_step)

    def compile_it(r):
        if check.smoke:
            transformer.compile_repeated_blocks(fullgraph=False, backend="eager")
        else:
            compile_transformer(transformer)
        check.transformer_state = f"{quantization}+compiled"

    compiled = check.case(entry, "compile", box, compile_it)
    if compiled["status"] != "ok":
        check.drop_transformer()
        raise Skipped(f"compile_repeated_blocks did not run: {compiled['status']}")
    for references, label in zip(check.scale.references, ("compile", "recompile"), strict=False):

        def run(r, references=references, label=label):
            inputs = step_inputs(check, config, references)
            with peak_memory(r):
                r.update(bench(lambda: step(transformer, inputs), box, check.scale.repeats))
            r[f"{label}_s"] = round(r["first_s"] - r["median_s"], 2)  # the first call, less a steady call

        check.case(entry, f"{references}_ref/compiled", box, run)
    from torch._dynamo.utils import counters

    entry["dynamo_frames"] = {k: dict(v) for k, v in counters.items() if k in ("stats", "recompiles")}
    entry["headline"] = "; ".join(
        f"{k} {c['median_s']} s (first {c['first_s']} s)"
        for k, c in entry["cases"].items()
        if c["status"] == "ok" and "median_s" in c
    )
    check.drop_transformer()  # compiled and quantized: nothing later reuses it


def section_text_encoder(check: Check, box: Box, entry: dict) -> None:
    """The Mistral text model encoding one padded prompt: whole (40 layers and the language-model head, whose logits
    Flux2Pipeline's call computes and discards) and cut to 31 layers without the head; host->device bandwidth."""
    from transformers import Mistral3Config
    from transformers.models.mistral.modeling_mistral import MistralForCausalLM

    check.drop_transformer()
    if check.smoke:
        config = Mistral3Config.from_pretrained(check.tiny_dir() / "text_encoder").text_config
    else:
        config = Mistral3Config().text_config  # Mistral-Small-3.x: 40 layers of 5120 (see benchmarks.speed)
    whole, cut = check.scale.text_layers
    config.num_hidden_layers = whole
    config.tie_word_embeddings = False  # the real encoder's head is its own 0.67 B parameters
    entry["config"] = {"hidden_size": config.hidden_size, "layers": whole, "vocab_size": config.vocab_size}
    text_tokens, prompt_tokens = check.scale.text_tokens, min(64, check.scale.text_tokens // 2)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (1, text_tokens), generator=generator).to(check.device)
    mask = torch.zeros(1, text_tokens, dtype=torch.long)
    mask[:, :prompt_tokens] = 1  # a short prompt, padded to 512 as Flux2Pipeline pads it
    mask = mask.to(check.device)
    model: dict = {}
    hidden: dict = {}

    def encode(module):
        with torch.inference_mode():
            out = module(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        return torch.stack([out.hidden_states[k] for k in (10, 20, 30)], dim=1)

    def run_whole(r):
        started = time.monotonic()
        model["m"] = build_on_device(check, lambda: MistralForCausalLM(config))
        sync()
        params = sum(p.numel() for p in model["m"].parameters())
        r.update(build_s=round(time.monotonic() - started, 2), parameters_b=round(params / 1e9, 3))
        r["layer_gib"] = gib(sum(p.numel() for p in model["m"].model.layers[0].parameters()) * check.dtype.itemsize)
        with peak_memory(r):
            r.update(bench(lambda: hidden.__setitem__(whole, encode(model["m"])), box, check.scale.repeats))

    def run_cut(r):
        if "m" not in model:
            raise Skipped("the whole encoder was not built")
        text_model = model["m"].model  # the decoder without the language-model head
        text_model.layers = text_model.layers[:cut]
        text_model.config.num_hidden_layers = cut
        model["m"] = text_model
        free_memory()
        r["parameters_b"] = round(sum(p.numel() for p in text_model.parameters()) / 1e9, 3)
        with peak_memory(r):
            r.update(bench(lambda: hidden.__setitem__(cut, encode(text_model)), box, check.scale.repeats))
        r["max_abs_diff_vs_whole"] = float((hidden[cut].float() - hidden[whole].float()).abs().max())
        r["bit_identical"] = bool(torch.equal(hidden[cut], hidden[whole]))

    check.case(entry, f"{whole}_layers", box, run_whole)
    check.case(entry, f"{cut}_layers", box, run_cut)
    layer_gib = entry["cases"][f"{whole}_layers"].get("layer_gib")
    model.clear()
    hidden.clear()
    free_memory()
    check.case(entry, "host_to_device", box, lambda r: _host_to_device(check, box, r, layer_gib, whole))
    c = entry["cases"]
    entry["headline"] = (
        f"{whole} layers {c[f'{whole}_layers'].get('median_s')} s, {cut} layers {c[f'{cut}_layers'].get('median_s')} s "
        f"(bit-identical: {c[f'{cut}_layers'].get('bit_identical')}); pinned H2D {c['host_to_device'].get('pinned_gb_per_s')} GB/s"
    )


def _host_to_device(check: Check, box: Box, record: dict, layer_gib: float | None, layers: int) -> None:
    if check.device.type != "cuda":
        raise Unavailable("host->device copies need a CUDA device")
    n = check.scale.h2d_bytes
    record["bytes"] = n
    device = torch.empty(n, dtype=torch.uint8, device=check.device)
    pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    pageable = torch.empty(n, dtype=torch.uint8)
    rate = lambda s: round(n / s / 1e9, 2)
    record["pinned_gb_per_s"] = rate(bench(lambda: device.copy_(pinned, non_blocking=True), box, 3)["median_s"])
    record["pageable_gb_per_s"] = rate(bench(lambda: device.copy_(pageable), box, 3)["median_s"])
    record["device_to_pinned_gb_per_s"] = rate(
        bench(lambda: pinned.copy_(device, non_blocking=True), box, 3)["median_s"]
    )
    if layer_gib:
        # what streaming the encoder's decoder layers once costs at the pinned rate (offload-text-encoder, per prompt)
        record["stream_encoder_layers_s"] = round(layer_gib * GiB * layers / (record["pinned_gb_per_s"] * 1e9), 2)


def section_vae(check: Check, box: Box, entry: dict) -> None:
    from diffusers import AutoencoderKLFlux2

    check.drop_transformer()
    if check.smoke:
        config = dict(AutoencoderKLFlux2.load_config(check.tiny_dir() / "vae"))
        vae = build_on_device(check, lambda: AutoencoderKLFlux2.from_config(config))
    else:  # AutoencoderKLFlux2()'s defaults are FLUX.2 [dev]'s VAE (see benchmarks.speed)
        vae = build_on_device(check, AutoencoderKLFlux2)
    size = check.scale.image_size
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    entry["config"] = {
        "block_out_channels": list(vae.config.block_out_channels),
        "latent_channels": vae.config.latent_channels,
    }
    generator = torch.Generator().manual_seed(0)
    image = (torch.rand(1, 3, size, size, generator=generator) * 2 - 1).to(check.device, check.dtype)
    latents = torch.randn(1, vae.config.latent_channels, size // factor, size // factor, generator=generator)
    latents = latents.to(check.device, check.dtype)

    def encode(r):
        with torch.inference_mode(), peak_memory(r):
            r.update(bench(lambda: vae.encode(image).latent_dist.mode(), box, check.scale.repeats))

    def decode(r):
        with torch.inference_mode(), peak_memory(r):
            r.update(bench(lambda: vae.decode(latents, return_dict=False)[0], box, check.scale.repeats))

    check.case(entry, f"encode_{size}", box, encode)
    check.case(entry, f"decode_{size}", box, decode)
    entry["headline"] = "; ".join(
        f"{k} {c['median_s']} s" for k, c in entry["cases"].items() if c["status"] == "ok" and "median_s" in c
    )


def section_end_to_end(check: Check, box: Box, entry: dict) -> None:
    """The server's editor against plain diffusers on the same inputs: `edit` at 4 steps, one reference."""
    check.drop_transformer()
    check.case(entry, "tiny", box, lambda r: _end_to_end_tiny(check, box, r))
    check.case(entry, "full_size_random", box, lambda r: _end_to_end_full(check, box, r))
    entry["headline"] = "; ".join(
        f"{k}: editor {c['editor']['median_s']} s, diffusers {c['diffusers']['median_s']} s"
        for k, c in entry["cases"].items()
        if c["status"] == "ok"
    )


def _plain_call(pipe, check: Check, reference, size: int):
    from pipelines import PROFILES

    steps, sigmas = PROFILES["edit"].schedule(E2E_STEPS)
    return pipe(
        image=[reference],
        prompt=PROMPT,
        height=size,
        width=size,
        num_inference_steps=steps,
        sigmas=sigmas,
        guidance_scale=2.5,
        num_images_per_prompt=1,
        generator=torch.Generator("cpu").manual_seed(1),
        output_type="pil",
    ).images[0]


def _compare(check: Check, box: Box, record: dict, editor, pipe, size: int, repeats: int) -> None:
    import numpy as np
    import PIL.Image

    from pipelines import EditCall

    reference = PIL.Image.new("RGB", (size, size), (120, 40, 200))
    call = EditCall(images=[reference], prompt=PROMPT, width=size, height=size, num_inference_steps=E2E_STEPS, seed=1)
    images = {}
    record["size"] = size
    record["editor_adapters_loaded"] = sorted(editor.adapters.loaded)  # kept, unfused, disabled for `edit`
    with peak_memory(record):
        record["editor"] = bench(lambda: images.__setitem__("editor", editor.edit(call).images[0]), box, repeats)
        record["diffusers"] = bench(
            lambda: images.__setitem__("diffusers", _plain_call(pipe, check, reference, size)), box, repeats
        )
    a, b = np.asarray(images["editor"]).astype(int), np.asarray(images["diffusers"]).astype(int)
    record["max_pixel_diff"] = int(np.abs(a - b).max())
    record["editor_overhead_s"] = round(record["editor"]["median_s"] - record["diffusers"]["median_s"], 4)


def _end_to_end_tiny(check: Check, box: Box, record: dict) -> None:
    from diffusers import Flux2Pipeline

    from pipelines import load_editor
    from pipelines.editor import load_components
    from pipelines.runtime import RuntimeOptions

    tiny = check.tiny_dir()
    editor = load_editor(tiny, device=str(check.device), options=RuntimeOptions(memory_mode="full"))
    pipe = Flux2Pipeline(**load_components(tiny, check.dtype)).to(check.device)
    pipe.set_progress_bar_config(disable=True)
    _compare(check, box, record, editor, pipe, 512 if not check.smoke else 64, check.scale.repeats)


def _end_to_end_full(check: Check, box: Box, record: dict) -> None:
    """Full-size components with random weights, built on the GPU; plain diffusers and the server's editor share
    them (the editor wraps the same pipeline, placed `full`)."""
    if check.smoke:
        raise Unavailable("smoke run: full size needs a GPU with about 110 GiB free")
    if check.time_left() < 60 or box.budget_s - box.elapsed() < 40:
        raise Skipped("not enough time left for a full-size pipeline")
    free_memory()
    free, _ = torch.cuda.mem_get_info()
    if free < 112 * GiB:
        raise Unavailable(f"needs about 112 GiB free on the GPU, {gib(free)} GiB free")
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    from pipelines import Flux2Editor
    from pipelines.acceleration import Accelerator
    from pipelines.editor import load_tokenizer
    from pipelines.memory import MemoryPlan, module_sizes
    from pipelines.runtime import Runtime, RuntimeOptions

    tiny = check.tiny_dir()
    started = time.monotonic()
    config = transformer_config(check)
    components = {
        "transformer": build_on_device(check, lambda: Flux2Transformer2DModel.from_config(config)),
        "text_encoder": build_on_device(check, lambda: Mistral3ForConditionalGeneration(Mistral3Config())),
        "vae": build_on_device(check, lambda: AutoencoderKLFlux2()),
        "scheduler": FlowMatchEulerDiscreteScheduler.from_pretrained(tiny, subfolder="scheduler"),
        "tokenizer": load_tokenizer(tiny / "tokenizer"),  # prompts are padded to 512 tokens whatever the tokenizer
    }
    sync()
    record["build_s"] = round(time.monotonic() - started, 2)
    pipe = Flux2Pipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    sizes = module_sizes(components["transformer"], components["text_encoder"], components["vae"], check.dtype)
    plan = MemoryPlan("full", str(check.device), reason="gpu_check: built on the GPU")
    runtime = Runtime(RuntimeOptions(memory_mode="full"), plan, sizes, Accelerator.from_settings(None, None))
    editor = Flux2Editor(pipe, tiny, 0.0, runtime)
    _compare(check, box, record, editor, pipe, check.scale.image_size, repeats=1)


RUNNERS = {
    "environment": section_environment,
    "memory_modes": section_memory_modes,
    "transformer_step": section_transformer_step,
    "lora": section_lora,
    "fp8_eager": section_fp8_eager,
    "fp8_compile": section_fp8_compile,
    "text_encoder": section_text_encoder,
    "vae": section_vae,
    "end_to_end": section_end_to_end,
}


# ---------------------------------------------------------------------------------------------------------- main


def default_out(smoke: bool) -> Path:
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / "gpu_check.json"
    tag = "smoke" if smoke else (torch.cuda.get_device_name(0).split()[-1].lower() if cuda() else "cpu")
    return Path("benchmarks/results") / f"gpu_check-{tag}.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="JSON path (default $OUT/gpu_check.json, else benchmarks/results/)")
    parser.add_argument("--smoke", action="store_true", help="every section on the CPU with tiny shapes (CI)")
    parser.add_argument("--time-limit", type=float, default=400.0, help="seconds: no section starts after this")
    parser.add_argument(
        "--sections",
        type=lambda s: [x for x in s.split(",") if x],
        default=[name for name, _ in SECTIONS],
        help="comma-separated subset, in any order (run in priority order)",
    )
    parser.add_argument(
        "--lora-ranks", type=lambda s: [int(x) for x in s.split(",") if x], default=[64, 256], help="LoRA ranks"
    )
    args = parser.parse_args(argv)
    unknown = set(args.sections) - set(RUNNERS)
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}; known: {', '.join(RUNNERS)}")
    args.argv = sys.argv[1:] if argv is None else argv
    args.out = args.out or default_out(args.smoke)
    return args


def main(argv: list[str] | None = None, started: float | None = None) -> int:
    """Run the check; `started` is when the run's time limit began (the process's start when run as a script)."""
    args = parse_args(argv)
    # a fresh inductor cache for the run, so compile seconds are cold ones (unless the caller chose a cache)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="gpu-check-inductor-"))
    torch.manual_seed(0)
    check = Check(args, started)
    check.write()
    for name, budget in SECTIONS:
        if name not in args.sections:
            continue
        if check.device.type != "cuda" and not check.smoke and name != "environment":
            # FLUX.2 [dev]'s sizes in fp32 on a CPU would need ~200 GB of RAM: say why, don't try
            reason = "no CUDA device (environment.why_no_gpu says why); --smoke runs the sections on a CPU"
            check.report["sections"][name] = {"status": "unavailable", "reason": reason}
            continue
        check.run_section(name, budget, RUNNERS[name])
    check.report["finished"] = True
    check.write()
    check.close()
    print(summary(check.report))
    print(f"written: {check.out}")
    return 0


def summary(report: dict) -> str:
    lines = [
        f"gpu_check ({report['mode']}) on {report['device']}, {report['elapsed_s']} s",
        "| section | status | s | |",
    ]
    lines.append("| --- | --- | --- | --- |")
    for name, entry in report["sections"].items():
        note = entry.get("headline") or entry.get("reason") or entry.get("error") or ""
        lines.append(f"| {name} | {entry['status']} | {entry.get('seconds', '')} | {str(note)[:160]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(started=STARTED))
