"""LoRAs a request asks for (fal-ai/flux-2/lora, fal-ai/flux-2/lora/edit): loaded once, switched per request.

A LoRA is known by the sha256 of its file: the same bytes are the same adapter, whatever URL or name brought them.
The first request that uses it loads it into the transformer with diffusers' LoRA loader
(`Flux2Pipeline.load_lora_weights(..., adapter_name=...)`, peft underneath) as a named adapter beside the base
weights, *unfused*, like the distilled turbo adapter (`pipelines.adapters`); later requests only switch to it
(`set_adapters(names, weights)`: peft's per-layer flags and scales, no weight written or read again). Several may
be active at once, each with its scale. At most `capacity` stay loaded; beyond, the least recently used is
removed (`delete_adapters`), never one the running request needs.

File formats: whatever diffusers' FLUX.2 loader (`Flux2LoraLoaderMixin.lora_state_dict`) converts: diffusers/peft
keys (`transformer.<module>.lora_A.weight`), the original BFL naming as ai-toolkit writes it
(`diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight`, peft's `base_model.model.` prefix too), kohya's
(`lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight` with `.alpha`), and LoKr. Only safetensors files are
read (never a pickle). Before a file touches the model, every converted key is checked against the transformer:
the layer must exist and be a linear layer, and lora_A/lora_B must have its input/output sizes, so that a LoRA made
for another model is refused naming the first tensor that doesn't fit, rather than loaded in part. Anything that
still fails while loading removes what was added of that adapter, so the model stays as it was.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

MAX_LORAS = 3  # per request, as fal's endpoints take
ADAPTER_PREFIX = "lora-"  # adapter names: "lora-" + the first 16 hex digits of the file's sha256
# A converted key: `transformer.<module path>.<tensor>`, the tensor a LoRA's (A, B, B's bias) or a LoKr factor.
LORA_KEY = re.compile(r"transformer\.(?P<module>.+)\.(?P<tensor>lora_A\.weight|lora_B\.weight|lora_B\.bias|lokr_\w+)")


class LoraError(ValueError):
    """A LoRA file this model can't use. `index` is its place in the request's `loras`; the message says why."""

    def __init__(self, index: int, message: str):
        super().__init__(index, message)  # both in args: the error crosses process boundaries (pipelines.parallel)
        self.index = index
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class LoraFile:
    """One LoRA of a request: the sha256 of its bytes (its identity), the safetensors file to load it from when it
    is not loaded yet, its scale, and its place in the request's `loras`."""

    digest: str
    path: Path
    scale: float
    index: int

    @property
    def adapter_name(self) -> str:
        return ADAPTER_PREFIX + self.digest[:16]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def read_state_dict(pipe, lora: LoraFile) -> dict[str, torch.Tensor]:
    """The file's tensors, converted to diffusers' keys by the FLUX.2 LoRA loader; LoraError if it can't be read."""
    import safetensors

    try:
        return pipe.lora_state_dict(
            str(lora.path.parent), weight_name=lora.path.name, use_safetensors=True, local_files_only=True
        )
    except safetensors.SafetensorError as exc:
        raise LoraError(lora.index, f"The file is not a safetensors file ({exc}).") from exc
    except Exception as exc:  # the converters fail on keys they don't know in several ways
        raise LoraError(
            lora.index, f"The file's keys are not a FLUX.2 LoRA diffusers can read: {_short(str(exc))}"
        ) from exc


def _in_out(module) -> tuple[int, int] | None:
    """A linear layer's (in_features, out_features), also when a LoRA layer already wraps it; None otherwise."""
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    inputs, outputs = getattr(base, "in_features", None), getattr(base, "out_features", None)
    return (inputs, outputs) if isinstance(inputs, int) and isinstance(outputs, int) else None


