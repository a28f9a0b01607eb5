"""`flux2-server doctor`: what this machine has (GPU, driver, libraries, memory) and what the server would do."""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import platform
from pathlib import Path

GiB = 1024**3
LIBRARIES = ("torch", "torchvision", "diffusers", "transformers", "accelerate", "safetensors", "fastapi", "uvicorn")


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def host_memory() -> tuple[int, int] | None:
    """(available, total) bytes of system memory (pipelines.memory reads /proc/meminfo)."""
    from pipelines.memory import host_memory as read

    return read()


def simulated_hardware(args: argparse.Namespace):
    """The `Hardware` the simulation flags describe (--gpu-memory, --gpus, --host-memory, --fp8, ...), or None when
    none is given (then this machine is asked). Raises ValueError for a description that doesn't add up."""
    from pipelines.memory import Hardware

    given = (args.gpu_memory, args.gpus, args.host_memory, args.fp8, args.compute_capability)
    if all(value is None for value in given):
        return None
    gpus = 1 if args.gpus is None else args.gpus
    if gpus and args.gpu_memory is None:
        raise ValueError(f"--gpu-memory GiB is needed to simulate {gpus} GPU(s)")
    fp8 = True if args.fp8 is None else args.fp8  # Hopper/Ada/Blackwell unless told otherwise
    if args.compute_capability is not None:
        major, _, minor = args.compute_capability.partition(".")
        if not (major.isdigit() and minor.isdigit()):
            raise ValueError(f"--compute-capability takes X.Y, e.g. 8.0 or 9.0; got {args.compute_capability!r}")
        capable = (int(major), int(minor)) >= (8, 9)
        if args.fp8 is not None and args.fp8 != capable:
            raise ValueError(
                f"--compute-capability {args.compute_capability} and --{'' if args.fp8 else 'no-'}fp8 disagree"
            )
        fp8 = capable
    host = args.host_memory
    if host is None:
        memory = host_memory()
        host = memory[0] / GiB if memory else None
    return Hardware.simulate(args.gpu_memory or 0.0, gpus, host, fp8)


def plan_sizes(weights: Path | None, settings, hardware):
    """(sizes, dtype, where the sizes come from): the weights on disk, else FLUX.2 [dev]'s real sizes."""
    import torch

    from pipelines import memory
    from pipelines.editor import pick_device, pick_dtype

    if hardware is not None and hardware.simulated:
        device = torch.device(settings.device or ("cuda" if hardware.gpu_free_bytes else "cpu"))
    else:
        device = pick_device(settings.device)
    dtype = pick_dtype(device, settings.dtype)
    if weights is not None:
        return memory.component_sizes(weights, dtype), dtype, str(weights)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return memory.flux2_dev_sizes(itemsize), dtype, "FLUX.2 [dev] (its real sizes; pass --weights DIR for others)"


def resolve(settings, sizes, mode: str, quantization: str, free_per_gpu: list[int], hardware):
    """What `serve` would run with these settings: (plan, None), or (None, why it would refuse)."""
    from pipelines import memory

    try:
        return memory.resolve_plan(
            mode,
            sizes,
            device=settings.device,
            text_encoder_device=settings.text_encoder_device,
            quantization=quantization,
            reserve_bytes=None if settings.memory_reserve_gb is None else int(settings.memory_reserve_gb * GiB),
            free_bytes_per_gpu=free_per_gpu,
            hardware=hardware,
        ), None
    except ValueError as exc:  # MemoryModeError and bad names: what `serve` would exit with
        return None, str(exc)


def memory_mode(weights: Path | None, free_per_gpu: list[int], settings=None, hardware=None) -> list[tuple[str, str]]:
    """The memory mode `serve` would run with these settings (FLUX2_MEMORY_MODE, FLUX2_QUANTIZATION, ... or the
    flags), checked against this machine (or the simulated `hardware`) as `serve` checks it at start-up: the plan,
    or why it is refused. Where a mode is configured, also the one `auto` would pick."""
    from pipelines.memory import describe_sizes
    from server.config import Settings

    settings = settings or Settings()
    sizes, dtype, source = plan_sizes(weights, settings, hardware)

    def plan(mode: str, quantization: str) -> str:
        chosen, refused = resolve(settings, sizes, mode, quantization, free_per_gpu, hardware)
        if chosen is None:
            return f"refused: {refused}"
        te = f", text encoder on {chosen.text_encoder_device}" if chosen.text_encoder_device else ""
        return f"{chosen.mode} on {chosen.device}{te} (quantization {chosen.quantization}): {chosen.reason}"

    configured = plan(settings.memory_mode, settings.quantization)
    automatic = plan("auto", "auto")
    described = ", ".join(f"{k} {v} GiB" for k, v in describe_sizes(sizes).items())
    rows = [
        ("weights size", f"{described} ({dtype}; {source})"),
        ("memory mode", f"[configured: {settings.memory_mode}, quantization {settings.quantization}] {configured}"),
    ]
    if automatic != configured:
        rows.append(("memory mode (auto)", f"[auto, quantization auto would pick] {automatic}"))
    return rows


