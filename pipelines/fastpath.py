"""Fast-path switches for the transformer: attention kernel and regional torch.compile.

Both default off (diffusers' defaults: PyTorch SDPA, eager) until the GPU benchmark (`benchmarks/speed.py`)
shows they pay on FLUX.2 [dev]; each is one setting:

- `attention_backend` (FLUX2_ATTENTION_BACKEND): a diffusers attention backend name, set with
  `transformer.set_attention_backend`: e.g. `_native_cudnn` (cuDNN SDPA, in every CUDA torch), `flash`
  (flash-attn 2, when installed), `_flash_3` (FlashAttention 3, when built), `native`. Backends whose name
  ends in `_hub` download kernels from a hub at run time and are refused: this server never downloads.
- `compile` (FLUX2_COMPILE): diffusers' `compile_repeated_blocks`, which compiles the transformer's repeated
  blocks once each (regional compilation: seconds instead of minutes). `fullgraph` stays off because the cache
  hooks (acceleration) and offload hooks decide per call outside the graph. The first call at a new shape
  pays the compile; the server runs one warm-up call at start-up and reports its time separately
  (capabilities.fast_path.compile_seconds).
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class FastPathError(ValueError):
    """A fast-path setting this machine or install cannot honour, said plainly at start-up."""


def check_attention_backend(name: str | None) -> None:
    if not name:
        return
    from diffusers.models.attention_dispatch import AttentionBackendName

    names = {b.value for b in AttentionBackendName}
    if name not in names:
        raise FastPathError(f"unknown attention backend {name!r}: one of {', '.join(sorted(names))}")
    if name.endswith("_hub"):
        raise FastPathError(
            f"attention backend {name!r} downloads its kernels from a hub at run time; this server never "
            "downloads anything: install the kernel's package instead (e.g. `flash` with flash-attn)"
        )


def set_attention_backend(transformer, name: str | None) -> None:
    """Use diffusers' attention backend `name` for every attention layer (None: leave diffusers' default)."""
    check_attention_backend(name)
    if not name:
        return
    try:
        transformer.set_attention_backend(name)
    except (RuntimeError, ImportError, ValueError) as exc:
        raise FastPathError(f"attention backend {name!r} is not usable here: {exc}") from exc


def compile_transformer(transformer, mode: str | None = None) -> None:
    """Regional compilation of the transformer's repeated blocks (diffusers' compile_repeated_blocks)."""
    kwargs = {"fullgraph": False}
    if mode:
        kwargs["mode"] = mode
    transformer.compile_repeated_blocks(**kwargs)
