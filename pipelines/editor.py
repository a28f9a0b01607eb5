"""One FLUX.2 [dev] model, loaded once from a local diffusers directory, running edit calls for every profile.

An edit call with reference images edits them; one without any is text to image (Flux2Pipeline called without
`image`: no reference latents, only the prompt conditions the output).

This is the only module that talks to diffusers. It never reaches a hub: components load with
`local_files_only=True` from the directory it is given (real weights or the tiny model, same code).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import PIL.Image
import torch

from pipelines.adapters import AdapterSwitch, fuse_adapter, load_adapters
from pipelines.capabilities import Capabilities, ProfileCapabilities
from pipelines.expansion import expand_prompt
from pipelines.loras import LoraCache, LoraFile
from pipelines.memory import STREAMED_TEXT_ENCODER, MemoryPlan, load_devices, vae_tiling_needed
from pipelines.pixtral import pixtral_processor_class
from pipelines.profiles import PROFILES
from pipelines.runtime import Runtime, RuntimeOptions, plan_runtime
from pipelines.safety import DEFAULT_THRESHOLD, SafetyChecker, withheld
from pipelines.text_encoder import is_truncated, load_text_encoder
from weights.layout import ADAPTERS

log = logging.getLogger(__name__)

StepCallback = Callable[[int, int], None]  # (step done, 1-based; total steps)
IMAGE_PROCESSOR_CONFIG = "preprocessor_config.json"  # beside the tokenizer when tokenizer/ is a full processor


class Cancelled(Exception):
    """Raised out of the denoising loop when `EditCall.should_cancel` says so; the model is free again."""


@dataclass
class EditCall:
    """One request to the model, in model terms (already validated and decoded by the caller)."""

    images: list[PIL.Image.Image]  # 0-4 RGB reference images (none: text to image)
    prompt: str
    width: int
    height: int
    profile: str = "edit"
    num_inference_steps: int | None = None  # only the `edit` profile takes it
    guidance_scale: float = 2.5
    seed: int = 0
    num_images: int = 1
    on_step: StepCallback | None = None
    should_cancel: Callable[[], bool] | None = None  # polled after every step
    expand_prompt: bool = False  # let the text encoder rewrite the prompt first (pipelines.expansion)
    on_message: Callable[[str], None] | None = None  # what the model did that the caller should log
    check_safety: bool = False  # run the safety checker on each output (needs one loaded)
    acceleration: str = "none"  # none | regular | high: a cache on the transformer (pipelines.acceleration)
    loras: tuple[LoraFile, ...] = ()  # LoRAs to run with, at their scales (base profile only; pipelines.loras)


@dataclass
class EditResult:
    images: list[PIL.Image.Image]
    steps: int  # denoising steps actually run
    prompt: str  # the prompt the images were generated from (the expanded one when expansion ran)
    timings: dict[str, float] = field(default_factory=dict)
    notices: list[str] = field(default_factory=list)  # what was asked and done differently, in plain words
    has_nsfw_concepts: list[bool] | None = None  # the safety checker's verdicts; None when it did not run
    loras_loaded: int = 0  # LoRA files this call loaded into the transformer (the others were loaded already)


def pick_device(requested: str | None = None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(device: torch.device, requested: str | None = None) -> torch.dtype:
    if requested:
        return getattr(torch, requested)
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_tokenizer(directory: Path):
    """The `tokenizer` component: transformers' PixtralProcessor (tokenizer + Pixtral image processor).

    One code path on CPU and GPU: `PixtralProcessor.from_pretrained` (see `pipelines.pixtral` for how it is
    imported without torchvision). A directory saved as the tokenizer alone (some diffusers exports) has no
    image processor configuration; it loads as that tokenizer, which encodes prompts to the same token ids, and
    prompt expansion (which shows the reference images to the text encoder) is reported unavailable.
    """
    if (directory / IMAGE_PROCESSOR_CONFIG).is_file():
        return pixtral_processor_class().from_pretrained(directory, local_files_only=True)
    from transformers import AutoTokenizer

    log.warning("%s has no %s: loading its tokenizer alone (no prompt expansion)", directory, IMAGE_PROCESSOR_CONFIG)
    return AutoTokenizer.from_pretrained(directory, local_files_only=True)


class Flux2Editor:
    """Holds a loaded `Flux2Pipeline` and runs `EditCall`s on it. Not thread-safe: one caller at a time."""

    def __init__(
        self,
        pipe,
        weights_dir: Path,
        load_seconds: float,
        runtime: Runtime,
        adapters: dict[str, Path] | None = None,
        safety: SafetyChecker | None = None,
        fused_adapter: str | None = None,
        load_timings: dict[str, float] | None = None,
    ):
        self.pipe = pipe
        self.safety = safety
        self.weights_dir = weights_dir
        self.load_seconds = load_seconds  # read + place (warm_up is added once it has run)
        self.load_timings = dict(load_timings or {})  # read, place, warm_up (seconds)
        self.adapters = AdapterSwitch(pipe, adapters or {}, fused_adapter)
        self.runtime = runtime  # memory mode, fast path, acceleration levels (pipelines.runtime)
        self.loras = LoraCache(pipe, runtime.options.max_loaded_loras)  # request LoRAs, loaded by content
        self.device = pipe._execution_device
        self.dtype = pipe.transformer.dtype
        self._capabilities = self._describe()

    @property
    def size_multiple(self) -> int:
        """Output width and height are produced in multiples of this many pixels (VAE 8x, then 2x2 patches)."""
        return self.pipe.vae_scale_factor * 2

    def reference_problem(self, image: PIL.Image.Image) -> str | None:
        """Why Flux2Pipeline would refuse this reference image (too small, too elongated), or None."""
        try:
            self.pipe.image_processor.check_image_input(image)
        except ValueError as exc:
            return f"Reference image refused: {exc}"
        return None

    def capabilities(self) -> Capabilities:
        """What this loaded model can and can't do, stated plainly for /health and for response notices."""
        return self._capabilities

    def _describe(self) -> Capabilities:
        expansion_problem = self._prompt_expansion_problem()
        return Capabilities(
            device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
            weights=str(self.weights_dir),
            load_seconds=round(self.load_seconds + self.load_timings.get("warm_up", 0.0), 3),
            load_timings={name: round(seconds, 3) for name, seconds in self.load_timings.items()},
            profiles={
                name: ProfileCapabilities(
                    steps=len(p.sigmas) if p.sigmas else "4-50 (default 28)",
                    sigmas=list(p.sigmas) if p.sigmas else None,
                    distilled_adapter=p.adapter,
                    distilled_adapter_file=str(ADAPTERS[p.adapter].path(self.weights_dir)) if p.adapter else None,
                    distilled_adapter_loaded=p.adapter in self.adapters.loaded,
                    # False where another adapter is fused into the weights (pipelines.adapters.fuse_adapter)
                    runs_here=self.adapters.fused is None or p.adapter == self.adapters.fused,
                )
                for name, p in PROFILES.items()
            },
            fused_adapter=self.adapters.fused,
            acceleration=self.runtime.accelerator.describe(),
            runtime=self.runtime.describe(),
            loras=self.loras.describe(),
            safety_checker=self.safety is not None,
            safety_checker_model=str(self.safety.directory) if self.safety else None,
            safety_threshold=self.safety.threshold if self.safety else None,
            prompt_expansion=expansion_problem is None,
            prompt_expansion_unavailable=expansion_problem,
        )

    def _prompt_expansion_problem(self) -> str | None:
        """Why this loaded model can't expand prompts (None when it can)."""
        plan = self.runtime.plan
        if not hasattr(self.pipe.tokenizer, "image_processor"):
            return "the tokenizer was saved without its image processor, so the text encoder can't see the images"
        if plan.mode in STREAMED_TEXT_ENCODER:
            return (
                f"the text encoder is streamed from CPU memory layer by layer (memory mode {plan.mode}): every "
                "generated token would stream all of it again, minutes per request"
            )
        if is_truncated(self.pipe.text_encoder):
            return (
                f"the text encoder is cut to the {plan.text_encoder_layers} layers prompt encoding reads, without "
                "lm_head, to save memory; writing text needs the whole encoder"
            )
        if not plan.prompt_expansion:
            return f"the memory plan leaves it out: {plan.reason}"
        return None

    def warm_up(self) -> None:
        """Calls at the configured warm-up cases (pipelines.fastpath: one and four references, and each distilled
        adapter, by default), so that compilation happens at start-up rather than in a request; their times are
        reported per case."""

        def run(case) -> None:
            reference = PIL.Image.new("RGB", (case.size, case.size), (128, 128, 128))
            steps = None if case.profile != "edit" else (12 if case.acceleration != "none" else 4)
            images = [reference] * case.references
            self.edit(
                EditCall(images, "warm-up", case.size, case.size, case.profile, steps, acceleration=case.acceleration)
            )

        unfused = {} if self.adapters.fused else {p.adapter: name for name, p in PROFILES.items() if p.adapter}
        self.runtime.warm_up(run, tuple(name for adapter, name in unfused.items() if adapter in self.adapters.loaded))
        self.load_timings["warm_up"] = self.runtime.compile_seconds
        self._capabilities = self._describe()
        log.info("warm-up with the compiled transformer: %.1f s in all", self.runtime.compile_seconds)

    def edit(self, call: EditCall) -> EditResult:
        profile = PROFILES[call.profile]
        steps, sigmas = profile.schedule(call.num_inference_steps)
        if len(call.images) > 4:
            raise ValueError(f"at most 4 reference images are taken, got {len(call.images)}")

        # Flux2Pipeline floors sizes to the model's multiple; generate at the next multiple up and centre-crop,
        # so the caller gets exactly the size it asked for.
        m = self.size_multiple
        gen_w, gen_h = math.ceil(call.width / m) * m, math.ceil(call.height / m) * m

        def on_step_end(pipe, i, t, callback_kwargs):
            if call.on_step is not None:
                call.on_step(i + 1, steps)
            if call.should_cancel is not None and call.should_cancel():
                raise Cancelled(f"cancelled after step {i + 1}/{steps}")
            return {}

        if call.acceleration != "none" and call.profile != "edit":
            raise ValueError(f"acceleration applies to the base edit profile only, not {call.profile!r}")
        started = time.perf_counter()
        prompt, notices, timings = call.prompt, [], {}
        if call.expand_prompt and self._capabilities.prompt_expansion:
            prompt = expand_prompt(self.pipe, call.prompt, call.images, call.seed)
            timings["prompt_expansion"] = time.perf_counter() - started
            if prompt:
                say(call, f"prompt expanded to: {prompt!r}")
            else:
                prompt = call.prompt
                notices.append("Prompt expansion produced no text: the prompt was used as given.")
                say(call, "prompt expansion produced no text: using the prompt as given")
        # The profile's distilled adapter when loaded, else the base weights (the server decides whether a
        # distilled profile may run undistilled; see server.service.edit); or the request's LoRAs.
        loras, loras_loaded = self._prepare_loras(call, timings)
        self.adapters.use(profile.adapter if profile.adapter in self.adapters.loaded else None, loras)
        if call.acceleration != "none" and self.runtime.accelerator.skipped_steps(call.acceleration, steps) == []:
            notices.append(
                f"Acceleration {call.acceleration!r} skips no step of a {steps}-step run: the image was generated "
                "without acceleration."
            )
        denoising = time.perf_counter()
        tiled = vae_tiling_needed(self.runtime.plan, gen_w, gen_h)
        if tiled:
            say(call, f"decoding the {gen_w}x{gen_h} output in tiles: this memory plan's reserve is for smaller ones")
        with (
            self.runtime.accelerator.applied(self.pipe.transformer, call.acceleration, steps),
            vae_tiling(self.pipe.vae, tiled),
        ):
            output = self.pipe(
                image=call.images or None,  # none: text to image
                prompt=prompt,
                height=gen_h,
                width=gen_w,
                num_inference_steps=steps,
                sigmas=sigmas,
                guidance_scale=call.guidance_scale,
                num_images_per_prompt=call.num_images,
                generator=torch.Generator("cpu").manual_seed(call.seed),
                callback_on_step_end=on_step_end,
                output_type="pil",
            )
        timings["inference"] = time.perf_counter() - denoising
        images = [center_crop(img, call.width, call.height) for img in output.images]
        verdicts = None
        if call.check_safety:
            if self.safety is None:
                raise RuntimeError("the safety checker was asked for, and none is loaded")
            checking = time.perf_counter()
            verdicts, probabilities = self.safety.verdicts(images)
            timings["safety_checker"] = time.perf_counter() - checking
            for index, (flagged, p) in enumerate(zip(verdicts, probabilities)):
                verdict = "flagged NSFW, withheld" if flagged else "ok"
                say(
                    call,
                    f"safety checker: image {index}: P(nsfw) = {p:.6f}, threshold {self.safety.threshold}: {verdict}",
                )
                if flagged:
                    log.warning("image %d flagged NSFW (P = %.6f): withheld (black image of the same size)", index, p)
                    images[index] = withheld(images[index])
                    notices.append(
                        f"Image {index + 1} was flagged by the safety checker and withheld: it is a black image."
                    )
        return EditResult(
            images=images,
            steps=steps,
            prompt=prompt,
            timings=timings,
            notices=notices,
            has_nsfw_concepts=verdicts,
            loras_loaded=loras_loaded,
        )

    def _prepare_loras(self, call: EditCall, timings: dict[str, float]) -> tuple[tuple[tuple[str, float], ...], int]:
        """The call's LoRAs loaded (those not loaded yet), as (adapter, scale) pairs; how many files were loaded."""
        if not call.loras:
            return (), 0
        if PROFILES[call.profile].adapter is not None:
            raise ValueError(f"LoRAs run on the base edit profile only, not {call.profile!r}")
        try:
            adapters, loaded, seconds = self.loras.prepare(call.loras)
        finally:
            self.adapters.forget()  # loading or evicting may have changed which adapters peft has active
        if loaded:
            timings["lora_load"] = seconds
            say(call, f"loaded {loaded} LoRA(s) in {seconds:.2f} s")
        return adapters, loaded


