"""The model as this process runs it: FLUX.2 loaded with the configured safety checker, and what it can't do said
plainly at start-up. Shared by `serve` (server.app) and `worker` (server.queue_worker)."""

from __future__ import annotations

import logging
from pathlib import Path

from pipelines import PROFILES, Flux2Editor, load_editor
from server.config import Settings
from weights.layout import ADAPTERS

log = logging.getLogger(__name__)


def served_profiles(settings: Settings) -> list[str]:
    """The profiles this process's model serves (FLUX2_PROFILES / --profiles; default: all)."""
    if not settings.profiles:
        return list(PROFILES)
    profiles = [p.strip() for p in settings.profiles.split(",") if p.strip()]
    unknown = sorted(set(profiles) - set(PROFILES))
    if unknown:
        raise ValueError(f"unknown profile(s) {unknown}: choose from {sorted(PROFILES)}")
    return profiles


def adapter_to_fuse(settings: Settings, weights_dir: Path) -> str | None:
    """The distilled adapter to fuse at load: the one every served profile uses, when it is on disk."""
    needed = {PROFILES[p].adapter for p in served_profiles(settings)}
    if not settings.fuse_adapter or len(needed) != 1 or None in needed:
        return None
    name = needed.pop()
    return name if ADAPTERS[name].path(weights_dir).is_file() else None


def load_model(settings: Settings, weights_dir: Path) -> Flux2Editor:
    editor = load_editor(
        weights_dir,
        settings.device,
        settings.dtype,
        settings.safety_checker_dir(weights_dir),
        settings.safety_threshold,
        settings.runtime_options(),  # memory mode, quantization, fast path, acceleration levels
        fuse=adapter_to_fuse(settings, weights_dir),
    )
    announce(editor.capabilities(), settings, weights_dir)
    return editor


def announce(caps: dict, settings: Settings, weights_dir: Path) -> None:
    """Log what this server will refuse or do differently from fal, once, at start-up."""
    if caps["fused_adapter"]:
        log.warning(
            "the %r adapter is fused into the weights (FLUX2_PROFILES=%s): profiles that need the base weights "
            "answer 503 here; FLUX2_FUSE_ADAPTER=0 keeps it unfused",
            caps["fused_adapter"],
            settings.profiles,
        )
    if not caps["prompt_expansion"]:
        log.warning(
            "prompt expansion is not available on this server (%s): requests asking for it say so in 'notices'",
            caps.get("prompt_expansion_unavailable"),
        )
    if settings.disable_safety_checker:
        log.warning(
            "the safety checker is TURNED OFF by configuration: outputs are not checked; requests with "
            "enable_safety_checker get has_nsfw_concepts false and a notice saying so"
        )
    elif not caps["safety_checker"]:
        log.warning(
            "NO SAFETY CHECKER: none at %s (set FLUX2_SAFETY_CHECKER=DIR): requests with enable_safety_checker "
            "true (the default) answer 503; FLUX2_DISABLE_SAFETY_CHECKER=1 serves them unchecked",
            settings.safety_checker or Path(weights_dir) / "safety_checker",
        )
    for name, info in caps["profiles"].items():
        if info["distilled_adapter"] and not info["distilled_adapter_loaded"]:
            if settings.allow_undistilled:
                log.warning(
                    "%s: distilled adapter missing (%s); running it on the BASE weights at %s steps, as allowed "
                    "by --allow-undistilled / FLUX2_ALLOW_UNDISTILLED",
                    name,
                    info["distilled_adapter_file"],
                    info["steps"],
                )
            else:
                log.warning("%s: answers 503: missing %s", name, info["distilled_adapter_file"])
