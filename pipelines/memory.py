"""Where FLUX.2's components live and in what precision: the plan, chosen from the hardware or by configuration.

FLUX.2 [dev] in bf16 is a 32.2 B-parameter transformer (60.0 GiB), a 24.0 B-parameter Mistral text encoder
(44.7 GiB) and a small VAE: ~105 GiB, more than an 80 GB H100 holds (BFL's diffusers guide: "Even an H100 can't
hold the text-encoder, transformer and VAE at the same time"; H200/B200 hold everything). The modes, fastest first:

- `full`: every component on one GPU.
- `multi-gpu`: transformer and VAE on one GPU, the text encoder on another (`text_encoder_device`), placed with
  accelerate's `dispatch_model` hooks exactly as diffusers' `device_map="balanced"` places pipeline components.
- `offload-text-encoder`: transformer and VAE resident; the text encoder's decoder layers stay in pinned CPU
  memory and are streamed to the GPU one by one while a prompt is encoded (diffusers group offloading with a
  CUDA stream; `stream_text_encoder`), so only one decoder layer of it is on the GPU at a time.
- `model-offload`: diffusers' `enable_model_cpu_offload` (BFL's documented way on 80 GB): each component moves
  to the GPU when used, whole. Slower than `offload-text-encoder` (the transformer moves every request).
- `group-offload`: the transformer and the text encoder both streamed block by block (diffusers group
  offloading with streams); the VAE resident. Fits small GPUs; every step streams the transformer's weights.

Independently, the transformer's weights can be quantized (`quantization`): `int8` (torchao int8 weight-only;
also runs on the CPU), `fp8` (torchao float8 weights and activations; Ada/Hopper, compute capability >= 8.9),
`int4` (4-bit weight-only; CUDA); the text encoder's weights too (`text_encoder_quantization`: fp8 or int8
weight-only), and the text encoder can be cut to the 31 decoder layers FLUX.2 reads, without `lm_head`
(`text_encoder_layers`: bit-exact prompt embeddings, but no prompt expansion).

`choose_memory_mode` (and `resolve_plan` given a `Hardware`) are pure functions of a hardware description
(`Hardware`: free memory per GPU, host RAM, fp8 support) and the components' sizes (`ComponentSizes`: from the
safetensors headers, or `flux2_dev_sizes()`), so they are unit tested card by card and `flux2-server doctor
--json` can answer for hardware this machine doesn't have. What `auto` prefers, in order (the first plan whose GPU peak fits the GPU and
whose host peak fits the host RAM):

1. everything resident, the transformer in bf16, then in fp8 (int8 where the GPU has no fp8); for each, the text
   encoder whole (prompt expansion possible), cut to 31 layers (bit-exact), cut and fp8/int8 weight-only;
   with two GPUs, the text encoder on the second GPU before it is quantized;
2. the transformer resident (bf16, then fp8/int8), the text encoder (cut, bf16) streamed from pinned host memory
   every request, from pinned host memory that holds them once (`pin_blocks`; quantized streamed weights are
   pinned by diffusers beside the original, twice, else pinned on the fly: `low_cpu_mem_usage`, slower transfers);
3. the same with a 4-bit transformer;
4. model CPU offload; last, the transformer streamed every step (`group-offload`); where even that doesn't fit
   the host RAM, MemoryModeError says so.

A configured mode (not `auto`) is kept; with `quantization=auto` it gets the least quantization that fits it.

The GPU memory kept for activations follows the request's token count (`activation_reserve_bytes`); a plan is
sized for the largest request the API accepts (2048x2048 output, 4 references) where such a plan exists without
streaming the transformer, else for the largest of 1024x1024 with 4 references, then with 1 (a 24 GB card).
Activation and host-overhead figures are estimates, provisional until GPU measurements replace them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from pipelines.quantization import (
    check_quantization,
    fp8_capable,
    quantization_device,
    quantize_text_encoder,
    quantize_transformer,
)

log = logging.getLogger(__name__)

GiB = 1024**3
MiB = 1024**2
MODES = ("full", "multi-gpu", "offload-text-encoder", "model-offload", "group-offload")
QUANTIZATIONS = ("none", "int8", "fp8", "int4")
TEXT_ENCODER_QUANTIZATIONS = ("none", "fp8", "int8")  # weight-only
STREAMED_TEXT_ENCODER_MODES = ("offload-text-encoder", "group-offload")
# Bytes per weight of a quantized linear layer (None: the load dtype's size): int8 and fp8 one byte (plus a scale per
# row, negligible); 4-bit half a byte plus a bf16 scale and zero point per group of 128 weights.
BYTES_PER_WEIGHT = {"none": None, "int8": 1.0, "fp8": 1.0, "int4": 0.5 + 4 / 128}

# FLUX.2 [dev]'s parameter counts: its diffusers/transformers classes at the real configurations, built on the meta
# device (tests/test_memory.py builds them again and compares, so these cannot drift).
FLUX2_DEV_TRANSFORMER_PARAMS = 32_223_281_152  # Flux2Transformer2DModel; every weight is in an nn.Linear
FLUX2_DEV_TRANSFORMER_BLOCK_PARAMS = 31_406_964_736  # 8 double blocks x 0.981 B + 48 single blocks x 0.491 B: what
# quantization shrinks; the other 0.816 B (embedders, shared modulation, norm_out, proj_out) stay in bf16
FLUX2_DEV_TEXT_ENCODER_NUM_LAYERS = 40  # Mistral-Small 3.x decoder layers
FLUX2_DEV_TEXT_ENCODER_LAYER_PARAMS = 555_755_520
FLUX2_DEV_TEXT_ENCODER_EMBEDDING_PARAMS = 671_088_640  # embed_tokens, 131072 x 5120
FLUX2_DEV_TEXT_ENCODER_LM_HEAD_PARAMS = 671_088_640  # untied from embed_tokens in the real checkpoint
FLUX2_DEV_TEXT_ENCODER_NORM_PARAMS = 5_120  # the final RMSNorm
FLUX2_DEV_VISION_TOWER_PARAMS = 403_305_472  # Pixtral
FLUX2_DEV_PROJECTOR_PARAMS = 35_652_608
FLUX2_DEV_TEXT_ENCODER_PARAMS = (
    FLUX2_DEV_TEXT_ENCODER_NUM_LAYERS * FLUX2_DEV_TEXT_ENCODER_LAYER_PARAMS
    + FLUX2_DEV_TEXT_ENCODER_EMBEDDING_PARAMS
    + FLUX2_DEV_TEXT_ENCODER_LM_HEAD_PARAMS
    + FLUX2_DEV_TEXT_ENCODER_NORM_PARAMS
    + FLUX2_DEV_VISION_TOWER_PARAMS
    + FLUX2_DEV_PROJECTOR_PARAMS
)  # 24_011_361_280
FLUX2_DEV_VAE_PARAMS = 84_046_115  # AutoencoderKLFlux2
# FLUX.2 reads the text encoder's hidden states 10, 20 and 30: decoder layers [0, 31) give them bit-exactly
# (30 does not: the final norm lands on index 30), and lm_head is never used for them.
FLUX2_TEXT_ENCODER_LAYERS = 31

# The request sizes a plan is sized for, largest first: the API's largest (2048 px a side, 4 references;
# server/schemas.py), then smaller ones for cards that cannot hold the largest without streaming the transformer.
TEXT_TOKENS = 512  # Flux2Pipeline's max_sequence_length
PIXELS_PER_TOKEN = 16 * 16  # the VAE downsamples 8x, the transformer patchifies 2x2
MAX_REFERENCE_PIXELS = 1024 * 1024  # Flux2Pipeline scales larger reference images down to this area
# Activation memory (est., provisional until a GPU run measures it): a straight line through gpu-findings.md's
# estimates of the transformer's peak: 4.0 GiB at 8,704 tokens (1024^2, one reference; est. 3-4), 7.0 at 20,992
# (four references; est. 6-8), 10.0 at 33,280 (2048^2 with four; est. ~10). The VAE decodes after the transformer;
# its peak (est. 1.5 GiB per output megapixel untiled) stays under the transformer's at every size the API accepts.
ACTIVATION_BASE_BYTES = int(1.875 * GiB)
ACTIVATION_BYTES_PER_TOKEN = 256 * 1024
VAE_DECODE_BYTES_PER_PIXEL = 1.5 * GiB / 1e6
TEXT_ENCODER_ACTIVATION_BYTES = 1 * GiB  # encoding a 512-token prompt (est.)
STREAM_RESERVE_BYTES = 2 * GiB  # a streamed text encoder's two prefetched blocks, where its layers aren't known
TRANSFORMER_STREAM_BYTES = 4 * GiB  # group-offload: two prefetched transformer blocks (a double block: 1.83 GiB bf16)
HOST_BASE_BYTES = 4 * GiB  # the server process itself: libraries, CUDA's host side, tokenizer, buffers (est.)
CUDA_CONTEXT_BYTES = 1 * GiB  # what the CUDA context takes of a simulated card before anything loads (est.)


@dataclass(frozen=True)
class ComponentSizes:
    """Bytes of each component's weights at the dtype they load in, and the parts planning needs.

    The parts default to "not known" (weights laid out otherwise): quantization is then taken to shrink all of a
    component, and a cut text encoder to be as large as the whole one."""

    transformer: int
    text_encoder: int
    vae: int
    transformer_blocks: int | None = None  # the repeated blocks: what quantization shrinks (None: all of it)
    text_encoder_layers: tuple[int, ...] = ()  # each decoder layer, in order: what weight-only quantization
    # shrinks, what is streamed, and what cutting to N layers drops from index N on
    text_encoder_embeddings: int = 0  # embed_tokens (streamed with the layers)
    text_encoder_lm_head: int = 0  # the untied output head (dropped when the encoder is cut)
    itemsize: int = 2  # bytes per weight in the load dtype

    @property
    def total(self) -> int:
        return self.transformer + self.text_encoder + self.vae

    def transformer_bytes(self, quantization: str = "none") -> int:
        blocks = self.transformer if self.transformer_blocks is None else self.transformer_blocks
        return self.transformer - blocks + self._quantized(blocks, quantization)

    def text_encoder_bytes(self, quantization: str = "none", layers: int | None = None) -> int:
        """The text encoder's bytes, weight-only quantized (its decoder layers) and/or cut to `layers` layers."""
        if not self.text_encoder_layers:
            return self._quantized(self.text_encoder, quantization)
        kept = self.text_encoder_layers if layers is None else self.text_encoder_layers[:layers]
        head = self.text_encoder_lm_head if layers is not None else 0  # cutting drops lm_head too
        others = self.text_encoder - sum(self.text_encoder_layers) - head  # embeddings, vision tower, norm, ...
        return others + self._quantized(sum(kept), quantization)

    @property
    def text_encoder_truncated(self) -> int:
        """Bytes of the text encoder cut to FLUX.2's 31 decoder layers without lm_head."""
        return self.text_encoder_bytes(layers=FLUX2_TEXT_ENCODER_LAYERS)

    def text_encoder_streamed(self, layers: int | None = None) -> int:
        """Bytes of the text encoder that streaming moves (decoder layers and embeddings; the rest stays resident)."""
        if not self.text_encoder_layers:
            return self.text_encoder
        kept = self.text_encoder_layers if layers is None else self.text_encoder_layers[:layers]
        return sum(kept) + self.text_encoder_embeddings

    def text_encoder_stream_working_set(self) -> int:
        """GPU bytes of a streamed text encoder while it encodes: two prefetched groups (layers or embeddings)."""
        if not self.text_encoder_layers:
            return STREAM_RESERVE_BYTES
        return 2 * max(max(self.text_encoder_layers), self.text_encoder_embeddings)

    def _quantized(self, nbytes: int, quantization: str) -> int:
        per_weight = BYTES_PER_WEIGHT[quantization]
        return nbytes if per_weight is None else int(nbytes / self.itemsize * per_weight)