def say(call: EditCall, message: str) -> None:
    """Tell the caller (who logs it with the request's id), or the log when nobody is listening."""
    if call.on_message is not None:
        call.on_message(message)
    else:
        log.info(message)


@contextmanager
def vae_tiling(vae, tiled: bool):
    """Decode (and encode) in tiles for one call where `tiled`; the VAE's own setting again afterwards."""
    before = vae.use_tiling
    vae.use_tiling = tiled or before
    try:
        yield
    finally:
        vae.use_tiling = before


def center_crop(image: PIL.Image.Image, width: int, height: int) -> PIL.Image.Image:
    if image.size == (width, height):
        return image
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


@dataclass(frozen=True)
class LoadProgress:
    """Where a load is, for whoever watches it (the log, /health, a progress bar): the stage, the component being
    read, and the safetensors bytes read so far of all there are (from the file sizes on disk)."""

    stage: str  # "read" (one component after another), "adapters", "place", "warm_up", "done"
    component: str | None
    bytes_read: int
    bytes_total: int

    def describe(self) -> str:
        what = f"{self.stage} {self.component}" if self.component else self.stage
        unit, scale = ("GB", 1e9) if self.bytes_total >= 1e9 else ("MB", 1e6)
        return f"{what} ({self.bytes_read / scale:.1f} of {self.bytes_total / scale:.1f} {unit} read)"


