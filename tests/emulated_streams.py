"""CUDA streams and pinned host memory, emulated on the CPU, so diffusers' `use_stream=True` group offloading runs in CI.

diffusers' streamed group offloading (`apply_group_offloading(..., use_stream=True)`) is a different code path from
the unstreamed one: pinned CPU copies of every streamed tensor, a side stream the next block is prefetched on, and
a lazy-prefetch hook that traces the layer order on the first call. Without a GPU it can't run as is, because

- diffusers asks the onload device's backend (`TorchDeviceBackend`) for `Stream`, `current_stream` and `stream`;
- torch's CPU build can't pin memory (`Tensor.pin_memory` raises without an accelerator);
- `apply_group_offloading` refuses `use_stream=True` when the onload device is the CPU, before anything else.

`emulate_streams(monkeypatch)` replaces exactly those three things and nothing below them:

- the backend is `EmulatedBackend`: streams are `EmulatedStream` objects that count their synchronisations, and
  `backend.stream(s)` is a context that records which copies were issued "on" the side stream;
- `Tensor.pin_memory` makes a copy (as the real one does) and remembers its storage as pinned; `is_pinned` answers
  from that record; an already-pinned tensor comes back as itself (torch's documented behaviour);
- the up-front CPU check is passed by applying with a CUDA device (nothing touches it while hooks are installed:
  offloading only swaps tensors to their CPU copies), then pointing every group and config at the CPU. From then
  on every onload, prefetch and offload is diffusers' own code, moving tensors CPU to CPU.

The `StreamLog` it returns says what happened (pinned copies and their bytes, side-stream copies, syncs), and the
live host bytes at the worst moment of a pin (`peak_host_bytes`), for the host-RAM test.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field

import torch
from torch.multiprocessing.reductions import StorageWeakRef

STAND_IN_DEVICE = torch.device("cuda", 0)  # passes diffusers' "streams need an accelerator" check; never used


@dataclass
class StreamLog:
    streams_created: int = 0
    synchronizations: int = 0
    side_stream_entries: int = 0  # `with backend.stream(side):` blocks: each is one (pre)fetch of a group
    pinned: dict[int, tuple[StorageWeakRef, int]] = field(default_factory=dict)  # storage ptr -> (ref, bytes)
    pin_copies: int = 0
    watched: list[tuple[StorageWeakRef, int]] = field(default_factory=list)  # storages to count as host memory
    peak_host_bytes: int = 0

    def is_pinned(self, tensor: torch.Tensor) -> bool:
        storage = tensor.untyped_storage()
        entry = self.pinned.get(storage.data_ptr())
        return entry is not None and not entry[0].expired()

    def live_bytes(self) -> int:
        """Bytes of the watched (pageable) storages and the pinned copies still alive, each storage once."""
        seen: dict[int, int] = {}
        for ref, nbytes in [*self.watched, *self.pinned.values()]:
            if not ref.expired():
                seen[ref.cdata] = nbytes
        return sum(seen.values())

    def watch(self, module: torch.nn.Module) -> None:
        """Count `module`'s current tensors' storages as host memory (without keeping them alive)."""
        for tensor in [*module.parameters(), *module.buffers()]:
            storage = tensor.untyped_storage()
            self.watched.append((StorageWeakRef(storage), storage.nbytes()))


class EmulatedStream:
    def __init__(self, log: StreamLog):
        self.log = log

    def synchronize(self) -> None:
        self.log.synchronizations += 1

    def wait_stream(self, other) -> None:
        self.log.synchronizations += 1


class EmulatedBackend:
    """What diffusers' `TorchDeviceBackend` gives group offloading: Stream, current_stream, stream, synchronize."""

    def __init__(self, log: StreamLog):
        self.log = log
        self.default = EmulatedStream(log)

    def Stream(self) -> EmulatedStream:  # torch.cuda.Stream's name
        self.log.streams_created += 1
        return EmulatedStream(self.log)

    def current_stream(self) -> EmulatedStream:
        return self.default

    @contextlib.contextmanager
    def stream(self, stream: EmulatedStream):
        self.log.side_stream_entries += 1
        yield

    def synchronize(self) -> None:
        self.log.synchronizations += 1


def _group_offloading_hooks(module: torch.nn.Module):
    from diffusers.hooks.group_offloading import _GROUP_OFFLOADING

    for submodule in module.modules():
        registry = getattr(submodule, "_diffusers_hook", None)
        hook = registry.get_hook(_GROUP_OFFLOADING) if registry is not None else None
        if hook is not None:
            yield hook


def emulate_streams(monkeypatch) -> StreamLog:
    from diffusers import hooks
    from diffusers.hooks import group_offloading

    log = StreamLog()
    monkeypatch.setattr(group_offloading, "TorchDeviceBackend", lambda device=None: EmulatedBackend(log))

    def pin_memory(tensor, device=None):
        if log.is_pinned(tensor):
            return tensor
        copy = tensor.detach().clone()  # a pinned copy is a new allocation, as cudaHostAlloc + copy is
        storage = copy.untyped_storage()
        log.pinned[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
        log.pin_copies += 1
        log.peak_host_bytes = max(log.peak_host_bytes, log.live_bytes())
        return copy

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda tensor, device=None: log.is_pinned(tensor))
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda tensor, stream: None)

    real = group_offloading.apply_group_offloading
    signature = inspect.signature(real)

    def apply_group_offloading(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        onload = torch.device(bound.arguments["onload_device"])
        if not (bound.arguments.get("use_stream") and onload.type == "cpu"):
            return real(*args, **kwargs)
        bound.arguments["onload_device"] = STAND_IN_DEVICE
        real(*bound.args, **bound.kwargs)
        for hook in _group_offloading_hooks(bound.arguments["module"]):
            hook.group.onload_device = onload
            hook.config.onload_device = onload
        return None

    # where diffusers' own callers (ModelMixin.enable_group_offload) and this project import it from
    monkeypatch.setattr(hooks, "apply_group_offloading", apply_group_offloading)
    return log