def flux2_dev_sizes(itemsize: int = 2) -> ComponentSizes:
    """FLUX.2 [dev]'s sizes at `itemsize` bytes per weight (2: bf16), from the parameter counts above."""
    return ComponentSizes(
        transformer=FLUX2_DEV_TRANSFORMER_PARAMS * itemsize,
        text_encoder=FLUX2_DEV_TEXT_ENCODER_PARAMS * itemsize,
        vae=FLUX2_DEV_VAE_PARAMS * itemsize,
        transformer_blocks=FLUX2_DEV_TRANSFORMER_BLOCK_PARAMS * itemsize,
        text_encoder_layers=(FLUX2_DEV_TEXT_ENCODER_LAYER_PARAMS * itemsize,) * FLUX2_DEV_TEXT_ENCODER_NUM_LAYERS,
        text_encoder_embeddings=FLUX2_DEV_TEXT_ENCODER_EMBEDDING_PARAMS * itemsize,
        text_encoder_lm_head=FLUX2_DEV_TEXT_ENCODER_LM_HEAD_PARAMS * itemsize,
        itemsize=itemsize,
    )


@dataclass(frozen=True)
class MemoryPlan:
    mode: str
    device: str  # where the transformer and the VAE compute ("cuda:0", "cpu")
    text_encoder_device: str | None = None  # multi-gpu only
    quantization: str = "none"  # transformer weights: none | int8 | fp8 | int4
    reason: str = ""
    text_encoder_quantization: str = "none"  # text encoder weights: none | fp8 | int8 (weight-only)
    text_encoder_layers: int | None = None  # None: the whole encoder; N: decoder layers [0, N), no lm_head
    prompt_expansion: bool = True  # False where the encoder is cut or streamed: the editor answers with a notice
    peak_gpu_bytes: int | None = None  # expected peak on the transformer's GPU (weights + reserve)
    peak_host_bytes: int | None = None  # expected peak host RAM while loading/serving
    reserve_bytes: int | None = None  # of peak_gpu_bytes, what is kept for activations
    sized_for: str = ""  # the largest request the reserve covers, e.g. "2048x2048 output, 4 references"
    low_cpu_mem_usage: bool = False  # streamed weights pinned on the fly (diffusers' group offloading option of that
    # name): held once in host RAM instead of up to twice, at the cost of pinning before every transfer

    def describe(self) -> dict:
        return asdict(self)