def state_dict_problem(transformer, state_dict: dict[str, torch.Tensor]) -> str | None:
    """Why these (converted) LoRA tensors don't fit `transformer`, naming the first that doesn't; None if they do."""
    if not state_dict:
        return "The file holds no LoRA weights for FLUX.2's transformer."
    modules = dict(transformer.named_modules())
    ranks: dict[str, dict[str, int]] = {}
    for key, tensor in state_dict.items():
        match = LORA_KEY.fullmatch(key)
        if match is None:
            return f"{key!r} is not a LoRA tensor of FLUX.2's transformer (layer.lora_A/lora_B)."
        name, part = match["module"], match["tensor"]
        sizes = _in_out(modules[name]) if name in modules else None
        if sizes is None:
            return f"{key!r}: FLUX.2's transformer has no linear layer {name!r} (a LoRA made for another model?)."
        inputs, outputs = sizes
        shape = list(tensor.shape)
        if part == "lora_A.weight":
            if tensor.ndim != 2 or shape[1] != inputs:
                return f"{key!r} has shape {shape}; layer {name!r} takes {inputs} inputs: it must be [rank, {inputs}]."
            ranks.setdefault(name, {})["A"] = shape[0]
        elif part == "lora_B.weight":
            if tensor.ndim != 2 or shape[0] != outputs:
                return f"{key!r} has shape {shape}; layer {name!r} has {outputs} outputs: it must be [{outputs}, rank]."
            ranks.setdefault(name, {})["B"] = shape[1]
        elif part == "lora_B.bias" and shape != [outputs]:
            return f"{key!r} has shape {shape}; layer {name!r} has {outputs} outputs."
    for name, rank in ranks.items():
        if rank.keys() != {"A", "B"}:
            missing = "lora_B" if "A" in rank else "lora_A"
            return f"Layer {name!r} has no {missing} weight."
        if rank["A"] != rank["B"]:
            return f"Layer {name!r}: lora_A has rank {rank['A']} and lora_B rank {rank['B']}."
    return None


class LoraCache:
    """The request LoRAs loaded on `pipe`'s transformer, by content: at most `capacity`, least recently used
    removed first. Runs on the model's thread, like everything that touches the pipeline."""

    def __init__(self, pipe, capacity: int):
        self.pipe = pipe
        self.capacity = max(capacity, MAX_LORAS)  # one request's LoRAs always fit
        self.loaded: OrderedDict[str, str] = OrderedDict()  # sha256 -> adapter name, least recently used first

    def prepare(self, loras: Sequence[LoraFile]) -> tuple[tuple[tuple[str, float], ...], int, float]:
        """Load the LoRAs that aren't loaded yet. Returns the adapters to activate with their scales (the same
        file listed twice is one adapter at the sum of its scales), how many files were loaded, and the seconds
        that took. LoraError names the first file that can't be used; the model is then as it was."""
        scales: dict[str, float] = {}
        for lora in loras:
            scales[lora.digest] = scales.get(lora.digest, 0.0) + lora.scale
        needed = {lora.digest for lora in loras}
        loaded, started = 0, time.perf_counter()
        for lora in loras:
            if lora.digest in self.loaded:
                self.loaded.move_to_end(lora.digest)
                continue
            while len(self.loaded) >= self.capacity:
                self._evict(next(d for d in self.loaded if d not in needed))
            self._load(lora)
            loaded += 1
        adapters = tuple((self.loaded[digest], scale) for digest, scale in scales.items())
        return adapters, loaded, time.perf_counter() - started

    def _load(self, lora: LoraFile) -> None:
        name = lora.adapter_name
        state_dict = read_state_dict(self.pipe, lora)
        problem = state_dict_problem(self.pipe.transformer, state_dict)
        if problem:
            raise LoraError(lora.index, problem)
        del state_dict
        started = time.perf_counter()
        try:
            self.pipe.load_lora_weights(
                str(lora.path.parent),
                weight_name=lora.path.name,
                adapter_name=name,
                use_safetensors=True,
                local_files_only=True,
            )
            if name not in self.pipe.get_list_adapters().get("transformer", []):
                raise LoraError(lora.index, "No layer of FLUX.2's transformer took a weight of this file.")
        except BaseException as exc:
            self._remove(name)
            if isinstance(exc, (LoraError, torch.cuda.OutOfMemoryError)) or not isinstance(exc, Exception):
                raise
            raise LoraError(lora.index, f"The LoRA could not be loaded: {type(exc).__name__}: {_short(str(exc))}")
        self.loaded[lora.digest] = name
        log.info("LoRA %s (sha256 %s) loaded as adapter %r in %.2f s", lora.path.name, lora.digest, name,
                 time.perf_counter() - started)  # fmt: skip

    def _evict(self, digest: str) -> None:
        name = self.loaded.pop(digest)
        self._remove(name)
        log.info("LoRA adapter %r (sha256 %s) unloaded: least recently used of %d", name, digest, self.capacity)

    def _remove(self, name: str) -> None:
        """Remove every layer and config entry of adapter `name` (also of one that failed half-way through)."""
        transformer = self.pipe.transformer
        if name in getattr(transformer, "peft_config", {}) or any(
            name in getattr(module, "lora_A", {}) for module in transformer.modules()
        ):
            transformer.delete_adapters(name)

    def describe(self) -> dict:
        """For /health's capabilities: how many LoRAs a request may use, and how many stay loaded."""
        return {"max_per_request": MAX_LORAS, "max_loaded": self.capacity}
