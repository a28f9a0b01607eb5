"""Acceleration levels of the base edit endpoint (`none` / `regular` / `high`) as diffusers' cache hooks.

fal's API offers `acceleration` on `fal-ai/flux-2/edit` only ("Use Flash or Turbo variants for optimized
acceleration"), so turbo and flash always run uncached.

Which diffusers 0.42.1 cache hooks work on `Flux2Transformer2DModel` (checked on the tiny model, see
tests/test_acceleration.py):

- TaylorSeer (`TaylorSeerCacheConfig`) works. Its schedule is fixed in advance: the transformer runs in full on
  the first `disable_cache_before_step` steps, then on every `cache_interval`-th step, and on the last steps
  (`full_last_steps`, ours: turned into diffusers' `disable_cache_after_step` per request); in between the
  output is extrapolated (Taylor series of order `max_order`). With `use_lite_mode` only `proj_out` is
  extrapolated and the blocks are skipped whole, so the cache holds one small tensor instead of every
  attention output (which at 1024 px with 4 references would be tens of GB). Because the schedule does not
  depend on the weights, the speed-up measured with random weights is the real one; the quality cost is not.
- MagCache (`MagCacheConfig`) works (diffusers handles FLUX.2's fused text+image tail), but it needs magnitude
  ratios calibrated for the checkpoint; diffusers ships ratios for FLUX.1 only. It is offered when configured
  with a ratios file (`mag_ratios=/path/ratios.json`), never by default.
- First-Block Cache does not work on FLUX.2 in diffusers 0.42.1: its tail hook subtracts the head block's
  (image, text) pair from the last single-stream block's fused output and raises TypeError. Refused.
- Flux2Pipeline never enters `transformer.cache_context(...)`, which stateful hooks need; `applied()` does,
  around the whole call (FLUX.2 [dev] is guidance-distilled: one transformer call per step, one context).

The levels' defaults are provisional: TaylorSeer's documented defaults (interval 5, 3 warm-up steps, order 1)
for `high`, a denser schedule for `regular`. They are chosen for speed on paper; the similarity to `none` on
real weights is measured by `python -m benchmarks.speed --weights DIR` (PSNR/SSIM per level) and the levels
are to be retuned from that run. Each level is configurable (`FLUX2_ACCELERATION_REGULAR`,
`FLUX2_ACCELERATION_HIGH`) as `method:key=value,...`, e.g. `taylorseer:cache_interval=3,max_order=2`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger(__name__)

LEVELS = ("none", "regular", "high")

DEFAULT_SPECS = {
    "regular": "taylorseer:cache_interval=3,disable_cache_before_step=4,full_last_steps=2,max_order=1,use_lite_mode=true",
    "high": "taylorseer:cache_interval=5,disable_cache_before_step=3,full_last_steps=1,max_order=1,use_lite_mode=true",
}

# Each method's settings and their defaults (diffusers' own defaults where diffusers has the setting).
METHOD_PARAMS: dict[str, dict[str, object]] = {
    "taylorseer": {
        "cache_interval": 5,
        "disable_cache_before_step": 3,
        "full_last_steps": 0,  # ours: the last N steps always run in full (diffusers' disable_cache_after_step)
        "max_order": 1,
        "use_lite_mode": True,
    },
    "magcache": {
        "threshold": 0.06,
        "max_skip_steps": 3,
        "retention_ratio": 0.2,
        "mag_ratios": None,  # path to a JSON list of floats, calibrated for these weights (required)
    },
}
REFUSED_METHODS = {
    "fbc": "First-Block Cache does not support FLUX.2 in diffusers 0.42.1 (its tail hook fails on the fused "
    "single-stream output)",
    "firstblockcache": "see fbc",
}


@dataclass(frozen=True)
class CacheSpec:
    """One acceleration level: a diffusers cache method and its settings, as configured."""

    method: str
    params: dict = field(default_factory=dict)
    text: str = ""

    def config(self, steps: int):
        """The diffusers cache config for a run of `steps` steps, or None when no step would be skipped."""
        from diffusers import MagCacheConfig, TaylorSeerCacheConfig

        p = self.params
        if self.method == "taylorseer":
            if not self.skipped_steps(steps):
                return None
            return TaylorSeerCacheConfig(
                cache_interval=p["cache_interval"],
                disable_cache_before_step=p["disable_cache_before_step"],
                disable_cache_after_step=steps - p["full_last_steps"] if p["full_last_steps"] else None,
                max_order=p["max_order"],
                taylor_factors_dtype=torch.float32,  # diffusers' FLUX example; lite mode keeps one small tensor
                use_lite_mode=p["use_lite_mode"],
            )
        retention = int(p["retention_ratio"] * steps + 0.5)
        if retention >= steps:
            return None
        return MagCacheConfig(
            threshold=p["threshold"],
            max_skip_steps=p["max_skip_steps"],
            retention_ratio=p["retention_ratio"],
            num_inference_steps=steps,
            mag_ratios=list(p["mag_ratios"]),
        )

    def skipped_steps(self, steps: int) -> list[int] | None:
        """The 0-based steps on which the transformer is not run, or None where that depends on the weights
        (MagCache decides at run time). Mirrors diffusers' TaylorSeerCacheHook._measure_should_compute."""
        if self.method != "taylorseer":
            return None
        p = self.params
        before, interval = p["disable_cache_before_step"], p["cache_interval"]
        after = steps - p["full_last_steps"] if p["full_last_steps"] else None
        skipped = []
        for step in range(steps):
            full = step < before or (step - before - 1) % interval == 0 or (after is not None and step >= after)
            if not full:
                skipped.append(step)
        return skipped

    def describe(self) -> dict:
        return {"method": self.method, "spec": self.text, "settings": {k: v for k, v in self.params.items()}}