class MemoryModeError(ValueError):
    """A memory mode that cannot run on this machine, said plainly at start-up."""


@dataclass(frozen=True)
class Request:
    """A request's size, as far as GPU memory is concerned."""

    width: int
    height: int
    references: int
    reference_pixels: int = MAX_REFERENCE_PIXELS  # each reference's area after Flux2Pipeline's resize

    @property
    def tokens(self) -> int:
        """The transformer's sequence: output latents, reference latents and the prompt."""
        per_reference = min(self.reference_pixels, MAX_REFERENCE_PIXELS) // PIXELS_PER_TOKEN
        return self.width * self.height // PIXELS_PER_TOKEN + self.references * per_reference + TEXT_TOKENS

    def describe(self) -> str:
        return f"{self.width}x{self.height} output, {self.references} reference{'s' * (self.references != 1)}"


PLANNED_REQUESTS = (Request(2048, 2048, 4), Request(1024, 1024, 4), Request(1024, 1024, 1))


def activation_reserve_bytes(request: Request, sizes: ComponentSizes | None = None) -> int:
    """Memory a request needs beyond the weights (est., provisional: see ACTIVATION_BYTES_PER_TOKEN).

    The estimates are FLUX.2 [dev]'s. A smaller model of the same architecture (`sizes`: the tiny test model, a
    narrower variant) keeps activations as wide as its hidden size, and its weights grow with the square of that
    width: its reserve is FLUX.2 [dev]'s times the square root of its share of the weights (never more than 1)."""
    transformer: float = ACTIVATION_BASE_BYTES + ACTIVATION_BYTES_PER_TOKEN * request.tokens
    vae = VAE_DECODE_BYTES_PER_PIXEL * request.width * request.height
    if sizes is not None:
        transformer *= _width_share(sizes.transformer / sizes.itemsize, FLUX2_DEV_TRANSFORMER_PARAMS)
        vae *= _width_share(sizes.vae / sizes.itemsize, FLUX2_DEV_VAE_PARAMS)
    return int(max(transformer, vae))


def _width_share(params: float, dev_params: int) -> float:
    return min(1.0, (params / dev_params) ** 0.5)


VAE_TILING_ABOVE_PIXELS = 1024 * 1024  # smaller outputs always decode whole (a tile would be most of the image)


def vae_tiling_needed(plan: MemoryPlan, width: int, height: int) -> bool:
    """Whether a `width` x `height` output should be decoded in tiles on this plan: on a GPU, above ~1 MP, where
    the untiled decode (est. VAE_DECODE_BYTES_PER_PIXEL) would not fit the activation reserve the plan kept (a plan
    sized for smaller requests than this one, e.g. 24 GB cards: 1024x1024 with one reference). Tiled decoding
    (diffusers' `AutoencoderKLFlux2` tiles with blended overlaps) bounds the decode's memory by the tile; the
    pixels differ slightly at the seams, so it is used only where the whole decode could run out of memory."""
    if not plan.device.startswith("cuda") or plan.reserve_bytes is None or width * height <= VAE_TILING_ABOVE_PIXELS:
        return False
    return VAE_DECODE_BYTES_PER_PIXEL * width * height > plan.reserve_bytes


@dataclass(frozen=True)
class Hardware:
    """What planning needs to know of a machine: detected (`detect`) or described (`simulate`, for doctor)."""

    gpu_free_bytes: tuple[int, ...] = ()  # free bytes on each GPU; empty: no GPU
    host_bytes: int | None = None  # host RAM available to the server; None: unknown (not checked)
    fp8: bool = False  # the GPUs run fp8 matmuls (compute capability >= 8.9)
    simulated: bool = False  # described, not this machine: this machine's CUDA and libraries are not checked

    @classmethod
    def detect(cls, device: str | None = None) -> Hardware:
        gpus = tuple(free_gpu_bytes())
        memory = host_memory()
        return cls(gpus, memory[0] if memory else None, bool(gpus) and fp8_capable(device or "cuda:0"))

    @classmethod
    def simulate(
        cls, gpu_memory_gib: float, gpus: int = 1, host_memory_gib: float | None = None, fp8: bool = True
    ) -> Hardware:
        """`gpus` cards of `gpu_memory_gib` GiB each (less CUDA_CONTEXT_BYTES free), `host_memory_gib` of host RAM."""
        free = int(gpu_memory_gib * GiB) - CUDA_CONTEXT_BYTES
        host = None if host_memory_gib is None else int(host_memory_gib * GiB)
        return cls((free,) * gpus, host, fp8 and gpus > 0, simulated=True)


def host_memory() -> tuple[int, int] | None:
    """(available, total) bytes of system memory, from /proc/meminfo; None where there is none (not Linux)."""
    meminfo = Path("/proc/meminfo")
    if not meminfo.is_file():
        return None
    values = {}
    for line in meminfo.read_text().splitlines():
        name, _, rest = line.partition(":")
        values[name] = int(rest.split()[0]) * 1024
    return values.get("MemAvailable", 0), values.get("MemTotal", 0)


_TRANSFORMER_BLOCK = re.compile(r"^(?:transformer_blocks|single_transformer_blocks)\.")
_TEXT_LAYER = re.compile(r"language_model\.(?:model\.)?layers\.(\d+)\.")
_TEXT_EMBEDDINGS = re.compile(r"language_model\.(?:model\.)?embed_tokens\.")
_LM_HEAD = re.compile(r"(?:^|\.)lm_head\.")


