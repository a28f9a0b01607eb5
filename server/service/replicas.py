"""Several models in one server (`serve --gpus ...`): one `ModelRunner` per group of GPUs (`pipelines.gpu_groups`),
each over a `pipelines.parallel.ProcessGroupEditor` (the model in its own process or processes), used as one runner.

The dispatcher runs one loop per replica over the same queue, so N replicas run N requests at once. A replica
whose process dies fails its request with `RankFailed`, which the dispatcher treats as a worker failure (the
request is re-queued once); the group restarts by itself and takes requests again once loaded.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import torch

from pipelines import EditCall, EditResult
from pipelines.gpu_groups import GpuGroups, attention_heads, plan_groups
from pipelines.parallel import GroupSpec, ProcessGroupEditor
from server.config import Settings
from server.service.runner import ModelRunner

log = logging.getLogger(__name__)


def plan(settings: Settings, weights_dir: Path) -> GpuGroups:
    """The groups `--gpus`/`--parallel`/`--group-size` ask for on this machine (GpuPlanError: why not). With
    `--device cpu` every index is a CPU process (what the tests run)."""
    assert settings.gpus is not None
    on_cpu = (settings.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cpu")
    if on_cpu:
        requested = [part for part in settings.gpus.split(",") if part.strip()]
        available = 0 if settings.gpus.strip() == "all" else len(requested)
    else:
        available = torch.cuda.device_count()
    return plan_groups(
        settings.gpus,
        available,
        settings.parallel,
        settings.group_size,
        heads=attention_heads(weights_dir),
        memory_mode=settings.memory_mode,
        device_type="cpu" if on_cpu else "cuda",
    )


def load_groups(settings: Settings, weights_dir: Path, fuse: str | None) -> list[ProcessGroupEditor]:
    """Start every group's processes at once (they load side by side), then wait for each to be ready."""
    groups = plan(settings, weights_dir)
    log.info("several devices: %s", groups.describe())
    load = {
        "dtype": settings.dtype,
        "safety_checker": settings.safety_checker_dir(weights_dir),
        "safety_threshold": settings.safety_threshold,
        "options": settings.runtime_options(),
        "fuse": fuse,
    }
    editors = [
        ProcessGroupEditor(GroupSpec(str(weights_dir), devices, load, groups.kind or "ulysses"))
        for devices in groups.groups
    ]
    try:
        for editor in editors:
            editor.wait_ready()
    except BaseException:
        for editor in editors:
            editor.stop()
        raise
    return editors


class ReplicaRunner(ModelRunner):
    """Several runners used as one: `run` takes the first idle replica (a FIFO of idle ones). `editor` is the first
    replica's (their capabilities are the same but for the devices)."""

    def __init__(self, editors: list[ProcessGroupEditor], job_timeout_s: float | None = None):
        self.runners = [ModelRunner(editor, job_timeout_s) for editor in editors]  # type: ignore[arg-type]
        super().__init__(editors[0], job_timeout_s)  # type: ignore[arg-type]
        self._idle: asyncio.Queue[ModelRunner] | None = None
        self.runs = [0] * len(self.runners)  # edits each replica has started

    @property
    def replicas(self) -> int:
        return len(self.runners)

    async def run(self, call: EditCall) -> EditResult:
        if self._idle is None:
            self._idle = asyncio.Queue()
            for runner in self.runners:
                self._idle.put_nowait(runner)
        self.waiting += 1
        try:
            runner = await self._idle.get()
            self.runs[self.runners.index(runner)] += 1
            try:
                return await runner.run(call)
            finally:
                self._idle.put_nowait(runner)
        finally:
            self.waiting -= 1

    def describe(self) -> list[dict]:
        """Each replica for /health: how it runs, its devices, ready, restarts, busy, edits started, its processes."""
        return [
            {**r.editor.describe(), "busy": r.waiting > 0, "runs": runs, "pids": r.editor.pids}  # type: ignore[attr-defined]
            for r, runs in zip(self.runners, self.runs, strict=True)
        ]

    def shutdown(self) -> None:
        super().shutdown()
        for runner in self.runners:
            runner.shutdown()
            runner.editor.stop()  # type: ignore[attr-defined]
