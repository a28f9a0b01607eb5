"""Prometheus metrics (prometheus-client), one registry per app, served at GET /metrics.

Counted as they happen: finished requests by endpoint, mode (sync or queue) and outcome; end-to-end latency
(a queued request from submit to result, a sync one from its body being read to its answer); the time of each
denoising step. Read at scrape time from the process's own objects: queue depth (`store.queued_count()`), model calls
waiting (`runner.waiting`), whether the model is loaded, and, when the model is on a CUDA device, that device's
memory (allocated and reserved by torch, free and total on the device).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from server.service.model import Model, ModelState
from server.service.replicas import ReplicaRunner

# Seconds. Steps of FLUX.2 [dev] run ~0.1 s (H100, 1 MP) to minutes (the tiny model on a CPU is ~0.05 s).
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
REQUEST_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800)


class Metrics:
    def __init__(self, model: Model, queued: Callable[[], int] | None = None):
        self.registry = CollectorRegistry()
        self.jobs = Counter(
            "flux2_jobs",
            "Requests finished, by endpoint, mode (sync or queue) and outcome (ok, or the error type).",
            ["endpoint", "mode", "outcome"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "flux2_request_seconds",
            "End-to-end latency of finished requests: queue mode from submit to result, sync mode the call.",
            ["endpoint", "mode"],
            buckets=REQUEST_BUCKETS,
            registry=self.registry,
        )
        self.step_seconds = Histogram(
            "flux2_step_seconds",
            "Time of one denoising step (interval between consecutive steps; step 1, which includes prompt "
            "encoding, is not observed).",
            ["profile"],
            buckets=STEP_BUCKETS,
            registry=self.registry,
        )
        self.loras = Counter(
            "flux2_loras",
            "LoRAs applied to requests, by whether their file was already loaded (cache hit) or loaded for it (miss).",
            ["cache"],
            registry=self.registry,
        )
        self.registry.register(LiveState(model, queued))

    def job_finished(self, endpoint: str, mode: str, outcome: str, seconds: float) -> None:
        self.jobs.labels(endpoint, mode, outcome).inc()
        self.request_seconds.labels(endpoint, mode).observe(seconds)

    def loras_applied(self, loras, loaded: int) -> None:
        """A request ran with `loras` (pipelines.loras.LoraFile), `loaded` of them loaded for it."""
        distinct = len({lora.digest for lora in loras})
        if distinct:
            self.loras.labels("hit").inc(distinct - loaded)
            self.loras.labels("miss").inc(loaded)

    def step_clock(self, profile: str) -> StepClock:
        return StepClock(self.step_seconds.labels(profile))


class StepClock:
    """Observes the interval between consecutive `tick()`s (called from the model's step callback)."""

    def __init__(self, histogram):
        self._histogram = histogram
        self._last: float | None = None

    def tick(self) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self._histogram.observe(now - self._last)
        self._last = now


class LiveState:
    """A custom collector: values read from the app at scrape time rather than kept up to date by hand."""

    def __init__(self, model: Model, queued: Callable[[], int] | None):
        self.model = model
        self.queued = queued  # the queue's depth, where this process has a queue to show

    def collect(self):
        if self.queued is not None:
            yield _gauge("flux2_queue_depth", "Queued requests not started yet.", self.queued())
        loaded = self.model.state is ModelState.LOADED
        yield _gauge("flux2_model_loaded", "1 once the model is loaded and serving, else 0.", int(loaded))
        if not loaded:
            return
        runner = self.model.runner
        yield _gauge(
            "flux2_model_calls_waiting",
            "Edits handed to the model and not finished, the running one included.",
            runner.waiting,
        )
        if isinstance(runner, ReplicaRunner):  # --gpus: each replica's state (its memory is in its own process)
            yield from _replicas(runner)
            return
        device = runner.editor.device
        if device.type == "cuda":
            yield from _cuda_memory(device)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


LABELS = ["replica", "devices"]  # the replica's index (CPU replicas share the device name "cpu") and its devices


def _replicas(runner: ReplicaRunner):
    described = runner.describe()
    families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
        "busy": GaugeMetricFamily("flux2_replica_busy", "1 while the replica runs an edit.", labels=LABELS),
        "ready": GaugeMetricFamily("flux2_replica_ready", "1 once the replica's model is loaded.", labels=LABELS),
        "restarts": CounterMetricFamily(
            "flux2_replica_restarts", "Times the replica's processes were restarted after one failed.", labels=LABELS
        ),
    }
    for index, replica in enumerate(described):
        for name, family in families.items():
            family.add_metric([str(index), ",".join(replica["devices"])], int(replica[name]))
    yield from families.values()


def _cuda_memory(device):
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    values = {
        "allocated": ("Bytes of tensors torch holds on the device.", torch.cuda.memory_allocated(index)),
        "reserved": ("Bytes torch's caching allocator holds on the device.", torch.cuda.memory_reserved(index)),
        "free": ("Bytes free on the device (all processes).", free),
        "total": ("Bytes of memory on the device.", total),
    }
    for kind, (documentation, value) in values.items():
        family = GaugeMetricFamily(f"flux2_gpu_memory_{kind}_bytes", documentation, labels=["device"])
        family.add_metric([f"cuda:{index}"], value)
        yield family