LoadCallback = Callable[[LoadProgress], None]
LOAD_ORDER = ("scheduler", "tokenizer", "vae", "text_encoder", "transformer")  # small first: a typo fails fast


def bytes_on_disk(weights_dir: Path) -> dict[str, int]:
    """Each component's safetensors bytes on disk: what loading it reads."""
    return {name: sum(p.stat().st_size for p in (weights_dir / name).glob("*.safetensors")) for name in LOAD_ORDER}


def load_components(
    weights_dir: Path, dtype: torch.dtype, plan: MemoryPlan | None = None, on_progress: LoadCallback | None = None
) -> dict:
    """Each component of a diffusers-layout FLUX.2 directory, loaded explicitly from local files.

    With a `plan`, each model is read straight onto the device the plan keeps it on (`pipelines.memory.
    load_devices`; `device_map` of diffusers' and transformers' `from_pretrained`, which build the model on the
    meta device and copy each tensor from the file to its device: no full copy in CPU RAM first), and the text
    encoder is cut to `plan.text_encoder_layers` (its dropped layers are not read). Without one, everything
    loads whole on the CPU.

    Components are loaded one by one rather than through `Flux2Pipeline.from_pretrained` because the
    `tokenizer` component may be a bare tokenizer (see `load_tokenizer`), which `from_pretrained` refuses in
    place of the PixtralProcessor named in model_index.json; it also keeps placement per component explicit.
    `on_progress` hears of each component as its reading starts, and once more when all are read.
    """
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

    local = {"local_files_only": True}
    devices = load_devices(plan) if plan is not None else {}
    placed = lambda name: {"device_map": devices[name]} if name in devices else {}
    loaders = {
        "scheduler": lambda: FlowMatchEulerDiscreteScheduler.from_pretrained(
            weights_dir, subfolder="scheduler", **local
        ),
        "tokenizer": lambda: load_tokenizer(weights_dir / "tokenizer"),
        "vae": lambda: AutoencoderKLFlux2.from_pretrained(
            weights_dir, subfolder="vae", torch_dtype=dtype, **placed("vae"), **local
        ),
        "text_encoder": lambda: load_text_encoder(
            weights_dir / "text_encoder",
            dtype,
            num_layers=plan.text_encoder_layers if plan is not None else None,
            device_map=devices.get("text_encoder"),
        ),
        "transformer": lambda: Flux2Transformer2DModel.from_pretrained(
            weights_dir, subfolder="transformer", torch_dtype=dtype, **placed("transformer"), **local
        ),
    }
    sizes = bytes_on_disk(weights_dir)
    total, read = sum(sizes.values()), 0
    components = {}
    for name in LOAD_ORDER:
        if on_progress is not None:
            on_progress(LoadProgress("read", name, read, total))
        components[name] = loaders[name]()
        read += sizes[name]
    if on_progress is not None:
        on_progress(LoadProgress("read", None, read, total))
    return components