def _sizes(transformer, text_encoder, vae, itemsize: int) -> ComponentSizes:
    """ComponentSizes from (name, number of elements) pairs of each component's tensors."""
    transformer, text_encoder = list(transformer), list(text_encoder)
    layers: dict[int, int] = {}
    for name, n in text_encoder:
        if match := _TEXT_LAYER.search(name):
            layers[int(match.group(1))] = layers.get(int(match.group(1)), 0) + n * itemsize
    return ComponentSizes(
        transformer=sum(n for _, n in transformer) * itemsize,
        text_encoder=sum(n for _, n in text_encoder) * itemsize,
        vae=sum(n for _, n in vae) * itemsize,
        transformer_blocks=sum(n for name, n in transformer if _TRANSFORMER_BLOCK.match(name)) * itemsize,
        text_encoder_layers=tuple(layers[i] for i in sorted(layers)),
        text_encoder_embeddings=sum(n for name, n in text_encoder if _TEXT_EMBEDDINGS.search(name)) * itemsize,
        text_encoder_lm_head=sum(n for name, n in text_encoder if _LM_HEAD.search(name)) * itemsize,
        itemsize=itemsize,
    )


def component_sizes(weights_dir: Path, dtype: torch.dtype) -> ComponentSizes:
    """Weight bytes per component at `dtype`, from the safetensors headers on disk (nothing is loaded)."""
    from safetensors import safe_open

    def tensors(directory: Path) -> Iterator[tuple[str, int]]:
        for path in sorted(directory.glob("*.safetensors")):
            with safe_open(path, framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                    n = 1
                    for dim in f.get_slice(key).get_shape():
                        n *= dim
                    yield key, n

    itemsize = torch.empty((), dtype=dtype).element_size()
    return _sizes(
        tensors(weights_dir / "transformer"),
        tensors(weights_dir / "text_encoder"),
        tensors(weights_dir / "vae"),
        itemsize,
    )


def module_sizes(transformer, text_encoder, vae, dtype: torch.dtype) -> ComponentSizes:
    """The same from loaded (or meta-device) modules: their parameters (a tied head counted once)."""
    itemsize = torch.empty((), dtype=dtype).element_size()

    def tensors(module) -> Iterable[tuple[str, int]]:
        return ((name, p.numel()) for name, p in module.named_parameters())

    return _sizes(tensors(transformer), tensors(text_encoder), tensors(vae), itemsize)


# Planning: each candidate's peaks, and the order `auto` tries them in.


@dataclass(frozen=True)
class Peaks:
    gpu: int  # on the transformer's GPU
    text_encoder_gpu: int  # on the text encoder's GPU (multi-gpu; else 0)
    host: int


def estimate_peaks(plan: MemoryPlan, sizes: ComponentSizes, reserve: int) -> Peaks:
    """Expected peak GPU and host memory of `plan` (est.; the assumptions are the constants above).

    Resident components are read from the files straight onto their GPU (and quantized there), so they take no
    host RAM beyond HOST_BASE_BYTES; a streamed component is held in host RAM and pinned. Plain (unquantized)
    streamed weights are pinned in place before diffusers sets up (`pin_blocks`): once. torchao-quantized ones are
    pinned by diffusers beside the original, up to twice their bytes while loading, unless pinned on the fly
    (`low_cpu_mem_usage`). Model CPU offload keeps every component in host RAM. The text encoder encodes before
    the transformer runs, so their working memory is not added up."""
    t = sizes.transformer_bytes(plan.quantization)
    te = sizes.text_encoder_bytes(plan.text_encoder_quantization, plan.text_encoder_layers)
    te_streamed = sizes.text_encoder_streamed(plan.text_encoder_layers)
    te_working = TEXT_ENCODER_ACTIVATION_BYTES
    te_streaming = sizes.text_encoder_stream_working_set() + te_working

    def copies(quantized: bool) -> int:  # see the docstring: pin_blocks pins plain tensors in place
        return 2 if quantized and not plan.low_cpu_mem_usage else 1

    if plan.device == "cpu":
        return Peaks(0, 0, HOST_BASE_BYTES + t + te + sizes.vae + reserve)
    if plan.mode == "full":
        return Peaks(t + te + sizes.vae + max(reserve, te_working), 0, HOST_BASE_BYTES)
    if plan.mode == "multi-gpu":
        return Peaks(t + sizes.vae + reserve, te + te_working, HOST_BASE_BYTES)
    if plan.mode == "offload-text-encoder":
        gpu = t + sizes.vae + (te - te_streamed) + max(reserve, te_streaming)
        return Peaks(gpu, 0, HOST_BASE_BYTES + copies(plan.text_encoder_quantization != "none") * te_streamed)
    if plan.mode == "model-offload":
        return Peaks(max(t + reserve, te + te_working) + sizes.vae, 0, HOST_BASE_BYTES + t + te)
    if plan.mode == "group-offload":
        rest = sizes.transformer - (sizes.transformer if sizes.transformer_blocks is None else sizes.transformer_blocks)
        blocks = t - rest  # the streamed part
        gpu = rest + (te - te_streamed) + sizes.vae + max(reserve + TRANSFORMER_STREAM_BYTES, te_streaming)
        return Peaks(
            gpu,
            0,
            HOST_BASE_BYTES
            + copies(plan.quantization != "none") * blocks
            + copies(plan.text_encoder_quantization != "none") * te_streamed,
        )
    raise MemoryModeError(f"unknown memory mode {plan.mode!r}")


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


PINNED_ON_THE_FLY = "pinned on the fly (host RAM holds the streamed weights once, not twice; slower transfers)"


def _candidates(quantization: str, fp8: bool, two_gpus: bool) -> Iterator[tuple[MemoryPlan, str]]:
    """The plans `auto` tries, fastest (and least lossy) first, each with why it comes where it does."""
    eight_bit = "fp8" if fp8 else "int8"
    auto = quantization == "auto"
    fast = ["none", eight_bit] if auto else [quantization]
    slow = ["int4"] if auto else []
    cut = FLUX2_TEXT_ENCODER_LAYERS
    encoders = [("none", None), ("none", cut)] + ([(eight_bit, cut)] if auto else [])

    def resident(q: str) -> Iterator[tuple[MemoryPlan, str]]:
        for te_q, layers in encoders:
            yield (
                MemoryPlan("full", "", quantization=q, text_encoder_quantization=te_q, text_encoder_layers=layers),
                "everything resident on one GPU",
            )
            if two_gpus:
                yield (
                    MemoryPlan(
                        "multi-gpu", "", quantization=q, text_encoder_quantization=te_q, text_encoder_layers=layers
                    ),
                    "everything resident, the text encoder on the second GPU",
                )

    def streamed(q: str) -> Iterator[tuple[MemoryPlan, str]]:
        why = "transformer resident, text encoder streamed from host memory every request"
        yield MemoryPlan("offload-text-encoder", "", quantization=q, text_encoder_layers=cut), why
        yield (
            MemoryPlan("offload-text-encoder", "", quantization=q, text_encoder_layers=cut, low_cpu_mem_usage=True),
            f"{why}, {PINNED_ON_THE_FLY}",
        )

    for q in fast:
        yield from resident(q)
    for q in fast:
        yield from streamed(q)
    for q in slow:
        yield from resident(q)
        yield from streamed(q)
    for q in fast:  # never int4: its GPU-packed weights are not moved back to CPU memory (pipelines.quantization)
        yield MemoryPlan("model-offload", "", quantization=q), "each component moved to the GPU whole when used"


def _explain(plan: MemoryPlan, sizes: ComponentSizes, why: str, free: int, skipped: list[str], auto: bool) -> str:
    parts = [why]
    if plan.quantization != "none":
        parts.append(
            f"{plan.quantization} transformer ({_gib(sizes.transformer_bytes(plan.quantization))} instead of "
            f"{_gib(sizes.transformer)}): " + ("no less quantized plan fits" if auto else "set by configuration")
        )
    if plan.text_encoder_layers is not None:
        parts.append(
            f"text encoder cut to {plan.text_encoder_layers} decoder layers without lm_head (bit-exact prompt embeddings)"
        )
    if plan.text_encoder_quantization != "none":
        parts.append(f"text encoder {plan.text_encoder_quantization} weight-only, rather than streamed every request")
    if plan.mode in STREAMED_TEXT_ENCODER_MODES:
        parts.append("no prompt expansion (it would stream the encoder for every generated token)")
    elif plan.text_encoder_layers is not None:
        parts.append("no prompt expansion (it needs the whole encoder)")
    parts.append(f"peak {_gib(plan.peak_gpu_bytes or 0)} of {_gib(free)} free, host {_gib(plan.peak_host_bytes or 0)}")
    parts.extend(dict.fromkeys(skipped))  # each tier tries the same plans again: say it once
    return "; ".join(parts)


def _finish(plan: MemoryPlan, sizes: ComponentSizes, reserve: int, request: str, **changes) -> MemoryPlan:
    """`plan` with its peaks, reserve and prompt expansion filled in."""
    plan = replace(plan, **changes)
    peaks = estimate_peaks(plan, sizes, reserve)
    return replace(
        plan,
        prompt_expansion=plan.text_encoder_layers is None and plan.mode not in STREAMED_TEXT_ENCODER_MODES,
        peak_gpu_bytes=peaks.gpu if plan.device != "cpu" else None,
        peak_host_bytes=peaks.host,
        reserve_bytes=reserve,
        sized_for=request,
    )


def choose_memory_mode(
    free_bytes_per_gpu: list[int],
    sizes: ComponentSizes,
    reserve_bytes: int | None = None,
    quantization: str = "auto",
    fp8_capable: bool = False,
    primary: int | None = None,
    host_bytes: int | None = None,
    only_mode: str | None = None,
    text_encoder_gpu: int | None = None,
) -> MemoryPlan:
    """The fastest plan whose peaks fit the GPUs and the host RAM (see the module docstring for the order).

    `quantization` fixes the transformer's (`none`, `int8`, `fp8`, `int4`; the text encoder is then not
    quantized) or is `auto`. `reserve_bytes` fixes the activation reserve; None sizes it by request
    (PLANNED_REQUESTS). The transformer goes on `primary` (a GPU index) when given, else on the GPU with the most
    free memory; the text encoder (multi-gpu) on `text_encoder_gpu` when given, else on the emptiest other GPU.
    `only_mode` keeps to one memory mode (a configured one). Raises MemoryModeError when no plan fits, saying
    what is missing."""
    if quantization != "auto" and quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)} or auto, got {quantization!r}")
    fixed = reserve_bytes is not None
    tiers: list[tuple[int, str]] = (
        [(reserve_bytes, f"a fixed reserve of {_gib(reserve_bytes)}")]
        if reserve_bytes is not None
        else [(activation_reserve_bytes(r, sizes), r.describe()) for r in PLANNED_REQUESTS]
    )

    def host_ok(plan: MemoryPlan) -> bool:
        return host_bytes is None or (plan.peak_host_bytes or 0) <= host_bytes

    if not free_bytes_per_gpu:
        reserve, request = tiers[0]
        q = "none" if quantization == "auto" else quantization
        plan = _finish(MemoryPlan("full", "cpu", quantization=q), sizes, reserve, request)
        if not host_ok(plan):
            raise MemoryModeError(
                f"no GPU, and the weights need {_gib(plan.peak_host_bytes or 0)} of host RAM on the CPU; "
                f"{_gib(host_bytes or 0)} available"
            )
        return replace(plan, reason=f"no GPU: everything on the CPU (host peak {_gib(plan.peak_host_bytes or 0)})")

    gpu = primary if primary is not None else max(range(len(free_bytes_per_gpu)), key=lambda i: free_bytes_per_gpu[i])
    free = free_bytes_per_gpu[gpu]
    others = [i for i in range(len(free_bytes_per_gpu)) if i != gpu]
    second = max(others, key=lambda i: free_bytes_per_gpu[i]) if others else None
    if text_encoder_gpu is not None:
        second = text_encoder_gpu
    device, te_device = f"cuda:{gpu}", None if second is None else f"cuda:{second}"

    skipped: list[str] = []
    for reserve, request in tiers:
        for candidate, why in _candidates(quantization, fp8_capable, second is not None):
            if only_mode is not None and candidate.mode != only_mode:
                continue
            plan = _finish(
                candidate,
                sizes,
                reserve,
                request,
                device=device,
                text_encoder_device=te_device if candidate.mode == "multi-gpu" else None,
            )
            peaks = estimate_peaks(plan, sizes, reserve)
            if peaks.gpu > free or (second is not None and peaks.text_encoder_gpu > free_bytes_per_gpu[second]):
                continue
            if not host_ok(plan):
                note = f"{why} ({plan.quantization} transformer) needs {_gib(peaks.host)} of host RAM"
                skipped.append(f"skipped {note}, {_gib(host_bytes or 0)} available")
                continue
            sized = "" if fixed or request == tiers[0][1] else f" (sized for {request}: larger requests may not fit)"
            return replace(plan, reason=_explain(plan, sizes, why + sized, free, skipped, quantization == "auto"))

    # Last: the transformer streamed every step, for the largest request that fits. Under `auto` its weights stay
    # plain (quantized tensors have not been run through group offloading's streams).
    if only_mode not in (None, "group-offload"):
        raise MemoryModeError(
            f"memory mode {only_mode!r} does not fit on {device} ({_gib(free)} free) with any quantization"
        )
    q = "none" if quantization == "auto" else quantization
    why = f"the transformer does not fit on {device} ({_gib(free)} free): streamed block by block every step (slow)"
    for low_cpu_mem_usage in (False, True):
        for reserve, request in tiers:
            plan = _finish(
                MemoryPlan(
                    "group-offload",
                    device,
                    quantization=q,
                    text_encoder_layers=FLUX2_TEXT_ENCODER_LAYERS,
                    low_cpu_mem_usage=low_cpu_mem_usage,
                ),
                sizes,
                reserve,
                request,
            )
            if (plan.peak_gpu_bytes or 0) <= free:
                break
        else:
            raise MemoryModeError(
                f"{device} has {_gib(free)} free; even streaming every component needs "
                f"{_gib(plan.peak_gpu_bytes or 0)} (for {request})"
            )
        if host_ok(plan):
            if low_cpu_mem_usage:
                why += f", {PINNED_ON_THE_FLY}"
            return replace(plan, reason=_explain(plan, sizes, why, free, skipped, quantization == "auto"))
    raise MemoryModeError(
        f"not enough host RAM: the transformer does not fit on {device} ({_gib(free)} free), and streaming it "
        f"needs {_gib(plan.peak_host_bytes or 0)} of host RAM even pinned on the fly; {_gib(host_bytes or 0)} "
        "available" + "".join(f"; {note}" for note in dict.fromkeys(skipped))
    )


