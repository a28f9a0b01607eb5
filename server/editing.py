"""From an endpoint's validated input to its output: images in, model call, files out, honest notices."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

import PIL.Image

from pipelines import Cancelled, EditCall
from server.errors import InferenceError, Unavailable
from server.inputs import InputLimits, LocalFiles, load_images, url_error
from server.schemas import (
    MAX_REFERENCE_IMAGES,
    MAX_SIDE,
    MIN_SIDE,
    NAMED_SIZES,
    Acceleration,
    EditOutput,
    Flux2EditInput,
    ImageSize,
    ImageSizeName,
    _EditInputCommon,
)

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


def output_size(image_size: ImageSize | ImageSizeName | None, first: PIL.Image.Image, multiple: int) -> tuple[int, int]:
    if isinstance(image_size, ImageSizeName):
        return NAMED_SIZES[image_size]
    if isinstance(image_size, ImageSize):
        return image_size.width, image_size.height
    return size_from_reference(first.width, first.height, multiple)


def undistilled(profile: str, capabilities: dict) -> bool:
    """Whether this profile is made for a distilled adapter that is not loaded."""
    info = capabilities["profiles"][profile]
    return bool(info["distilled_adapter"]) and not info["distilled_adapter_loaded"]


def unavailable_reason(settings, profile: str, body: _EditInputCommon, capabilities: dict) -> str | None:
    """Why this server refuses the request as configured (the endpoint answers 503), or None."""
    if body.enable_safety_checker and not capabilities["safety_checker"] and not settings.disable_safety_checker:
        return (
            "enable_safety_checker is true, and this server has no safety checker: no image classifier at "
            f"{settings.safety_checker or '<weights>/safety_checker'} (FLUX2_SAFETY_CHECKER). Send "
            "enable_safety_checker: false, or ask the operator to install a checker or turn it off "
            "(FLUX2_DISABLE_SAFETY_CHECKER=1)."
        )
    if not capabilities["profiles"][profile]["runs_here"]:
        runs = ", ".join(name for name, info in capabilities["profiles"].items() if info["runs_here"])
        return (
            f"This server runs only the {runs} profile(s): their distilled {capabilities['fused_adapter']!r} adapter "
            f"is fused into its weights (FLUX2_PROFILES={settings.profiles}), so the {profile} profile can't run "
            "here. Send it to a server that serves it, or start this one with FLUX2_FUSE_ADAPTER=0."
        )
    if undistilled(profile, capabilities) and not settings.allow_undistilled:
        info = capabilities["profiles"][profile]
        return (
            f"The {profile} profile needs its distilled {info['distilled_adapter']!r} adapter, which is not on this "
            f"server: missing file {info['distilled_adapter_file']}. Place it there, or start the server with "
            "--allow-undistilled (FLUX2_ALLOW_UNDISTILLED=1) to run this profile on the base weights."
        )
    return None


def check_available(state, profile: str, body: _EditInputCommon) -> None:
    reason = unavailable_reason(state.settings, profile, body, state.worker.editor.capabilities())
    if reason:
        raise Unavailable(reason)


def notices_for(body: _EditInputCommon, profile: str, capabilities: dict, settings) -> list[str]:
    """Plain statements of what was asked for and not done, because this server can't or won't do it."""
    notices = []
    if len(body.image_urls) > MAX_REFERENCE_IMAGES:
        notices.append(f"Only the first {MAX_REFERENCE_IMAGES} of {len(body.image_urls)} image_urls were used.")
    if body.enable_safety_checker and settings.disable_safety_checker:
        notices.append(
            "The safety checker is turned off on this server by its operator: the images were not checked "
            "(has_nsfw_concepts is false for each)."
        )
    if body.enable_prompt_expansion and not capabilities["prompt_expansion"]:
        why = capabilities.get("prompt_expansion_unavailable")
        notices.append(
            f"Prompt expansion is not available on this server{f' ({why})' if why else ''}: the prompt was used as "
            "given."
        )
    level = body.acceleration.value if isinstance(body, Flux2EditInput) else Acceleration.none.value
    if level != Acceleration.none.value and not capabilities["acceleration"][level]:
        notices.append(
            f"Acceleration {level!r} is turned off on this server: the image was generated without acceleration."
        )
    if undistilled(profile, capabilities):  # served only when the operator allowed it
        info = capabilities["profiles"][profile]
        notices.append(
            f"No distilled {info['distilled_adapter']!r} adapter is loaded: the {profile} profile ran the base "
            f"FLUX.2 [dev] weights on its {info['steps']}-step schedule (allowed by FLUX2_ALLOW_UNDISTILLED)."
        )
    return notices


async def run_edit(
    state,
    profile: str,
    body: _EditInputCommon,
    base_url: str,
    request_id: str,
    on_log: Callable[[str], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> EditOutput:
    """Run one edit request end to end. `state` holds the app's worker, output store, HTTP client and settings.

    Progress lines (one per denoising step) go to the log and to `on_log`; `should_cancel` is polled after each
    step, and a cancelled run raises `pipelines.Cancelled`.
    """
    started = time.perf_counter()

    def progress(message: str) -> None:
        log.info("request %s: %s", request_id, message)
        if on_log is not None:
            on_log(message)

    editor = state.worker.editor
    check_available(state, profile, body)
    urls = body.image_urls[:MAX_REFERENCE_IMAGES]
    settings = state.settings
    limits = InputLimits(settings.max_input_image_bytes, settings.max_input_pixels, settings.fetch_timeout_s)
    local = LocalFiles(base_url, state.outputs.storage)
    images, input_notices = await load_images(state.http, urls, limits, local)
    for index, image in enumerate(images):
        problem = editor.reference_problem(image)
        if problem:
            raise url_error(index, urls[index], problem, "invalid_image")
    width, height = output_size(body.image_size, images[0], editor.size_multiple)
    seed = body.seed if body.seed is not None else _seeds.randrange(2**32)
    fetched = time.perf_counter()
    step_clock = state.metrics.step_clock(profile)  # step latency for /metrics

    def on_step(step: int, total: int) -> None:
        step_clock.tick()
        progress(f"step {step}/{total}")

    call = EditCall(
        images=images,
        prompt=body.prompt,
        width=width,
        height=height,
        profile=profile,
        num_inference_steps=getattr(body, "num_inference_steps", None),  # only the base input has it
        guidance_scale=body.guidance_scale,
        seed=seed,
        num_images=body.num_images,
        acceleration=body.acceleration.value if isinstance(body, Flux2EditInput) else Acceleration.none.value,
        on_step=on_step,
        should_cancel=should_cancel,
        expand_prompt=body.enable_prompt_expansion,
        on_message=progress,
        check_safety=body.enable_safety_checker and not state.settings.disable_safety_checker,
    )
    progress(f"{profile} {width}x{height}, {len(images)} reference(s), seed {seed}")
    try:
        result = await state.worker.run(call)
    except (Cancelled, InferenceError):
        raise
    except Exception as exc:
        raise InferenceError(f"{type(exc).__name__}: {exc}") from exc
    encoding = time.perf_counter()
    files = await asyncio.to_thread(state.outputs.save, result.images, body.output_format, base_url, body.sync_mode)
    done = time.perf_counter()
    timings = {"fetch_inputs": fetched - started, **result.timings, "encode": done - encoding, "total": done - started}
    return EditOutput(
        images=files,
        timings=timings,
        seed=seed,
        # The checker's verdicts; false where it did not run (the caller turned it off, or the operator did, which
        # the notices say): fal's field is a list of booleans.
        has_nsfw_concepts=result.has_nsfw_concepts or [False] * len(files),
        prompt=result.prompt,
        notices=input_notices + notices_for(body, profile, editor.capabilities(), state.settings) + result.notices,
    )
