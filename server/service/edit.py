"""From an endpoint's validated input to its output, in three steps: `prepare` (check what this server can run,
fetch and decode the reference images, size and seed: an `EditCall`), `run` (the model, on its own thread), `finish`
(encode and store the files, honest notices: an `EditOutput`). `EditService` holds what they need.

Edit and text-to-image endpoints take the same three steps: a text-to-image input has no reference images
(`reference_urls()` is empty), so nothing is fetched and the call goes to the model with none.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

import httpx
import PIL.Image

from pipelines import Cancelled, EditCall, EditResult
from pipelines.capabilities import Capabilities
from pipelines.loras import LoraError, LoraFile
from pipelines.parallel import RankFailed
from server.config import Settings
from server.errors import InferenceError, InputError, Unavailable
from server.files.outputs import OutputStore
from server.schemas import (
    MAX_REFERENCE_IMAGES,
    MAX_SIDE,
    MIN_SIDE,
    NAMED_SIZES,
    Acceleration,
    ChosenSchedule,
    EditInput,
    EditOutput,
    ImageSize,
    ImageSizeName,
)
from server.service.inputs import InputLimits, LocalFiles, load_images, short, url_error
from server.service.loras import discard, resolve_loras
from server.service.metrics import Metrics
from server.service.model import Model

log = logging.getLogger(__name__)
_seeds = random.SystemRandom()


def size_from_reference(width: int, height: int, multiple: int) -> tuple[int, int]:
    """The first input image's size, brought within 512-2048 px a side (keeping its aspect ratio where the
    limits allow) and rounded to the nearest multiple the model generates at."""
    scale = 1.0
    if min(width, height) < MIN_SIDE:
        scale = MIN_SIDE / min(width, height)
    if max(width, height) * scale > MAX_SIDE:
        scale = MAX_SIDE / max(width, height)

    def fit(side: float) -> int:
        return min(MAX_SIDE, max(MIN_SIDE, round(side / multiple) * multiple))

    return fit(width * scale), fit(height * scale)


def output_size(
    image_size: ImageSize | ImageSizeName | None, first: PIL.Image.Image | None, multiple: int
) -> tuple[int, int]:
    """The size asked for, or (not set: only the base edit endpoint allows it) the first reference image's."""
    if isinstance(image_size, ImageSizeName):
        return NAMED_SIZES[image_size]
    if isinstance(image_size, ImageSize):
        return image_size.width, image_size.height
    assert first is not None, "only an edit input leaves image_size unset, and it has a reference image"
    return size_from_reference(first.width, first.height, multiple)


def unavailable_reason(settings: Settings, profile: str, body: EditInput, caps: Capabilities) -> str | None:
    """Why this server refuses the request as configured (the endpoint answers 503), or None."""
    if body.enable_safety_checker and not caps.safety_checker and not settings.disable_safety_checker:
        return (
            "enable_safety_checker is true, and this server has no safety checker: no image classifier at "
            f"{settings.safety_checker or '<weights>/safety_checker'} (FLUX2_SAFETY_CHECKER). Send "
            "enable_safety_checker: false, or ask the operator to install a checker or turn it off "
            "(FLUX2_DISABLE_SAFETY_CHECKER=1)."
        )
    info = caps.profiles[profile]
    if not info.runs_here:
        runs = ", ".join(name for name, other in caps.profiles.items() if other.runs_here)
        return (
            f"This server runs only the {runs} profile(s): their distilled {caps.fused_adapter!r} adapter "
            f"is fused into its weights (FLUX2_PROFILES={settings.profiles}), so the {profile} profile can't run "
            "here. Send it to a server that serves it, or start this one with FLUX2_FUSE_ADAPTER=0."
        )
    if info.undistilled and not settings.allow_undistilled:
        return (
            f"The {profile} profile needs its distilled {info.distilled_adapter!r} adapter, which is not on this "
            f"server: missing file {info.distilled_adapter_file}. Place it there, or start the server with "
            "--allow-undistilled (FLUX2_ALLOW_UNDISTILLED=1) to run this profile on the base weights."
        )
    return None


def acceleration_of(body: EditInput) -> str:
    """The acceleration level asked for (only the base endpoints' inputs have the field)."""
    return body.acceleration.value if isinstance(body, ChosenSchedule) else Acceleration.none.value