def free_gpu_bytes() -> list[int]:
    """Free bytes on each visible CUDA device (empty without CUDA)."""
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]


def check_plan(plan: MemoryPlan, hardware: Hardware | None = None) -> None:
    """Refuse, plainly, a plan this machine cannot run (raised at start-up, before any weight is loaded).

    With simulated `hardware` (doctor), its GPUs and fp8 support stand in for this machine's, and the libraries
    installed here are not checked."""
    if plan.mode not in MODES:
        raise MemoryModeError(f"unknown memory mode {plan.mode!r}: use one of auto, {', '.join(MODES)}")
    if plan.quantization not in QUANTIZATIONS:
        raise MemoryModeError(f"unknown quantization {plan.quantization!r}: use one of {', '.join(QUANTIZATIONS)}")
    if plan.text_encoder_quantization not in TEXT_ENCODER_QUANTIZATIONS:
        raise MemoryModeError(
            f"unknown text encoder quantization {plan.text_encoder_quantization!r}: use one of "
            f"{', '.join(TEXT_ENCODER_QUANTIZATIONS)}"
        )
    simulated = hardware is not None and hardware.simulated
    if hardware is not None and hardware.simulated:
        gpus, here = len(hardware.gpu_free_bytes), "on this hardware"
    else:
        gpus, here = (torch.cuda.device_count() if torch.cuda.is_available() else 0), "on this machine"
    on_cuda = plan.device.startswith("cuda")
    if on_cuda and not gpus:
        raise MemoryModeError(f"device {plan.device} was asked for, but CUDA is not available {here}")
    if plan.mode != "full" and not on_cuda:
        raise MemoryModeError(
            f"memory mode {plan.mode!r} needs a CUDA GPU (it moves weights between CPU and GPU memory); this "
            "server runs on the CPU, where everything is in one memory: use FLUX2_MEMORY_MODE=full (or auto)"
        )
    for name, device in (("device", plan.device), ("text encoder device", plan.text_encoder_device)):
        if device and device.startswith("cuda") and (torch.device(device).index or 0) >= gpus:
            raise MemoryModeError(f"{name} {device} does not exist: {gpus} GPU(s)")
    if plan.mode == "multi-gpu" and (not plan.text_encoder_device or not plan.text_encoder_device.startswith("cuda")):
        raise MemoryModeError("memory mode 'multi-gpu' needs FLUX2_TEXT_ENCODER_DEVICE, e.g. cuda:1")
    fp8 = hardware.fp8 if hardware is not None and hardware.simulated else fp8_capable(plan.device)
    if plan.text_encoder_quantization == "fp8" and not fp8:
        raise MemoryModeError(
            "fp8 quantization needs an NVIDIA GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell)"
        )
    # pipelines.quantization: format x device x mode x dtype (torchao's presence only where this is the machine)
    check_quantization(plan, fp8_ok=fp8, need_torchao=not simulated)


