"""Where FLUX.2's components live: memory modes, chosen from free GPU memory or by configuration.

FLUX.2 [dev] in bf16 is a 32B-parameter transformer (~64 GB), a 24B-parameter Mistral text encoder (~48 GB) and
a small VAE: ~112 GB, more than an 80 GB H100 holds (BFL's diffusers guide: "Even an H100 can't hold the
text-encoder, transformer and VAE at the same time"; H200/B200 hold everything). The modes, fastest first:

- `full`: every component on one GPU.
- `multi-gpu`: transformer and VAE on one GPU, the text encoder on another (`text_encoder_device`), placed with
  accelerate's `dispatch_model` hooks exactly as diffusers' `device_map="balanced"` places pipeline components.
- `offload-text-encoder`: transformer and VAE resident; the text encoder stays in (pinned) CPU memory and is
  streamed to the GPU block by block while a prompt is encoded (diffusers group offloading with a CUDA
  stream), so only one decoder layer of it is on the GPU at a time.
- `model-offload`: diffusers' `enable_model_cpu_offload` (BFL's documented way on 80 GB): each component moves
  to the GPU when used, whole. Slower than `offload-text-encoder` (the transformer moves every request).
- `group-offload`: the transformer and the text encoder both streamed block by block (diffusers group
  offloading with streams); the VAE resident. Fits small GPUs; every step streams the transformer's weights.

Independently, the transformer's weights can be quantized (`quantization`): `int8` (torchao int8 weight-only;
also runs on the CPU), `fp8` (torchao float8 weights and activations; Ada/Hopper, compute capability >= 8.9),
`int4` (torchao int4 weight-only; CUDA). `auto` lets the chooser use one only where bf16 does not fit without
streaming the transformer.

`choose_memory_mode` is a pure function of the free memory per GPU and the components' sizes, so it is unit
tested and `flux2-server doctor` can show what a box would run. The activation reserve (default 10 GiB, for
1024 px outputs with 4 references) is provisional until the GPU benchmark's peak-memory figures replace it.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pipelines.quantization import check_quantization, quantization_device, quantize_text_encoder, quantize_transformer

log = logging.getLogger(__name__)

GiB = 1024**3
MODES = ("full", "multi-gpu", "offload-text-encoder", "model-offload", "group-offload")
QUANTIZATIONS = ("none", "int8", "fp8", "int4")
BYTES_PER_WEIGHT = {"none": None, "int8": 1.0, "fp8": 1.0, "int4": 0.5}  # None: the load dtype's size
DEFAULT_RESERVE_BYTES = 10 * GiB  # activations + VAE decode at 1024 px with 4 references; provisional
STREAM_RESERVE_BYTES = 2 * GiB  # a streamed component's prefetched blocks (largest FLUX.2 block ~1.3 GB in bf16)
TEXT_ENCODER_BLOCK_MODULES = ["model", "language_model"]  # Mistral3ForConditionalGeneration -> decoder layers


@dataclass(frozen=True)
class ComponentSizes:
    """Bytes of each component's weights at the dtype they will run in."""

    transformer: int
    text_encoder: int
    vae: int

    @property
    def total(self) -> int:
        return self.transformer + self.text_encoder + self.vae


@dataclass(frozen=True)
class MemoryPlan:
    mode: str
    device: str  # where the transformer and the VAE compute ("cuda:0", "cpu")
    text_encoder_device: str | None = None  # multi-gpu only
    quantization: str = "none"
    reason: str = ""

    def describe(self) -> dict:
        return asdict(self)


class MemoryModeError(ValueError):
    """A memory mode that cannot run on this machine, said plainly at start-up."""