def notices_for(body: EditInput, profile: str, caps: Capabilities, settings: Settings) -> list[str]:
    """Plain statements of what was asked for and not done, because this server can't or won't do it."""
    notices = []
    urls = body.reference_urls()
    if len(urls) > MAX_REFERENCE_IMAGES:
        notices.append(f"Only the first {MAX_REFERENCE_IMAGES} of {len(urls)} image_urls were used.")
    if body.enable_safety_checker and settings.disable_safety_checker:
        notices.append(
            "The safety checker is turned off on this server by its operator: the images were not checked "
            "(has_nsfw_concepts is false for each)."
        )
    if body.enable_prompt_expansion and not caps.prompt_expansion:
        why = caps.prompt_expansion_unavailable
        notices.append(
            f"Prompt expansion is not available on this server{f' ({why})' if why else ''}: the prompt was used as "
            "given."
        )
    ignored = [name for name in getattr(body, "IGNORED", ()) if name in body.model_fields_set]
    if ignored:
        notices.append(
            f"The {profile} profile runs a fixed schedule: {' and '.join(ignored)} "
            f"{'was' if len(ignored) == 1 else 'were'} ignored."
        )
    level = acceleration_of(body)
    if not caps.acceleration_runs(level):
        notices.append(
            f"Acceleration {level!r} is turned off on this server: the image was generated without acceleration."
        )
    info = caps.profiles[profile]
    if info.undistilled:  # served only when the operator allowed it
        notices.append(
            f"No distilled {info.distilled_adapter!r} adapter is loaded: the {profile} profile ran the base "
            f"FLUX.2 [dev] weights on its {info.steps}-step schedule (allowed by FLUX2_ALLOW_UNDISTILLED)."
        )
    return notices


def generator_seed(seed: int) -> int:
    """Any integer seed (fal documents no range) onto the generator's 64-bit range, the same way every time."""
    return seed % 2**64


def edit_call(
    body: EditInput,
    profile: str,
    images: list,
    width: int,
    height: int,
    seed: int,
    settings,
    loras: list[LoraFile] | tuple[LoraFile, ...] = (),
) -> EditCall:
    """The model call a validated body asks for (no callbacks yet: `EditService.run` adds them)."""
    return EditCall(
        images=images,
        prompt=body.prompt,
        width=width,
        height=height,
        profile=profile,
        # only the base inputs' step count counts (flash and turbo run a fixed schedule)
        num_inference_steps=body.num_inference_steps if isinstance(body, ChosenSchedule) else None,
        guidance_scale=body.guidance_scale,
        seed=seed,
        num_images=body.num_images,
        acceleration=acceleration_of(body),
        expand_prompt=body.enable_prompt_expansion,
        check_safety=body.enable_safety_checker and not settings.disable_safety_checker,
        loras=tuple(loras),
    )


@dataclass
class Prepared:
    """A request made ready for the model: its call, where its files go, and what was noticed on the way."""

    profile: str
    body: EditInput
    call: EditCall
    base_url: str
    input_notices: list[str]
    started: float  # perf_counter when preparing began
    fetched: float  # ... when the inputs were ready
    running: float | None = None  # ... and when the model took it (it may wait between: fetched ahead)
    scratch: list[Path] = dataclasses.field(default_factory=list)  # files of this request to remove when done (LoRAs)

    def discard(self) -> None:
        """Remove the request's scratch files (downloaded LoRAs): call once it is done, whatever the outcome."""
        discard(self.scratch)


