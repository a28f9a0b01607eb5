"""Several GPUs: which GPUs serve, and how they are grouped (`serve --gpus ... [--parallel context]`).

- Replicas (`--parallel none`, the default): one whole model per GPU, each taking requests from the same queue.
  N GPUs run N requests at once: throughput, not latency.
- Context parallel (`--parallel context [--group-size N]`): each group of N GPUs runs one request at a time,
  split across them (`pipelines.parallel`): latency. Groups beside each other are replicas of each other, e.g. 8
  GPUs with groups of 4 run two requests at once, each on 4 GPUs.

`plan_groups` is a pure function of what was asked and what the machine has (or a simulated one: `doctor`); it
refuses combinations that can't run, with the reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.parallel import context_parallel_problem

FLUX2_DEV_ATTENTION_HEADS = 48  # FLUX.2 [dev]'s transformer config: num_attention_heads (x attention_head_dim 128)
PARALLEL_MODES = ("none", "context")


class GpuPlanError(ValueError):
    """A `--gpus` / `--parallel` combination that can't run; the message says why."""


@dataclass(frozen=True)
class GpuGroups:
    groups: list[list[str]]  # each group serves one request at a time; one device per group for replicas
    parallel: str = "none"  # none (replicas) | context
    kind: str | None = None  # ulysses, for context parallel
    notes: list[str] = field(default_factory=list)

    @property
    def devices(self) -> list[str]:
        return [device for group in self.groups for device in group]

    def describe(self) -> str:
        listed = "; ".join(",".join(group) for group in self.groups)
        if self.parallel == "none":
            what = f"{len(self.groups)} replica(s), one model per device, {len(self.groups)} request(s) at once"
        else:
            size = len(self.groups[0])
            what = (
                f"{len(self.groups)} context-parallel group(s) of {size} ({self.kind}), each request split across "
                f"its group, {len(self.groups)} request(s) at once"
            )
        return f"{what}: {listed}" + "".join(f"; {note}" for note in self.notes)

    def to_json(self) -> dict:
        return {
            "parallel": self.parallel,
            "kind": self.kind,
            "groups": self.groups,
            "requests_at_once": len(self.groups),
            "notes": self.notes,
        }


def attention_heads(weights_dir: str | Path | None) -> int:
    """The transformer's attention heads: from `weights_dir/transformer/config.json`, else FLUX.2 [dev]'s."""
    if weights_dir is not None:
        config = Path(weights_dir) / "transformer" / "config.json"
        if config.is_file():
            return int(json.loads(config.read_text())["num_attention_heads"])
    return FLUX2_DEV_ATTENTION_HEADS


def parse_gpus(gpus: str, available: int) -> list[int]:
    """`all` or comma-separated GPU indices (`0,1,2,3`) -> the indices, checked against the `available` count."""
    text = gpus.strip().lower()
    if text == "all":
        if available == 0:
            raise GpuPlanError("--gpus all: no GPU is visible")
        return list(range(available))
    try:
        indices = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise GpuPlanError(f"--gpus takes 'all' or GPU indices like 0,1,2,3; got {gpus!r}") from None
    if not indices:
        raise GpuPlanError(f"--gpus names no GPU: {gpus!r}")
    if len(set(indices)) != len(indices):
        raise GpuPlanError(f"--gpus names a GPU twice: {gpus!r}")
    missing = [i for i in indices if not 0 <= i < available]
    if missing:
        seen = f"{available} visible (0-{available - 1})" if available else "none visible"
        raise GpuPlanError(f"--gpus {gpus}: GPU {missing[0]} is not there ({seen})")
    return indices


def plan_groups(
    gpus: str,
    available: int,
    parallel: str = "none",
    group_size: int | None = None,
    heads: int = FLUX2_DEV_ATTENTION_HEADS,
    kind: str = "ulysses",
    memory_mode: str | None = None,
    device_type: str = "cuda",
) -> GpuGroups:
    """The groups `serve` would run, or GpuPlanError with why not.

    `available` is how many GPUs the machine has (or a simulated one). With `device_type="cpu"` every index is the
    CPU itself (several CPU "devices": what the tests run); the indices are still checked against `available`.
    """
    if parallel not in PARALLEL_MODES:
        raise GpuPlanError(f"--parallel takes one of {', '.join(PARALLEL_MODES)}; got {parallel!r}")
    indices = parse_gpus(gpus, available)
    devices = [f"cuda:{i}" if device_type == "cuda" else device_type for i in indices]
    if memory_mode == "multi-gpu" and len(devices) > 1:
        raise GpuPlanError(
            "the multi-gpu memory mode puts the text encoder on a second GPU; with several --gpus every GPU holds "
            "its own whole model: pick another memory mode (auto, full, or an offload mode)"
        )
    if parallel == "none":
        if group_size not in (None, 1):
            raise GpuPlanError("--group-size applies to --parallel context; replicas are one GPU each")
        return GpuGroups([[device] for device in devices])
    size = group_size or len(devices)
    if size < 2:
        raise GpuPlanError(f"context parallel needs groups of at least 2 GPUs; got {size}")
    if len(devices) % size:
        raise GpuPlanError(f"{len(devices)} GPU(s) don't split into context-parallel groups of {size}")
    problem = context_parallel_problem(kind, size, heads)
    if problem:
        raise GpuPlanError(problem)
    groups = [devices[start : start + size] for start in range(0, len(devices), size)]
    notes = [f"{heads // size} of {heads} attention heads per GPU"]
    return GpuGroups(groups, "context", kind, notes)
