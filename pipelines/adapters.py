"""Distilled LoRA adapters (turbo) on the one loaded transformer, switched per request without copying it.

Each adapter file found under `<weights>/loras/<name>/` (see `weights.layout.ADAPTERS`) is loaded once at
start-up with diffusers' LoRA loader (`Flux2Pipeline.load_lora_weights`, peft underneath) as a named adapter,
*unfused*: the base weights stay as they were loaded, and the adapter's low-rank matrices sit beside them.
A request for a distilled profile enables its adapter; a request with LoRAs (`pipelines.loras`, loaded the same way
when first asked for) enables those at their scales and never the distilled one; any other request disables
adapters. Switching flips peft's per-layer flags and scales: no weight is written, nothing is reloaded or copied.

Why unfused (measured on the tiny model by `benchmarks/adapters.py`, results in `benchmarks/results/`):
- enable/disable is bit-exact both ways: base output with the adapter disabled equals a fresh load of the base
  weights, and adapter output equals a fresh `load_lora_weights`, pixel for pixel; a switch costs well under
  a millisecond.
- fuse/unfuse (`fuse_lora` then `unfuse_lora`) writes W += BA into the base weights and subtracts it back: the
  base weights drift by rounding (the benchmark reports the drift; in bf16 it is larger), so after one turbo
  request the base `edit` output would no longer equal a fresh load, and each switch rewrites every targeted
  weight of the 32B transformer. Keeping a pristine copy to restore from would double that memory.
The price of unfused is the adapter's extra low-rank matmuls on each distilled step; the benchmark measures
it (unfused vs fused step time) so a GPU run can put a number on it.

A process that serves only one adapter's profiles (a worker started with `--profiles turbo,flash`, say) never
needs the base weights, so there the adapter is fused once at load (`fuse_adapter`): W += BA written into the
transformer and the low-rank layers dropped, as diffusers documents for baking a LoRA in, so each step costs a
base step. The base `edit` profile then can't run there, and the server answers it 503 saying why.
"""

from __future__ import annotations

import logging
from pathlib import Path

from weights.layout import ADAPTERS

log = logging.getLogger(__name__)


def load_adapters(pipe, weights_dir: Path) -> dict[str, Path]:
    """Load every adapter present on disk into `pipe`, disabled; returns {name: file} of those loaded."""
    loaded = {}
    for adapter in ADAPTERS.values():
        path = adapter.path(weights_dir)
        if not path.is_file():
            continue
        pipe.load_lora_weights(path.parent, weight_name=path.name, adapter_name=adapter.name, local_files_only=True)
        loaded[adapter.name] = path
        log.info("loaded the %r adapter from %s (unfused; enabled per request)", adapter.name, path)
    if loaded:
        pipe.disable_lora()
    return loaded


def fuse_adapter(pipe, name: str) -> None:
    """Write adapter `name` into the transformer's weights for good and drop every adapter's low-rank layers."""
    pipe.set_adapters([name])
    pipe.fuse_lora(components=["transformer"], lora_scale=1.0, adapter_names=[name])
    pipe.unload_lora_weights()
    log.info("fused the %r adapter into the transformer: this model runs only its profiles", name)


class AdapterSwitch:
    """Which adapters the transformer runs with: a profile's distilled adapter, or a request's LoRAs with their
    scales (`pipelines.loras`), or none (`use(None)`: the base weights). With `fused`, the transformer *is* that
    adapter's model: it is the only one there is."""

    def __init__(self, pipe, loaded: dict[str, Path], fused: str | None = None):
        self.pipe = pipe
        self.loaded = loaded
        self.fused = fused
        self.active: str | None = fused
        self.active_loras: tuple[tuple[str, float], ...] = ()
        self._known = True  # False once adapters were added or removed: the next `use` sets every layer again

    def forget(self) -> None:
        """Adapters were loaded or deleted (peft may have changed which are active): set them all on the next use."""
        self._known = False

    def use(self, name: str | None, loras: tuple[tuple[str, float], ...] = ()) -> None:
        """Run with distilled adapter `name` (None: none), or with `loras`: (adapter name, scale) pairs."""
        if self.fused is not None:
            if name != self.fused or loras:
                raise ValueError(f"the {self.fused!r} adapter is fused into this model's weights: it runs only that")
            return
        if name is not None and name not in self.loaded:
            raise ValueError(f"adapter {name!r} is not loaded")
        if name is not None and loras:
            raise ValueError("a distilled adapter and request LoRAs are not combined")
        if self._known and (name, loras) == (self.active, self.active_loras):
            return
        if name is not None:
            self.pipe.set_adapters([name])
            self.pipe.enable_lora()
        elif loras:
            self.pipe.set_adapters([adapter for adapter, _ in loras], [scale for _, scale in loras])
            self.pipe.enable_lora()
        else:
            self.pipe.disable_lora()
        self.active, self.active_loras, self._known = name, loras, True
