"""The model as this process runs it: FLUX.2 loaded with the configured safety checker, what it can't do said
plainly at start-up, and its lifecycle (`Model`: loading, loaded, failed, or run elsewhere). Shared by `serve`
(server.http.app) and `worker` (server.cli.worker)."""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable
from pathlib import Path

from pipelines import PROFILES, Flux2Editor, load_editor
from pipelines.capabilities import Capabilities
from pipelines.editor import LoadProgress
from server.config import Settings
from server.errors import Unavailable
from server.service.runner import ModelRunner
from weights.layout import ADAPTERS

log = logging.getLogger(__name__)


class ModelState(enum.StrEnum):
    """The model's lifecycle in this process; the values are what /health and /ready say."""

    LOADING = "loading"
    LOADED = "loaded"
    FAILED = "failed"
    ELSEWHERE = "none"  # an API front-end: `flux2-server worker` processes run the model


class Model:
    """The model's lifecycle: LOADING until `load` settles it as LOADED (with its runner) or FAILED (with why);
    ELSEWHERE on an API front-end, which never loads one."""

    def __init__(self, state: ModelState = ModelState.LOADING):
        self.state = state
        self.error: str | None = None
        self.progress: LoadProgress | None = None  # while LOADING: the load's last stage (for /health)
        self._runner: ModelRunner | None = None
        self._settled = asyncio.Event()
        if state is not ModelState.LOADING:
            self._settled.set()

    @property
    def runner(self) -> ModelRunner:
        if self._runner is None:
            raise Unavailable(f"The model is {self.state.value}" + (f": {self.error}" if self.error else ""))
        return self._runner

    def loaded(self, runner: ModelRunner) -> None:
        self._runner, self.state = runner, ModelState.LOADED
        self._settled.set()

    def failed(self, error: str) -> None:
        self.error, self.state = error, ModelState.FAILED
        self._settled.set()

    async def load(self, settings: Settings, weights_dir: Path) -> None:
        """Load in a thread (the event loop keeps serving /health meanwhile); a failure is kept, not raised."""
        try:
            if settings.gpus is not None:  # several devices: replicas or context-parallel groups
                runner: ModelRunner = await asyncio.to_thread(load_replicas, settings, weights_dir)
            else:
                editor = await asyncio.to_thread(load_model, settings, weights_dir, self._loading)
                runner = ModelRunner(editor, settings.job_timeout_s)
        except Exception as exc:
            log.exception("the model failed to load from %s: /health and /ready answer 503", weights_dir)
            self.failed(f"{type(exc).__name__}: {exc}")
            return
        self.loaded(runner)

    def _loading(self, progress: LoadProgress) -> None:  # on the loading thread: one attribute, swapped whole
        self.progress = progress

    async def ready(self) -> ModelRunner:
        """The runner, once loaded; requests that arrive while it loads wait. Unavailable (503) if it failed."""
        await self._settled.wait()
        if self.state is ModelState.FAILED:
            raise Unavailable(f"The model failed to load: {self.error}")
        return self.runner

    async def settled(self) -> None:
        await self._settled.wait()

    def shutdown(self) -> None:
        if self._runner is not None:
            self._runner.shutdown()


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
    (name,) = needed
    return name if name is not None and ADAPTERS[name].path(weights_dir).is_file() else None


def load_model(
    settings: Settings, weights_dir: Path, on_progress: Callable[[LoadProgress], None] | None = None
) -> Flux2Editor:
    editor = load_editor(
        weights_dir,
        settings.device,
        settings.dtype,
        settings.safety_checker_dir(weights_dir),
        settings.safety_threshold,
        settings.runtime_options(),  # memory mode, quantization, fast path, acceleration levels
        fuse=adapter_to_fuse(settings, weights_dir),
        on_progress=on_progress,
    )
    announce(editor.capabilities(), settings, weights_dir)
    return editor


def load_replicas(settings: Settings, weights_dir: Path) -> ModelRunner:
    """`--gpus`: one model per GPU or per group of GPUs, each in its own process(es), used as one runner."""
    from server.service.replicas import ReplicaRunner, load_groups

    editors = load_groups(settings, weights_dir, adapter_to_fuse(settings, weights_dir))
    announce(editors[0].capabilities(), settings, weights_dir)
    return ReplicaRunner(editors, settings.job_timeout_s)


def announce(caps: Capabilities, settings: Settings, weights_dir: Path) -> None:
    """Log what this server will refuse or do differently from fal, once, at start-up."""
    if caps.fused_adapter:
        log.warning(
            "the %r adapter is fused into the weights (FLUX2_PROFILES=%s): profiles that need the base weights "
            "answer 503 here; FLUX2_FUSE_ADAPTER=0 keeps it unfused",
            caps.fused_adapter,
            settings.profiles,
        )
    if not caps.prompt_expansion:
        log.warning(
            "prompt expansion is not available on this server (%s): requests asking for it say so in 'notices'",
            caps.prompt_expansion_unavailable,
        )
    if settings.disable_safety_checker:
        log.warning(
            "the safety checker is TURNED OFF by configuration: outputs are not checked; requests with "
            "enable_safety_checker get has_nsfw_concepts false and a notice saying so"
        )
    elif not caps.safety_checker:
        log.warning(
            "NO SAFETY CHECKER: none at %s (set FLUX2_SAFETY_CHECKER=DIR): requests with enable_safety_checker "
            "true (the default) answer 503; FLUX2_DISABLE_SAFETY_CHECKER=1 serves them unchecked",
            settings.safety_checker or Path(weights_dir) / "safety_checker",
        )
    for name, info in caps.profiles.items():
        if info.undistilled:
            if settings.allow_undistilled:
                log.warning(
                    "%s: distilled adapter missing (%s); running it on the BASE weights at %s steps, as allowed "
                    "by --allow-undistilled / FLUX2_ALLOW_UNDISTILLED",
                    name,
                    info.distilled_adapter_file,
                    info.steps,
                )
            else:
                log.warning("%s: answers 503: missing %s", name, info.distilled_adapter_file)