def _value(method: str, key: str, raw: str):
    default = METHOD_PARAMS[method][key]
    if key == "mag_ratios":
        path = Path(raw).expanduser()
        try:
            ratios = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"magcache mag_ratios: cannot read a JSON list of numbers from {path}: {exc}") from exc
        if not isinstance(ratios, list) or not ratios or not all(isinstance(r, int | float) for r in ratios):
            raise ValueError(f"magcache mag_ratios: {path} must hold a non-empty JSON list of numbers")
        return tuple(float(r) for r in ratios)
    if isinstance(default, bool):
        if raw.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{method} {key} must be true or false, got {raw!r}")
        return raw.lower() in ("true", "1")
    try:
        return type(default)(raw)
    except ValueError:
        raise ValueError(
            f"{method} {key} must be a{'n integer' if isinstance(default, int) else ' number'}, got {raw!r}"
        )


def parse_spec(text: str) -> CacheSpec | None:
    """`none`, or `method:key=value,...` (see METHOD_PARAMS). Raises ValueError saying what is wrong."""
    text = text.strip()
    if text.lower() in ("none", "off", ""):
        return None
    method, _, rest = text.partition(":")
    method = method.strip().lower()
    if method in REFUSED_METHODS:
        raise ValueError(f"acceleration method {method!r} is not usable: {REFUSED_METHODS['fbc']}")
    if method not in METHOD_PARAMS:
        raise ValueError(f"unknown acceleration method {method!r}: use one of {', '.join(METHOD_PARAMS)} or none")
    params = dict(METHOD_PARAMS[method])
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or key not in params:
            raise ValueError(f"{method}: unknown setting {item!r}; settings are {', '.join(METHOD_PARAMS[method])}")
        params[key] = _value(method, key, raw.strip())
    if method == "taylorseer" and (
        params["cache_interval"] < 1 or params["max_order"] < 0 or params["disable_cache_before_step"] < 0
    ):
        raise ValueError("taylorseer: cache_interval >= 1, max_order >= 0, disable_cache_before_step >= 0")
    if method == "magcache" and params["mag_ratios"] is None:
        raise ValueError(
            "magcache needs mag_ratios=/path/ratios.json calibrated for these weights (diffusers ships FLUX.1's only)"
        )
    return CacheSpec(method=method, params=params, text=text)


class Accelerator:
    """The configured cache for each acceleration level, applied to the transformer for one call at a time."""

    def __init__(self, specs: dict[str, CacheSpec | None]):
        self.specs = {"none": None, **specs}

    @classmethod
    def from_settings(cls, regular: str | None = None, high: str | None = None) -> Accelerator:
        return cls(
            {
                "regular": parse_spec(regular or DEFAULT_SPECS["regular"]),
                "high": parse_spec(high or DEFAULT_SPECS["high"]),
            }
        )

    def describe(self) -> dict:
        """For capabilities: which levels run a cache, and which."""
        levels = {level: (spec.describe() if spec else None) for level, spec in self.specs.items()}
        return {
            "available": [level for level in LEVELS if level == "none" or self.specs.get(level)],
            "regular": self.specs.get("regular") is not None,
            "high": self.specs.get("high") is not None,
            "levels": levels,
            "profiles": ["edit"],
            "thresholds": "provisional until measured on real weights (benchmarks/speed.py reports PSNR/SSIM)",
        }

    def skipped_steps(self, level: str, steps: int) -> list[int] | None:
        spec = self.specs.get(level)
        return [] if spec is None else spec.skipped_steps(steps)

    @contextmanager
    def applied(self, transformer, level: str, steps: int) -> Iterator[None]:
        """Run the body with `level`'s cache on `transformer`; the model is left exactly as it was after.

        `none` touches nothing, so an uncached call is the plain diffusers call, bit for bit.
        """
        if level not in self.specs:
            raise ValueError(f"unknown acceleration level {level!r}")
        spec = self.specs[level]
        config = spec.config(steps) if spec is not None else None
        if config is None:
            yield
            return
        if transformer.is_cache_enabled:  # left over by an interrupted call: start clean
            transformer.disable_cache()
        transformer.enable_cache(config)
        try:
            with transformer.cache_context("cond"):
                yield
        finally:
            transformer._reset_stateful_cache()
            transformer.disable_cache()