STREAMED_TEXT_ENCODER = ("offload-text-encoder", "group-offload")  # modes that stream the text encoder's layers


def load_devices(plan: MemoryPlan) -> dict[str, str]:
    """Where each component is read to from disk: straight to its device where the plan keeps it resident there
    (nothing built in CPU RAM and then moved), else the CPU (streamed or CPU-offloaded components; and a component
    to be quantized, which `quantize_transformer` moves to the device layer by layer as it quantizes)."""
    resident_transformer = plan.mode in ("full", "multi-gpu", "offload-text-encoder")
    text_encoder_home = {"full": plan.device, "multi-gpu": plan.text_encoder_device}.get(plan.mode)
    return {
        "transformer": plan.device if resident_transformer and plan.quantization == "none" else "cpu",
        "text_encoder": text_encoder_home if text_encoder_home and plan.text_encoder_quantization == "none" else "cpu",
        "vae": "cpu" if plan.mode == "model-offload" else plan.device,
    }


def use_streams(device: torch.device) -> bool:
    """Whether streamed modes copy weights on a side stream (CUDA) or synchronously (elsewhere: the CPU tests).

    tests/emulated_streams.py answers True here on the CPU, to run diffusers' stream code path without a GPU."""
    return device.type == "cuda"


def apply_memory_plan(pipe, plan: MemoryPlan) -> None:
    """Place the pipeline's components as `plan` says (quantizing the transformer first, if asked).

    Works with any devices, the CPU included: the offload modes' hooks then move weights between CPU and CPU,
    which is how the tests run their mechanics on a machine without a GPU (`check_plan` refuses them for the
    server there). CUDA streams are used where the compute device is a GPU (`use_streams`).
    """
    device = torch.device(plan.device)
    stream = use_streams(device)
    quantize_transformer(pipe.transformer, plan.quantization, quantization_device(plan, "transformer"))
    quantize_text_encoder(pipe.text_encoder, plan.text_encoder_quantization, quantization_device(plan, "text_encoder"))

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
        stream_text_encoder(pipe.text_encoder, device, stream, plan.low_cpu_mem_usage)
    elif plan.mode == "model-offload":
        pipe.enable_model_cpu_offload(device=device)
    elif plan.mode == "group-offload":
        pipe.vae.to(device)
        if stream:
            pin_blocks(pipe.transformer)
        pipe.transformer.enable_group_offload(
            onload_device=device,
            offload_device=torch.device("cpu"),
            offload_type="block_level",
            num_blocks_per_group=1,
            use_stream=stream,
            low_cpu_mem_usage=plan.low_cpu_mem_usage,
        )
        stream_text_encoder(pipe.text_encoder, device, stream, plan.low_cpu_mem_usage)
    else:
        raise MemoryModeError(f"unknown memory mode {plan.mode!r}")