def component_sizes(weights_dir: Path, dtype: torch.dtype) -> ComponentSizes:
    """Weight bytes per component at `dtype`, from the safetensors headers on disk (nothing is loaded)."""
    from safetensors import safe_open

    itemsize = torch.empty((), dtype=dtype).element_size()

    def count(directory: Path) -> int:
        total = 0
        for path in sorted(directory.glob("*.safetensors")):
            with safe_open(path, framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                    n = 1
                    for dim in f.get_slice(key).get_shape():
                        n *= dim
                    total += n
        return total * itemsize

    return ComponentSizes(*(count(weights_dir / name) for name in ("transformer", "text_encoder", "vae")))


def module_sizes(transformer, text_encoder, vae, dtype: torch.dtype) -> ComponentSizes:
    """The same from loaded (or meta-device) modules."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return ComponentSizes(
        *(sum(p.numel() for p in m.parameters()) * itemsize for m in (transformer, text_encoder, vae))
    )


def quantized_bytes(transformer_bytes: int, quantization: str, dtype_itemsize: int = 2) -> int:
    per_weight = BYTES_PER_WEIGHT[quantization]
    return transformer_bytes if per_weight is None else int(transformer_bytes / dtype_itemsize * per_weight)


def choose_memory_mode(
    free_bytes_per_gpu: list[int],
    sizes: ComponentSizes,
    reserve_bytes: int = DEFAULT_RESERVE_BYTES,
    quantization: str = "none",
    fp8_capable: bool = False,
    dtype_itemsize: int = 2,
    primary: int | None = None,
) -> MemoryPlan:
    """The fastest memory mode that fits, from the free bytes of each visible GPU (empty: no GPU).

    `quantization` is a fixed choice (`none`, `int8`, `fp8`, `int4`) or `auto`: then bf16 is kept wherever the
    transformer can stay resident, and the smallest-loss quantization that keeps it resident is used
    otherwise (fp8 where `fp8_capable`, else int8, then int4), before falling back to streaming it.
    The transformer goes on `primary` (a GPU index) when given, else on the GPU with the most free memory.
    """
    if not free_bytes_per_gpu:
        return MemoryPlan(
            "full",
            "cpu",
            quantization="none" if quantization == "auto" else quantization,
            reason="no GPU: everything on the CPU",
        )
    gpu = primary if primary is not None else max(range(len(free_bytes_per_gpu)), key=lambda i: free_bytes_per_gpu[i])
    free = free_bytes_per_gpu[gpu]
    others = [i for i in range(len(free_bytes_per_gpu)) if i != gpu]
    device = f"cuda:{gpu}"
    gib = lambda n: f"{n / GiB:.1f} GiB"

    if quantization == "auto":
        candidates = ["none", "fp8" if fp8_capable else "int8", "int4"]
    else:
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)} or auto, got {quantization!r}")
        candidates = [quantization]

    for quant in candidates:
        t = quantized_bytes(sizes.transformer, quant, dtype_itemsize)
        resident = t + sizes.vae + reserve_bytes
        label = f" ({quant} transformer)" if quant != "none" else ""
        if resident + sizes.text_encoder <= free:
            return MemoryPlan(
                "full",
                device,
                quantization=quant,
                reason=f"everything{label} fits on {device}: {gib(resident + sizes.text_encoder)} of {gib(free)} free",
            )
        if others:
            second = max(others, key=lambda i: free_bytes_per_gpu[i])
            if resident <= free and sizes.text_encoder + STREAM_RESERVE_BYTES <= free_bytes_per_gpu[second]:
                return MemoryPlan(
                    "multi-gpu",
                    device,
                    text_encoder_device=f"cuda:{second}",
                    quantization=quant,
                    reason=f"transformer{label} and VAE on {device}, text encoder on cuda:{second}",
                )
        if resident + STREAM_RESERVE_BYTES <= free:
            return MemoryPlan(
                "offload-text-encoder",
                device,
                quantization=quant,
                reason=f"transformer{label} and VAE resident on {device} ({gib(resident)} of {gib(free)} "
                "free); the text encoder is streamed from CPU memory",
            )
    # streamed modes: the smallest quantization that can be streamed (int4 can't: pipelines.quantization)
    quant = [q for q in candidates if q != "int4"][-1] if candidates != ["int4"] else "int4"
    t = quantized_bytes(sizes.transformer, quant, dtype_itemsize)
    if max(t, sizes.text_encoder) + sizes.vae + reserve_bytes <= free:
        return MemoryPlan(
            "model-offload",
            device,
            quantization=quant,
            reason=f"each component fits on {device} alone, not together: model CPU offload",
        )
    return MemoryPlan(
        "group-offload",
        device,
        quantization=quant,
        reason=f"the transformer does not fit on {device} ({gib(free)} free): streamed block by block",
    )


def free_gpu_bytes() -> list[int]:
    """Free bytes on each visible CUDA device (empty without CUDA)."""
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]


def fp8_capable(device: str) -> bool:
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(torch.device(device)) >= (8, 9)


def check_plan(plan: MemoryPlan) -> None:
    """Refuse, plainly, a plan this machine cannot run (raised at start-up, before any weight is loaded)."""
    if plan.mode not in MODES:
        raise MemoryModeError(f"unknown memory mode {plan.mode!r}: use one of auto, {', '.join(MODES)}")
    if plan.quantization not in QUANTIZATIONS:
        raise MemoryModeError(f"unknown quantization {plan.quantization!r}: use one of {', '.join(QUANTIZATIONS)}")
    on_cuda = plan.device.startswith("cuda")
    if on_cuda and not torch.cuda.is_available():
        raise MemoryModeError(f"device {plan.device} was asked for, but CUDA is not available on this machine")
    if plan.mode != "full" and not on_cuda:
        raise MemoryModeError(
            f"memory mode {plan.mode!r} needs a CUDA GPU (it moves weights between CPU and GPU memory); this "
            "server runs on the CPU, where everything is in one memory: use FLUX2_MEMORY_MODE=full (or auto)"
        )
    if plan.mode == "multi-gpu":
        if not plan.text_encoder_device or not plan.text_encoder_device.startswith("cuda"):
            raise MemoryModeError("memory mode 'multi-gpu' needs FLUX2_TEXT_ENCODER_DEVICE, e.g. cuda:1")
        index = torch.device(plan.text_encoder_device).index or 0
        if index >= torch.cuda.device_count():
            raise MemoryModeError(
                f"text encoder device {plan.text_encoder_device} does not exist: {torch.cuda.device_count()} GPU(s)"
            )
    check_quantization(plan, fp8_ok=fp8_capable(plan.device))  # pipelines.quantization: format x device x mode


def apply_memory_plan(pipe, plan: MemoryPlan) -> None:
    """Place the pipeline's components as `plan` says (quantizing the transformer first, if asked).

    Works with any devices, the CPU included: the offload modes' hooks then move weights between CPU and CPU,
    which is how the tests run their mechanics on a machine without a GPU (`check_plan` refuses them for the
    server there). CUDA streams are used only where the compute device is a GPU.
    """
    device = torch.device(plan.device)
    cpu = torch.device("cpu")
    stream = device.type == "cuda"
    quantize_transformer(pipe.transformer, plan.quantization, quantization_device(plan, "transformer"))
    te_quantization = getattr(plan, "text_encoder_quantization", "none")  # the field lands with the plan branch
    quantize_text_encoder(pipe.text_encoder, te_quantization, quantization_device(plan, "text_encoder"))

    if plan.mode == "full":
        pipe.to(device)
    elif plan.mode == "multi-gpu":
        from accelerate import dispatch_model

        # As diffusers' device_map="balanced" does: each component with its own execution device, inputs and
        # outputs moved by accelerate's hooks; the pipeline computes where the first component (the VAE) is.
        for name, target in (("vae", device), ("text_encoder", plan.text_encoder_device), ("transformer", device)):
            module = getattr(pipe, name)
            dispatch_model(
                module, device_map={"": target}, force_hooks=True, skip_keys=getattr(module, "_skip_keys", None)
            )
    elif plan.mode == "offload-text-encoder":
        pipe.transformer.to(device)
        pipe.vae.to(device)
        _stream_text_encoder(pipe.text_encoder, device, cpu, stream)
    elif plan.mode == "model-offload":
        pipe.enable_model_cpu_offload(device=device)
    elif plan.mode == "group-offload":
        pipe.vae.to(device)
        pipe.transformer.enable_group_offload(
            onload_device=device,
            offload_device=cpu,
            offload_type="block_level",
            num_blocks_per_group=1,
            use_stream=stream,
        )
        _stream_text_encoder(pipe.text_encoder, device, cpu, stream)
    else:
        raise MemoryModeError(f"unknown memory mode {plan.mode!r}")


def _stream_text_encoder(text_encoder, device, cpu, stream: bool) -> None:
    """Group offloading of the text encoder, block by block from CPU memory (offload-text-encoder, group-offload)."""
    from diffusers.hooks import apply_group_offloading

    apply_group_offloading(
        text_encoder,
        onload_device=device,
        offload_device=cpu,
        offload_type="block_level",
        num_blocks_per_group=1,
        use_stream=stream,
        block_modules=TEXT_ENCODER_BLOCK_MODULES,
    )


def resolve_plan(
    mode: str,
    sizes: ComponentSizes,
    device: str | None = None,
    text_encoder_device: str | None = None,
    quantization: str = "none",
    reserve_bytes: int = DEFAULT_RESERVE_BYTES,
    free_bytes_per_gpu: list[int] | None = None,
) -> MemoryPlan:
    """The plan for a configured mode (`auto` asks `choose_memory_mode`), checked against this machine."""
    free = free_gpu_bytes() if free_bytes_per_gpu is None else free_bytes_per_gpu
    if device == "cpu":
        free = []
    primary = (torch.device(device).index or 0) if device and device.startswith("cuda") else None
    if mode == "auto":
        plan = choose_memory_mode(
            free,
            sizes,
            reserve_bytes,
            quantization,
            fp8_capable=bool(free) and fp8_capable(device or "cuda:0"),
            primary=primary,
        )
        if text_encoder_device and plan.mode in ("full", "offload-text-encoder") and free:
            plan = MemoryPlan(
                "multi-gpu",
                plan.device,
                text_encoder_device,
                plan.quantization,
                reason=f"text encoder placed on {text_encoder_device} by configuration",
            )
    else:
        target = device or ("cuda:0" if free else "cpu")
        plan = MemoryPlan(
            mode,
            target,
            text_encoder_device if mode == "multi-gpu" else None,
            "none" if quantization == "auto" else quantization,
            reason="set by configuration",
        )
    check_plan(plan)
    log.info("memory mode %s on %s (quantization %s): %s", plan.mode, plan.device, plan.quantization, plan.reason)
    return plan


def describe_sizes(sizes: ComponentSizes) -> dict:
    return {k: round(v / GiB, 3) for k, v in asdict(sizes).items()} | {"total": round(sizes.total / GiB, 3)}
