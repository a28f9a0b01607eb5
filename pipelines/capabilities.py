"""What a loaded `Flux2Editor` can and can't do: read by the server for refusals (503), notices and `/health`.

Typed, so a reader finds every fact by name; `as_dict()` is the JSON `/health` and worker heartbeats show.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class ProfileCapabilities:
    steps: int | str  # the fixed step count of a distilled profile, or the base profile's range
    sigmas: list[float] | None
    distilled_adapter: str | None  # the LoRA the profile is made for, if any
    distilled_adapter_file: str | None
    distilled_adapter_loaded: bool
    runs_here: bool  # False where another adapter is fused into the weights

    @property
    def undistilled(self) -> bool:
        """Made for a distilled adapter that is not loaded (it runs on the base weights only if allowed)."""
        return bool(self.distilled_adapter) and not self.distilled_adapter_loaded


@dataclass(frozen=True)
class Capabilities:
    device: str
    dtype: str
    weights: str
    load_seconds: float
    profiles: dict[str, ProfileCapabilities]
    fused_adapter: str | None
    acceleration: dict  # pipelines.acceleration.Accelerator.describe(): `available` levels, one flag per level
    safety_checker: bool
    safety_checker_model: str | None
    safety_threshold: float | None
    prompt_expansion: bool
    prompt_expansion_unavailable: str | None = None  # why not, in plain words (None when available)
    load_timings: dict[str, float] = field(default_factory=dict)  # seconds: read, place, warm_up
    runtime: dict = field(default_factory=dict)  # pipelines.runtime.Runtime.describe(): memory mode, fast path
    loras: dict = field(default_factory=dict)  # pipelines.loras.LoraCache.describe(): request LoRAs, how many kept

    def acceleration_runs(self, level: str) -> bool:
        """Whether acceleration `level` runs a cache here ("none" always runs, as itself)."""
        return level == "none" or bool(self.acceleration.get(level))

    def as_dict(self) -> dict:
        """The JSON form: these fields, with the runtime's description at the top level."""
        data = asdict(self)
        return {**data, **data.pop("runtime")}