def gpu_groups(args: argparse.Namespace, hardware) -> dict | None:
    """How `serve --gpus ... --parallel ...` would group this machine's (or the simulated) GPUs: the plan's JSON,
    or {"refused": why}; None when --use-gpus is not given."""
    from pipelines.gpu_groups import GpuPlanError, attention_heads, plan_groups

    if args.use_gpus is None:
        return None
    available = len(hardware.gpu_free_bytes) if hardware is not None else _visible_gpus()
    try:
        plan = plan_groups(
            args.use_gpus,
            available,
            args.parallel or "none",
            args.group_size,
            heads=attention_heads(args.weights),
            memory_mode=args.memory_mode,
        )
    except GpuPlanError as exc:
        return {"refused": str(exc)}
    return {**plan.to_json(), "plan": plan.describe()}


def one_gpu_each(hardware):
    """With several --use-gpus every replica or rank holds a whole model on its own GPU: plan memory for one."""
    import dataclasses

    return dataclasses.replace(hardware, gpu_free_bytes=hardware.gpu_free_bytes[:1])


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def plan_json(weights: Path | None, settings, hardware) -> dict:
    """`doctor --json`: the hardware planned for, the weights' sizes, and the plan `serve` would run or why not."""
    from pipelines.memory import describe_hardware, describe_plan, describe_sizes

    sizes, dtype, source = plan_sizes(weights, settings, hardware)
    chosen, refused = resolve(settings, sizes, settings.memory_mode, settings.quantization, [], hardware)
    return {
        "hardware": describe_hardware(hardware),
        "weights": {"source": source, "dtype": str(dtype).removeprefix("torch."), "gib": describe_sizes(sizes)},
        "configured": {
            "memory_mode": settings.memory_mode,
            "quantization": settings.quantization,
            "text_encoder_device": settings.text_encoder_device,
            "memory_reserve_gb": settings.memory_reserve_gb,
        },
        "plan": None if chosen is None else describe_plan(chosen, sizes),
        "refused": refused,
    }


def fast_path_rows(weights: Path | None, settings=None) -> list[tuple[str, str]]:
    """The fast path `serve` would take with these settings on this GPU, and why (pipelines.fastpath); and, where
    torch sees no GPU, whether `serve` would refuse these weights on the CPU (pipelines.hardware)."""
    import torch

    from pipelines.fastpath import FastPathError, choose_fast_path
    from pipelines.hardware import cpu_fallback_problem, nvidia_driver
    from pipelines.runtime import gpu_capability
    from server.config import Settings

    settings = settings or Settings()
    try:
        options = settings.runtime_options()
        fast = choose_fast_path(options.fast_path, gpu_capability(settings.device), options.explicitly_set())
        rows = [("fast path", f"[configured: {settings.fast_path}] {fast.reason}")]
    except FastPathError as exc:
        rows = [("fast path", f"refused: {exc}")]
    if weights is not None and not torch.cuda.is_available() and importlib.util.find_spec("pipelines.memory"):
        from pipelines.memory import component_sizes

        total = component_sizes(weights, torch.float32).total  # what the CPU would load (fp32)
        problem = cpu_fallback_problem(total, settings.allow_cpu, nvidia_driver())
        rows.append(("on the CPU", f"refused: {problem}" if problem else "allowed"))
    return rows


def report(weights: Path | None, settings=None, hardware=None) -> list[tuple[str, str]]:
    import torch

    from pipelines.hardware import describe_driver, describe_torch_cuda, nvidia_driver

    rows = [("python", platform.python_version()), ("platform", platform.platform())]
    rows += [(name, version(name)) for name in LIBRARIES]
    rows.append(("torch CUDA build", describe_torch_cuda()))
    rows.append(("NVIDIA driver", describe_driver(nvidia_driver())))
    free_per_gpu = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            free, total = torch.cuda.mem_get_info(index)
            free_per_gpu.append(free)
            rows.append(
                (
                    f"cuda:{index}",
                    f"{props.name}, compute {props.major}.{props.minor}, {free / GiB:.1f} GiB free of {total / GiB:.1f} GiB",
                )
            )
    else:
        rows.append(("GPU", "none visible to torch (torch.cuda.is_available() is False): the server runs on the CPU"))
    memory = host_memory()
    if memory:
        rows.append(("system memory", f"{memory[0] / GiB:.1f} GiB available of {memory[1] / GiB:.1f} GiB"))
    if hardware is not None:
        from pipelines.memory import describe_hardware

        rows.append(("simulated hardware", ", ".join(f"{k} {v}" for k, v in describe_hardware(hardware).items())))
    rows += memory_mode(weights, free_per_gpu, settings, hardware)
    rows += fast_path_rows(weights, settings)
    if weights is not None:
        from weights.verify import verify

        checked = verify(weights)
        rows.append(("weights", f"{weights}: " + ("ok" if checked.ok else "; ".join(checked.problems))))
    return rows


