"""A stand-in for `pipelines.Flux2Editor` with the same interface the server uses, and no model: it runs each
profile's step count (calling `on_step` and polling `should_cancel` as the real denoising loop does), can sleep per
step, run out of CUDA memory or fail, and returns flat images of the asked size. With it the service, the
dispatcher and the HTTP routes run in-process in milliseconds (tests/test_service_fast.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import PIL.Image
import torch

from pipelines import PROFILES, Cancelled, EditCall, EditResult
from pipelines.capabilities import Capabilities, ProfileCapabilities


def capabilities(**changes) -> Capabilities:
    """Every profile runs here (its adapter loaded), with a safety checker and prompt expansion; `changes` override."""
    profiles = {
        name: ProfileCapabilities(
            steps=len(p.sigmas) if p.sigmas else "4-50 (default 28)",
            sigmas=list(p.sigmas) if p.sigmas else None,
            distilled_adapter=p.adapter,
            distilled_adapter_file=f"/fake/loras/{p.adapter}.safetensors" if p.adapter else None,
            distilled_adapter_loaded=True,
            runs_here=True,
        )
        for name, p in PROFILES.items()
    }
    base = {
        "device": "cpu",
        "dtype": "float32",
        "weights": "/fake",
        "load_seconds": 0.0,
        "profiles": profiles,
        "fused_adapter": None,
        "acceleration": {"available": ["none"], "regular": False, "high": False},
        "safety_checker": True,
        "safety_checker_model": "/fake/safety_checker",
        "safety_threshold": 0.5,
        "prompt_expansion": True,
    }
    return Capabilities(**{**base, **changes})


@dataclass
class FakeEditor:
    step_s: float = 0.0  # sleep per denoising step
    fail_with: BaseException | None = None  # raised at the first step (e.g. torch.cuda.OutOfMemoryError)
    caps: Capabilities = field(default_factory=capabilities)
    calls: list[EditCall] = field(default_factory=list)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    size_multiple: int = 16

    def capabilities(self) -> Capabilities:
        return self.caps

    def reference_problem(self, image: PIL.Image.Image) -> str | None:
        return "Reference image refused: smaller than 8x8" if min(image.size) < 8 else None

    def edit(self, call: EditCall) -> EditResult:
        self.calls.append(call)
        steps, _ = PROFILES[call.profile].schedule(call.num_inference_steps)
        for step in range(1, steps + 1):
            if self.fail_with is not None:
                raise self.fail_with
            time.sleep(self.step_s)
            if call.on_step is not None:
                call.on_step(step, steps)
            if call.should_cancel is not None and call.should_cancel():
                raise Cancelled()
        images = [PIL.Image.new("RGB", (call.width, call.height), (call.seed % 256, 0, 0))] * call.num_images
        return EditResult(images=images, steps=steps, prompt=call.prompt, timings={"denoise": steps * self.step_s})