def stream_text_encoder(text_encoder, device: torch.device, stream: bool, low_cpu_mem_usage: bool = False) -> None:
    """Stream the text encoder's decoder layers from CPU memory, one at a time; keep everything else on `device`.

    Only `text_encoder.model.language_model` is group offloaded: its `layers` are the blocks (one group each, the
    next one prefetched on a side stream while the current one runs); its embedding and final norm form the group
    diffusers moves on every call. The vision tower, the projector and `lm_head` (when kept) stay resident.

    Group offloading the whole encoder with `block_modules=["model", "language_model"]` (diffusers' nested form)
    works without streams only: with streams diffusers puts a lazy-prefetch hook on each level that has modules of
    its own, and the outer one re-registers `layer_execution_tracker` on the layers the inner one tracks
    (`ValueError: Hook with name layer_execution_tracker already exists`; tests/test_offload_streams.py).
    """
    from diffusers.hooks import apply_group_offloading

    language_model = text_encoder.model.language_model
    _place_all_but(text_encoder, language_model, device)
    if stream and not low_cpu_mem_usage:
        pin_blocks(language_model)
    apply_group_offloading(
        language_model,
        onload_device=device,
        offload_device=torch.device("cpu"),
        offload_type="block_level",
        num_blocks_per_group=1,
        use_stream=stream,
        low_cpu_mem_usage=low_cpu_mem_usage,
    )


def _place_all_but(root: torch.nn.Module, kept: torch.nn.Module, device: torch.device) -> None:
    """Move every submodule of `root` to `device` except `kept` (and `root`'s own tensors: Mistral3 has none)."""
    for child in root.children():
        if child is kept:
            continue
        if any(m is kept for m in child.modules()):
            _place_all_but(child, kept, device)
        else:
            child.to(device)


def pin_blocks(module: torch.nn.Module) -> None:
    """Move the tensors diffusers will stream (the blocks: `module`'s ModuleList/Sequential children) into pinned
    host memory, one tensor at a time, before group offloading is applied.

    diffusers' streamed `ModuleGroup` pins a copy of each streamed tensor while the pageable original is still
    referenced, for every group of a module before any is offloaded: transiently 2x the streamed weights in host
    RAM (~209 GiB for a bf16 group offload of FLUX.2 [dev]). Pinned here first, each original is freed as soon as
    its copy exists, and diffusers then finds every tensor already pinned and keeps it as is (`pin_memory` returns
    a pinned tensor itself): the peak is the weights once plus one tensor. torchao-quantized tensors are left to
    diffusers (their `.data` is not the whole tensor).
    """
    for child in module.children():
        if not isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential)):
            continue
        for block in child:
            for tensor in [*block.parameters(), *block.buffers()]:
                if type(tensor.data) is torch.Tensor and tensor.device.type == "cpu" and not tensor.is_pinned():
                    tensor.data = tensor.data.pin_memory()


def resolve_plan(
    mode: str,
    sizes: ComponentSizes,
    device: str | None = None,
    text_encoder_device: str | None = None,
    quantization: str = "none",
    reserve_bytes: int | None = None,
    free_bytes_per_gpu: list[int] | None = None,
    hardware: Hardware | None = None,
) -> MemoryPlan:
    """The plan for a configured mode (`auto` asks `choose_memory_mode`), checked against this machine (or against
    `hardware`, e.g. simulated by doctor). `reserve_bytes` None: sized by request (`activation_reserve_bytes`)."""
    if hardware is None:
        free = free_gpu_bytes() if free_bytes_per_gpu is None else list(free_bytes_per_gpu)
        memory = host_memory()
        hardware = Hardware(tuple(free), memory[0] if memory else None, bool(free) and fp8_capable(device or "cuda:0"))
    free = [] if device == "cpu" else list(hardware.gpu_free_bytes)
    primary = (torch.device(device).index or 0) if device and device.startswith("cuda") else None
    if mode == "auto":
        plan = choose_memory_mode(
            free, sizes, reserve_bytes, quantization, hardware.fp8, primary=primary, host_bytes=hardware.host_bytes
        )
        if text_encoder_device and plan.mode in ("full", "offload-text-encoder") and free:
            resident = plan.mode == "full"
            plan = _finish(
                plan,
                sizes,
                plan.reserve_bytes or 0,
                plan.sized_for,
                mode="multi-gpu",
                text_encoder_device=text_encoder_device,
                text_encoder_quantization=plan.text_encoder_quantization if resident else "none",
                text_encoder_layers=plan.text_encoder_layers if resident else None,
                reason=f"text encoder placed on {text_encoder_device} by configuration",
            )
    else:
        streamed = mode in STREAMED_TEXT_ENCODER_MODES
        plan = MemoryPlan(
            mode,
            device or ("cuda:0" if free else "cpu"),
            text_encoder_device if mode == "multi-gpu" else None,
            "none" if quantization == "auto" else quantization,
            reason="set by configuration",
            text_encoder_layers=FLUX2_TEXT_ENCODER_LAYERS if streamed else None,  # exact, and 22 % less to stream
        )
        check_plan(plan, hardware)
        request = PLANNED_REQUESTS[0]
        plan = _finish(
            plan,
            sizes,
            reserve_bytes if reserve_bytes is not None else activation_reserve_bytes(request, sizes),
            f"a fixed reserve of {_gib(reserve_bytes)}" if reserve_bytes is not None else request.describe(),
        )
        if quantization == "auto" and free:  # the least quantization that fits this mode, as auto would pick it
            te_gpu = (torch.device(plan.text_encoder_device).index or 0) if plan.text_encoder_device else None
            try:
                chosen = choose_memory_mode(
                    free,
                    sizes,
                    reserve_bytes,
                    "auto",
                    hardware.fp8,
                    primary=torch.device(plan.device).index or 0,
                    host_bytes=hardware.host_bytes,
                    only_mode=mode,
                    text_encoder_gpu=te_gpu,
                )
                plan = replace(chosen, reason=f"set by configuration, quantization auto: {chosen.reason}")
            except MemoryModeError:
                pass  # nothing fits: the plain plan (a configured mode is the operator's call), checked below
        streams = plan.mode in STREAMED_TEXT_ENCODER_MODES
        if streams and not plan.low_cpu_mem_usage and _over_host(plan, hardware):
            on_the_fly = _finish(plan, sizes, plan.reserve_bytes or 0, plan.sized_for, low_cpu_mem_usage=True)
            plan = replace(on_the_fly, reason=f"{plan.reason}; streamed weights {PINNED_ON_THE_FLY}")
        if _over_host(plan, hardware):
            raise MemoryModeError(
                f"not enough host RAM for memory mode {mode!r}: it needs {_gib(plan.peak_host_bytes or 0)}"
                + (" even with the streamed weights pinned on the fly" if streams else "")
                + f", {_gib(hardware.host_bytes or 0)} available"
            )
    check_plan(plan, hardware)
    log.info(
        "memory mode %s on %s (quantization %s, text encoder %s, %s layers): %s",
        plan.mode,
        plan.device,
        plan.quantization,
        plan.text_encoder_quantization,
        plan.text_encoder_layers or "all",
        plan.reason,
    )
    return plan