@dataclass
class EditService:
    """One edit: `prepare` -> `run` -> `finish`. Built once per process (server.process)."""

    settings: Settings
    model: Model
    outputs: OutputStore
    http: httpx.AsyncClient
    metrics: Metrics

    def check_available(self, profile: str, body: EditInput) -> None:
        """Unavailable (503) if this server, as configured, can't run the request."""
        reason = unavailable_reason(self.settings, profile, body, self.model.runner.editor.capabilities())
        if reason:
            raise Unavailable(reason)

    async def prepare(
        self, profile: str, body: EditInput, base_url: str, on_message: Callable[[str], None]
    ) -> Prepared:
        started = time.perf_counter()
        editor = self.model.runner.editor
        self.check_available(profile, body)
        urls = body.reference_urls()[:MAX_REFERENCE_IMAGES]  # none: text to image
        settings = self.settings
        limits = InputLimits(settings.max_input_image_bytes, settings.max_input_pixels, settings.fetch_timeout_s)
        local = LocalFiles(base_url, self.outputs.storage)
        images, input_notices = await load_images(self.http, urls, limits, local)
        for index, image in enumerate(images):
            problem = editor.reference_problem(image)
            if problem:
                raise url_error(index, urls[index], problem, "invalid_image")
        width, height = output_size(body.image_size, images[0] if images else None, editor.size_multiple)
        if width * height > settings.max_output_pixels:
            message = (
                f"an output of {width}x{height} is larger than this server makes: at most {settings.max_output_pixels}"
                " pixels (FLUX2_MAX_OUTPUT_PIXELS)"
            )
            raise InputError(["image_size"], message, "image_too_large", f"{width}x{height}")
        seed = body.seed if body.seed is not None else _seeds.randrange(2**32)
        loras, scratch = await resolve_loras(getattr(body, "loras", []), self.http, local, settings)
        call = edit_call(body, profile, images, width, height, generator_seed(seed), settings, loras)
        kind = f"{len(images)} reference(s)" if images else "text to image"
        described = "".join(f", LoRA {lora.digest[:12]} x{lora.scale:g}" for lora in loras)
        on_message(f"{profile} {width}x{height}, {kind}, seed {seed}{described}")
        return Prepared(profile, body, call, base_url, input_notices, started, time.perf_counter(), scratch=scratch)

    async def run(
        self,
        prepared: Prepared,
        on_step: Callable[[int, int], None],
        on_message: Callable[[str], None],
        should_cancel: Callable[[], bool] | None = None,
    ) -> EditResult:
        """The model call, on the runner's thread. A fault inside the model is an InferenceError (500)."""
        step_clock = self.metrics.step_clock(prepared.profile)  # step latency for /metrics

        def step(done: int, total: int) -> None:
            step_clock.tick()
            on_step(done, total)

        call = dataclasses.replace(prepared.call, on_step=step, on_message=on_message, should_cancel=should_cancel)
        prepared.running = time.perf_counter()
        try:
            result = await self.model.runner.run(call)
        except (Cancelled, InferenceError, RankFailed):  # RankFailed: a replica's process died (re-queued once)
            raise
        except LoraError as exc:  # a LoRA file the model can't use: the model is as it was, the request a 422
            path = prepared.body.loras[exc.index].path  # type: ignore[union-attr]  # only LoRA bodies have loras
            raise InputError(["loras", exc.index, "path"], str(exc), "invalid_lora", short(path)) from exc
        except Exception as exc:
            raise InferenceError(f"{type(exc).__name__}: {exc}") from exc
        self.metrics.loras_applied(call.loras, result.loras_loaded)
        return result

    async def finish(self, prepared: Prepared, result: EditResult, pool: Executor | None = None) -> EditOutput:
        """Encode and store the images (with `pool`: side by side on its threads); returns once all are written."""
        body = prepared.body
        encoding = time.perf_counter()
        files = await asyncio.to_thread(
            self.outputs.save, result.images, body.output_format, prepared.base_url, body.sync_mode, pool
        )
        done = time.perf_counter()
        fetching = prepared.fetched - prepared.started
        timings = {
            "fetch_inputs": fetching,
            **result.timings,
            "encode": done - encoding,
            # the server's time on it: fetching its inputs, then from the model's start on (not the wait between)
            "total": fetching + done - (prepared.running or prepared.fetched),
        }
        caps = self.model.runner.editor.capabilities()
        return EditOutput(
            images=files,
            timings=timings,
            seed=body.seed if body.seed is not None else prepared.call.seed,  # echoed as given
            # The checker's verdicts; false where it did not run (the caller turned it off, or the operator did,
            # which the notices say): fal's field is a list of booleans.
            has_nsfw_concepts=result.has_nsfw_concepts or [False] * len(files),
            prompt=result.prompt,
            notices=prepared.input_notices + notices_for(body, prepared.profile, caps, self.settings) + result.notices,
        )

    async def edit(
        self,
        profile: str,
        body: EditInput,
        base_url: str,
        request_id: str,
        on_log: Callable[[str], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
        on_progress: Callable[[int, int], None] | None = None,
        prepared: Prepared | None = None,
        on_model_done: Callable[[], None] | None = None,
        pool: Executor | None = None,
    ) -> EditOutput:
        """Run one edit request end to end. Progress lines (one per denoising step) go to the log and to `on_log`,
        and (step, total) to `on_progress`; `should_cancel` is polled after each step, and a cancelled run raises
        `pipelines.Cancelled`. `prepared`: its inputs, fetched ahead (`prepare`); `on_model_done` is called as
        soon as the model let go of it (the dispatcher takes the next request then, while this call encodes and
        stores the images, on `pool`'s threads)."""

        def progress(message: str) -> None:
            log.info("request %s: %s", request_id, message)
            if on_log is not None:
                on_log(message)

        if prepared is None:
            prepared = await self.prepare(profile, body, base_url, progress)

        def on_step(step: int, total: int) -> None:
            progress(f"step {step}/{total}")
            if on_progress is not None:
                on_progress(step, total)

        try:
            result = await self.run(prepared, on_step, progress, should_cancel)
        finally:
            prepared.discard()
        if on_model_done is not None:
            on_model_done()
        return await self.finish(prepared, result, pool)
