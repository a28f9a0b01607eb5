"""The one table that says how each endpoint runs the model.

`edit` is FLUX.2 [dev] as published: steps chosen by the caller (4-50, default 28, fal's default) on the
scheduler's own shifted schedule.

`turbo` and `flash` run a fixed, reduced number of steps on a custom sigma schedule:

- turbo: 8 steps on the pre-shifted schedule published with fal's FLUX.2-dev-Turbo distillation LoRA
  (huggingface.co/fal/FLUX.2-dev-Turbo, model card "Usage": TURBO_SIGMAS). 8 is the step count that adapter was
  distilled for, so it is the count this profile keeps when the adapter is present.
- flash: the same distilled weights, 4 steps, every other point of the turbo schedule starting at 1.0. Halving
  the turbo schedule keeps noise levels the distilled adapter was trained on while halving the cost; it is the
  fewest-step profile we can justify without a flash adapter of its own. Its quality against turbo has NOT been
  measured yet: `benchmarks/flash_quality.py` measures this and other 2-4-step candidates against turbo on real
  weights (PSNR, same inputs and seeds) and should decide this schedule.

Distilled weights: `adapter` names the LoRA a profile is distilled for (`weights.layout.ADAPTERS`: the file
under `<weights>/loras/<adapter>/`), loaded once and enabled per request by `pipelines.adapters`. When it is
missing the server answers 503 for the profile, unless the operator allows running it on the base weights
(`server.service.edit.unavailable_reason`).

Acceleration (`none`/`regular`/`high`, base only) selects a cache hook in the fast-path issue; until then
every level runs uncached and the server says so.
"""

from __future__ import annotations

from dataclasses import dataclass

# fal/FLUX.2-dev-Turbo model card, "Usage": pre-shifted custom sigmas for 8-step turbo inference.
TURBO_SIGMAS: tuple[float, ...] = (1.0, 0.6509, 0.4374, 0.2932, 0.1893, 0.1108, 0.0495, 0.00031)
FLASH_SIGMAS: tuple[float, ...] = TURBO_SIGMAS[::2]  # (1.0, 0.4374, 0.1893, 0.0495)

MIN_STEPS, MAX_STEPS, DEFAULT_STEPS = 4, 50, 28


@dataclass(frozen=True)
class Profile:
    name: str
    sigmas: tuple[float, ...] | None  # a fixed schedule, or None: the caller picks steps, the scheduler the sigmas
    adapter: str | None  # the distilled LoRA this profile is made for, under <weights>/loras/<adapter>/

    def schedule(self, requested_steps: int | None) -> tuple[int, list[float] | None]:
        """(num_inference_steps, sigmas) to pass to Flux2Pipeline for this profile."""
        if self.sigmas is not None:
            return len(self.sigmas), list(self.sigmas)
        steps = DEFAULT_STEPS if requested_steps is None else requested_steps
        if not MIN_STEPS <= steps <= MAX_STEPS:
            raise ValueError(f"num_inference_steps must be within {MIN_STEPS}..{MAX_STEPS}, got {steps}")
        return steps, None


PROFILES: dict[str, Profile] = {
    "edit": Profile("edit", sigmas=None, adapter=None),
    "turbo": Profile("turbo", sigmas=TURBO_SIGMAS, adapter="turbo"),
    "flash": Profile("flash", sigmas=FLASH_SIGMAS, adapter="turbo"),
}
