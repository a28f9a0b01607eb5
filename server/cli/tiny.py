"""The tiny random-weight FLUX.2, built on first use into the user's cache (serve, worker and edit without
weights on a machine without a GPU)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock

TINY_CACHE_VERSION = "v3"  # bump when weights.tiny changes what it builds


def tiny_cache_dir() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "flux2-server" / f"tiny-{TINY_CACHE_VERSION}"


def ensure_tiny(directory: Path | None = None) -> Path:
    """The tiny model's directory, built on first use (into a temporary directory, then moved into place)."""
    from weights.tiny import build_tiny
    from weights.verify import verify

    directory = directory or tiny_cache_dir()
    if verify(directory).ok:
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    # Several processes may ask at once (test workers, a server and a benchmark): one builds, the others wait
    # for it and then find the cache good; nobody deletes a directory another process has just put in place.
    with FileLock(directory.parent / f".{directory.name}.lock"):
        if verify(directory).ok:
            return directory
        staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=directory.parent))
        build_tiny(staging)
        shutil.rmtree(directory, ignore_errors=True)
        staging.rename(directory)
    return directory