def synchronize(device: torch.device) -> None:
    """Wait for queued copies and kernels, so that a time taken next is the work's, not its queueing's."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_editor(
    weights_dir: str | Path,
    device: str | None = None,
    dtype: str | None = None,
    safety_checker: str | Path | None = None,
    safety_threshold: float = DEFAULT_THRESHOLD,
    options: RuntimeOptions | None = None,
    fuse: str | None = None,
    on_progress: LoadCallback | None = None,
) -> Flux2Editor:
    """Load FLUX.2 from a local diffusers-layout directory onto `device` (CUDA when present, else CPU), placed
    and set up as `options` say (memory mode, quantization, attention kernel, compile, acceleration levels), and
    the safety checker from `safety_checker` (an image-classification model directory) when given. `fuse` names a
    distilled adapter to fuse into the weights for good (for a process that serves only its profiles).

    Load time is reported in three parts (capabilities `load_timings`): `read` (weights from disk, each model
    straight onto its device, adapters beside them), `place` (adapter fused where the transformer is, quantization,
    offload hooks, compile set-up) and `warm_up` (the warm-up call, with compile); `load_seconds` is their sum.
    Each stage is logged, and told to `on_progress` when given: reading each component (with bytes read), the
    adapters, placement on the device(s), the compile warm-up, done."""
    from diffusers import Flux2Pipeline

    weights_dir = Path(weights_dir).resolve()
    options = options or RuntimeOptions()
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(torch_device, dtype)
    runtime = plan_runtime(options, weights_dir, device, torch_dtype)  # refuses what can't run, before loading
    started = time.perf_counter()
    last = LoadProgress("read", None, 0, 0)

    def progress(update: LoadProgress) -> None:
        nonlocal last
        last = update
        log.info("loading %s: %s", weights_dir.name, update.describe())
        if on_progress is not None:
            on_progress(update)

    def stage(name: str) -> None:
        progress(LoadProgress(name, None, last.bytes_read, last.bytes_total))

    pipe = Flux2Pipeline(**load_components(weights_dir, torch_dtype, runtime.plan, progress))
    stage("adapters")
    adapters = load_adapters(pipe, weights_dir)  # beside the transformer's layers, on its device
    synchronize(torch_device)
    read = time.perf_counter()
    if fuse is not None:
        if fuse not in adapters:
            raise ValueError(f"can't fuse the {fuse!r} adapter: it is not in {weights_dir}")
        fuse_adapter(pipe, fuse)  # where the transformer is: on the GPU when it was read there
    stage("place")
    runtime.apply(pipe)
    pipe.set_progress_bar_config(disable=True)
    synchronize(torch_device)
    placed = time.perf_counter()
    timings = {"read": read - started, "place": placed - read}
    log.info(
        "loaded %s (%s, %s) in %.1f s: read %.1f s, place %.1f s",
        weights_dir,
        runtime.plan.mode,
        torch_dtype,
        placed - started,
        timings["read"],
        timings["place"],
    )
    safety = SafetyChecker(safety_checker, torch_device, torch_dtype, safety_threshold) if safety_checker else None
    editor = Flux2Editor(pipe, weights_dir, placed - started, runtime, adapters, safety, fuse, load_timings=timings)
    if runtime.options.compile:  # the fast path may have turned it on
        stage("warm_up")
        editor.warm_up()
    stage("done")
    return editor