SIMULATION_FLAGS = ("gpu_memory", "gpus", "host_memory", "fp8", "compute_capability", "json")
GROUP_FLAGS = ("use_gpus", "parallel", "group_size")  # serve's --gpus/--parallel/--group-size, asked of doctor


def cmd_doctor(args: argparse.Namespace) -> int:
    import json
    import sys

    from pipelines.memory import Hardware, describe_hardware
    from server.config import Settings

    overrides = {
        k: v
        for k, v in vars(args).items()
        if k in Settings.model_fields and k != "weights" and k not in SIMULATION_FLAGS + GROUP_FLAGS and v is not None
    }
    settings = Settings(**overrides)  # FLUX2_* environment variables, overridden by the flags
    try:
        hardware = simulated_hardware(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    groups = gpu_groups(args, hardware)
    described = hardware
    if groups is not None and "groups" in groups and len(groups["groups"]) * len(groups["groups"][0]) > 1:
        described = hardware or Hardware.detect(settings.device)
        hardware = one_gpu_each(described)
        groups["memory_plan"] = "for one GPU: every replica or rank holds a whole model on its own GPU"
    if args.json:
        document = plan_json(args.weights, settings, hardware or Hardware.detect(settings.device))
        if groups is not None:
            document["hardware"] = describe_hardware(described or Hardware.detect(settings.device))
            document["gpu_groups"] = groups
        print(json.dumps(document, indent=2))
        return 0
    rows = report(args.weights, settings, hardware)
    if groups is not None:
        rows.append(("gpu groups", groups.get("plan") or f"refused: {groups['refused']}"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")
    # the weights it was given can't serve: a failure, for scripts as for people
    weights_ok = dict(rows).get("weights", "").endswith(": ok") if args.weights is not None else True
    return 0 if weights_ok else 1


def add_parser(commands: argparse._SubParsersAction) -> None:
    from server.cli.flags import add_setting_flags, worker_settings

    doctor = commands.add_parser("doctor", help="GPU, driver, library versions, free memory, the memory mode chosen")
    doctor.add_argument("--weights", type=Path, help="also check this weights directory and size the plan for it")
    # the model's settings as `serve` and `worker` take them (and FLUX2_* variables), generated from Settings: the
    # doctor answers for this configuration
    # (but serve's --gpus/--parallel/--group-size: doctor asks those as --use-gpus/--parallel/--group-size below, since
    # its --gpus is the number of simulated GPUs)
    add_setting_flags(doctor, [name for name in worker_settings() if name not in ("gpus", "parallel", "group_size")])
    # planning for hardware this machine doesn't have: the plan `serve` would run there, or why it would refuse
    doctor.add_argument("--json", action="store_true", help="print the plan (or the refusal) as JSON")
    doctor.add_argument("--gpu-memory", type=float, metavar="GIB", help="simulate GPUs of this much memory each")
    doctor.add_argument("--gpus", type=int, metavar="N", help="simulate N GPUs (default 1 with --gpu-memory)")
    doctor.add_argument("--host-memory", type=float, metavar="GIB", help="simulate this much host RAM available")
    doctor.add_argument(
        "--fp8", action=argparse.BooleanOptionalAction, help="simulated GPUs run fp8 (default yes: Hopper, Ada)"
    )
    doctor.add_argument("--compute-capability", metavar="X.Y", help="simulated GPUs' compute capability, e.g. 8.0")
    # several GPUs: how serve would group them (pipelines.gpu_groups), on this machine or the simulated one
    doctor.add_argument("--use-gpus", metavar="LIST", help="the GPUs serve would use: all, or indices like 0,1,2,3")
    doctor.add_argument("--parallel", choices=("none", "context"), help="none: replicas; context: split each request")
    doctor.add_argument("--group-size", type=int, metavar="N", help="GPUs per context-parallel group (default all)")
    doctor.set_defaults(func=cmd_doctor)
