"""A request's `loras` made ready for the model: each entry's file found, size-checked and hashed.

`path` is one of:
- an `http(s)://` URL (or a `data:` URI): fetched as input images are (server/service/inputs.py: the SSRF guard,
  redirect and time limits), no larger than FLUX2_MAX_LORA_BYTES; this server's own `/files/` URLs (files uploaded
  through the storage emulation) are read from its storage, not fetched;
- otherwise, the name of a `.safetensors` file in the operator's LoRA library (FLUX2_LORA_DIR): `style`,
  `style.safetensors` or `clients/acme/style`; a folder holding exactly one `.safetensors` file names that file (so a
  Hugging Face repository copied in as `owner/repo/` is found by its repo id). A name is read only below the library
  folder: absolute names and `..` are refused.

Fetched bytes are written to a scratch file of this request under `<data_dir>/lora-downloads/` (the model loads
LoRAs from files), removed once the request is done (`discard`); library files are read where they are. Each file
is known by its sha256, so the model loads the same bytes once however they came (pipelines.loras). Every error is
a 422 naming the entry: `loras[1].path`.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from pathlib import Path, PurePosixPath

import httpx

from pipelines.loras import LoraFile, sha256_of
from server.config import Settings
from server.errors import InputError
from server.schemas import LoRAInput
from server.service.inputs import InputLimits, LocalFiles, fetch, short

SCRATCH_DIR = "lora-downloads"
SUFFIX = ".safetensors"
URL_SCHEMES = ("http", "https", "data")
_digests: dict[tuple[str, int, int], str] = {}  # (library file, size, mtime_ns) -> sha256: hashed once


def entry_error(index: int, path: str, msg: str, type_: str) -> InputError:
    return InputError(["loras", index, "path"], msg, type_, short(path))


def library_file(library: Path | None, name: str, index: int, max_bytes: int) -> Path:
    """The library file `name` names; a 422 naming the entry if there is none (or the name leaves the folder)."""
    if library is None:
        raise entry_error(
            index,
            name,
            "Not an http(s) URL, and this server has no LoRA library to look the name up in (FLUX2_LORA_DIR). This "
            "server downloads nothing from model hubs: pass the file's URL, upload it, or ask the operator to add "
            "it to the library.",
            "lora_not_found",
        )
    parts = PurePosixPath(name.replace("\\", "/"))
    if not name.strip() or parts.is_absolute() or ".." in parts.parts:
        raise entry_error(index, name, "A LoRA name must be a relative name inside the LoRA library.", "lora_not_found")
    try:
        return _find(library, parts, name, index, max_bytes)
    except OSError as exc:  # a name the file system refuses (too long, say): not in the library
        raise entry_error(
            index, name, f"No LoRA named {short(name, 100)!r} in this server's LoRA library.", "lora_not_found"
        ) from exc


def _find(library: Path, parts: PurePosixPath, name: str, index: int, max_bytes: int) -> Path:
    candidate = library / parts
    if candidate.is_dir():
        found = sorted(candidate.glob("*" + SUFFIX))
        if len(found) != 1:
            listed = ", ".join(p.name for p in found[:5]) or "none"
            raise entry_error(
                index,
                name,
                f"The library folder {short(name, 100)!r} holds {len(found)} .safetensors files ({listed}): name one.",
                "lora_not_found",
            )
        candidate = found[0]
    elif not candidate.is_file() and candidate.suffix != SUFFIX:
        candidate = candidate.with_name(candidate.name + SUFFIX)
    if not candidate.is_file():
        raise entry_error(
            index, name, f"No LoRA named {short(name, 100)!r} in this server's LoRA library.", "lora_not_found"
        )
    if candidate.suffix != SUFFIX:
        raise entry_error(index, name, "Only .safetensors LoRA files are read.", "invalid_lora")
    if candidate.stat().st_size > max_bytes:
        raise entry_error(index, name, f"The file is larger than {max_bytes} bytes.", "file_too_large")
    return candidate


def library_digest(path: Path) -> str:
    """sha256 of a library file, computed once per (file, size, modification time)."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _digests:
        _digests[key] = sha256_of(path)
    return _digests[key]


def write_scratch(directory: Path, data: bytes) -> tuple[Path, str]:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{uuid.uuid4().hex}{SUFFIX}"
    partial = path.with_suffix(".partial")
    partial.write_bytes(data)
    os.replace(partial, path)
    return path, hashlib.sha256(data).hexdigest()


async def resolve_loras(
    entries: list[LoRAInput], http: httpx.AsyncClient, local: LocalFiles, settings: Settings
) -> tuple[list[LoraFile], list[Path]]:
    """Each entry's file, hashed, with its scale; and the scratch files written (for `discard` when done)."""
    limits = InputLimits(settings.max_lora_bytes, 0, settings.lora_fetch_timeout_s)
    scratch_dir = settings.data_dir / SCRATCH_DIR
    written: list[Path] = []

    async def one(index: int, entry: LoRAInput) -> LoraFile:
        path = entry.path.strip()
        scheme = path.partition(":")[0].lower() if ":" in path else ""  # parsed (and refused) by `fetch`
        if scheme in URL_SCHEMES:
            try:
                data = await fetch(http, path, index, limits, local)
            except InputError as exc:  # the image fetcher names image_urls[index]: name the entry instead
                raise entry_error(index, path, exc.detail["msg"], exc.error_type) from exc
            writing = asyncio.ensure_future(asyncio.to_thread(write_scratch, scratch_dir, data))
            try:
                file, digest = await asyncio.shield(writing)
            except asyncio.CancelledError:  # the request let go meanwhile: the thread writes on, its file removed then
                writing.add_done_callback(_discard_written)
                raise
            written.append(file)
        elif "://" in path:
            raise entry_error(
                index, path, f"Unsupported URL scheme {scheme!r}: LoRA URLs are http or https.", "invalid_url"
            )
        else:
            file = await asyncio.to_thread(library_file, settings.lora_dir, path, index, settings.max_lora_bytes)
            digest = await asyncio.to_thread(library_digest, file)
        return LoraFile(digest, file, entry.scale, index)

    try:
        results = await asyncio.gather(*(one(i, e) for i, e in enumerate(entries)), return_exceptions=True)
    except asyncio.CancelledError:  # a prefetched request cancelled, or a head start let go: its files go too
        discard(written)
        raise
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:  # every fetch has ended: nothing is written after this
        discard(written)
        raise failed[0]
    return [r for r in results if isinstance(r, LoraFile)], written


def _discard_written(writing: asyncio.Future[tuple[Path, str]]) -> None:
    if not writing.cancelled() and writing.exception() is None:
        discard([writing.result()[0]])


def discard(paths: list[Path]) -> None:
    """Remove a request's scratch files (the model keeps what it loaded from them)."""
    for path in paths:
        path.unlink(missing_ok=True)