def _over_host(plan: MemoryPlan, hardware: Hardware) -> bool:
    return hardware.host_bytes is not None and (plan.peak_host_bytes or 0) > hardware.host_bytes


def describe_sizes(sizes: ComponentSizes) -> dict:
    described = {"transformer": sizes.transformer, "text_encoder": sizes.text_encoder, "vae": sizes.vae}
    if sizes.text_encoder_layers:
        described["text_encoder_truncated"] = sizes.text_encoder_truncated
    return {k: round(v / GiB, 3) for k, v in described.items()} | {"total": round(sizes.total / GiB, 3)}


def describe_plan(plan: MemoryPlan, sizes: ComponentSizes) -> dict:
    """The plan in GiB, with each GPU's expected peak (doctor --json, README's table)."""
    peaks = estimate_peaks(plan, sizes, plan.reserve_bytes or 0)

    def gib(n: int | None) -> float | None:
        return None if n is None else round(n / GiB, 1)

    described = {k: v for k, v in plan.describe().items() if not k.endswith("_bytes")}
    return described | {
        "transformer_gib": gib(sizes.transformer_bytes(plan.quantization)),
        "text_encoder_gib": gib(sizes.text_encoder_bytes(plan.text_encoder_quantization, plan.text_encoder_layers)),
        "peak_gpu_gib": gib(plan.peak_gpu_bytes),
        "peak_text_encoder_gpu_gib": gib(peaks.text_encoder_gpu) if plan.mode == "multi-gpu" else None,
        "peak_host_gib": gib(plan.peak_host_bytes),
        "reserve_gib": gib(plan.reserve_bytes),
    }


def describe_hardware(hardware: Hardware) -> dict:
    return {
        "simulated": hardware.simulated,
        "gpus": len(hardware.gpu_free_bytes),
        "gpu_free_gib": [round(n / GiB, 1) for n in hardware.gpu_free_bytes],
        "host_available_gib": None if hardware.host_bytes is None else round(hardware.host_bytes / GiB, 1),
        "fp8": hardware.fp8,
    }


# README's "Plans by card" table: what `auto` picks for FLUX.2 [dev] per card class (tests/test_memory.py checks that
# README shows exactly this; `python -c "from pipelines.memory import card_table; print(card_table())"` prints it).
CARD_CLASSES_GIB = (24, 48, 80, 94, 141)
HOST_CLASSES_GIB = (64, 128, 256)


def _plan_cells(hardware: Hardware, sizes: ComponentSizes) -> tuple[str, ...]:
    try:
        plan = resolve_plan("auto", sizes, quantization="auto", hardware=hardware)
    except MemoryModeError as exc:
        return (f"refused: {str(exc).split(':')[0]}", "–", "–", "–", "–", "–")
    cut = f", {plan.text_encoder_layers} layers, no lm_head" if plan.text_encoder_layers is not None else ""
    te_q = "bf16" if plan.text_encoder_quantization == "none" else plan.text_encoder_quantization
    where = {"multi-gpu": ", on GPU 2", "offload-text-encoder": ", streamed", "group-offload": ", streamed"}
    if plan.low_cpu_mem_usage:
        where = {k: f"{v} (pinned on the fly)" for k, v in where.items()}
    transformer = "bf16" if plan.quantization == "none" else plan.quantization
    if plan.mode == "group-offload":
        transformer += " streamed"
    peaks = estimate_peaks(plan, sizes, plan.reserve_bytes or 0)
    gpu = f"{(plan.peak_gpu_bytes or 0) / GiB:.1f}" + (
        f" + {peaks.text_encoder_gpu / GiB:.1f}" if peaks.text_encoder_gpu else ""
    )
    return (
        plan.mode,
        transformer,
        f"{te_q}{cut}{where.get(plan.mode, '')}",
        gpu,
        f"{(plan.peak_host_bytes or 0) / GiB:.1f}",
        plan.sized_for,
    )


def card_table(sizes: ComponentSizes | None = None) -> str:
    """A markdown table of the plan `auto` picks per card class, GPU count and host RAM (rows that differ only in
    host RAM are merged; fp8 shown as "fp8/int8" where a GPU without fp8 gets the same plan in int8)."""
    sizes = sizes or flux2_dev_sizes()
    lines = [
        "| GPUs | host RAM | mode | transformer | text encoder | peak GPU GiB | peak host GiB | sized for |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for gpus in (1, 2):
        for card in CARD_CLASSES_GIB:
            rows: list[tuple[list[int], tuple[str, ...]]] = []
            for host in HOST_CLASSES_GIB:
                with_fp8 = _plan_cells(Hardware.simulate(card, gpus, host, fp8=True), sizes)
                without = _plan_cells(Hardware.simulate(card, gpus, host, fp8=False), sizes)
                cells = tuple(
                    a if a == b else a.replace("fp8", "fp8/int8") for a, b in zip(with_fp8, without, strict=True)
                )
                if rows and rows[-1][1] == cells:
                    rows[-1][0].append(host)
                else:
                    rows.append(([host], cells))
            for hosts, cells in rows:
                if len(hosts) == len(HOST_CLASSES_GIB):
                    host_label = "any"
                elif hosts[-1] == HOST_CLASSES_GIB[-1]:
                    host_label = f"≥ {hosts[0]} GB"
                else:
                    host_label = " / ".join(f"{h} GB" for h in hosts)
                lines.append(f"| {gpus} × {card} GB | {host_label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
