"""Copy a Hugging Face snapshot of FLUX.2 [dev] (from a USB disk, say) into a weights directory, checking every byte.

A snapshot in the Hugging Face cache (`models--black-forest-labs--FLUX.2-dev/snapshots/<revision>/`) holds
symlinks into `../../blobs/<name>`, where the blob's name is its checksum: the sha256 of the file for LFS files
(the weights), the git blob sha1 for small files kept in git (configs, tokenizer). A directory made with
`hf download --local-dir` holds the files themselves, with each file's checksum (its etag) in
`.cache/huggingface/download/<path>.metadata`. Either way each file is hashed while it is copied and compared
with that checksum; a mismatch stops the import, naming the file. Files with no reference checksum are copied and
their sha256 recorded. Every copied file's sha256 goes into `<dest>/SHA256SUMS` (`sha256sum -c` format).
The copy is made in a staging folder beside the destination and renamed to it at the end: a failed import leaves
no destination behind.

Only the diffusers layout is copied (`model_index.json`, the component folders, `loras/` and `safety_checker/`
if present): the
repository's other files (e.g. the 64 GB single-file checkpoint `flux2-dev.safetensors`) are left out and listed.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from weights.layout import COMPONENTS, LORAS_DIR, SAFETY_CHECKER_DIR, TINY_MARKER

CHUNK = 8 * 1024 * 1024
INCLUDED_DIRS = (*(c.name for c in COMPONENTS), LORAS_DIR, SAFETY_CHECKER_DIR)  # the last two are optional
INCLUDED_FILES = ("model_index.json", TINY_MARKER)  # the marker is only in the tiny model
SHA256 = re.compile(r"^[0-9a-f]{64}$")
SHA1 = re.compile(r"^[0-9a-f]{40}$")
MANIFEST = "SHA256SUMS"


class ChecksumError(Exception):
    """A file's bytes do not match the checksum its snapshot gives for it."""


@dataclass
class SourceFile:
    relative: Path  # path inside the snapshot (and inside the destination)
    path: Path  # the real file (symlinks resolved)
    size: int
    expected: tuple[str, str] | None  # ("sha256" | "git-sha1", hex digest) from the snapshot, or None


@dataclass
class ImportResult:
    copied: list[tuple[Path, str, str]] = field(default_factory=list)  # (relative path, sha256, how it was checked)
    skipped: list[Path] = field(default_factory=list)  # snapshot files outside the diffusers layout
    total_bytes: int = 0


def snapshot_root(directory: Path) -> Path:
    """The snapshot folder itself, also when given the cache's `models--owner--name` folder above it."""
    snapshots = directory / "snapshots"
    if snapshots.is_dir() and not (directory / "model_index.json").exists():
        ref = directory / "refs" / "main"
        if ref.is_file() and (snapshots / ref.read_text().strip()).is_dir():
            return snapshots / ref.read_text().strip()
        revisions = sorted(p for p in snapshots.iterdir() if p.is_dir())
        if len(revisions) == 1:
            return revisions[0]
        raise ValueError(f"{directory} holds {len(revisions)} snapshots and no refs/main: pass one of {revisions}")
    return directory


def _expected_checksum(snapshot: Path, relative: Path, link: Path) -> tuple[str, str] | None:
    if link.is_symlink():
        target = Path(os.readlink(link))
        name = target.name
        if "blobs" in target.parts:
            if SHA256.match(name):
                return "sha256", name
            if SHA1.match(name):
                return "git-sha1", name
    metadata = snapshot / ".cache" / "huggingface" / "download" / f"{relative}.metadata"
    if metadata.is_file():
        lines = metadata.read_text().splitlines()
        etag = lines[1].strip().strip('"') if len(lines) > 1 else ""
        if SHA256.match(etag):
            return "sha256", etag
        if SHA1.match(etag):
            return "git-sha1", etag
    return None


def plan_import(snapshot: Path) -> tuple[list[SourceFile], list[Path]]:
    """The files to copy (with their reference checksums) and the snapshot files left out."""
    snapshot = snapshot_root(snapshot)
    if not (snapshot / "model_index.json").exists():
        raise ValueError(f"{snapshot} has no model_index.json: not a diffusers snapshot of FLUX.2 [dev]")
    files, skipped = [], []
    for link in sorted(snapshot.rglob("*")):
        relative = link.relative_to(snapshot)
        if relative.parts[0] == ".cache" or link.is_dir():
            continue
        if not (relative.parts[0] in INCLUDED_DIRS and len(relative.parts) > 1) and str(relative) not in INCLUDED_FILES:
            skipped.append(relative)
            continue
        real = link.resolve(strict=True)  # a dangling link (blob not copied to the disk) fails here, by name
        files.append(SourceFile(relative, real, real.stat().st_size, _expected_checksum(snapshot, relative, link)))
    return files, skipped


def copy_checked(source: SourceFile, dest: Path, on_bytes: Callable[[int], None] | None = None) -> str:
    """Copy one file to `dest` (through a temporary name), hashing as it goes; returns its sha256.

    Raises ChecksumError (and leaves nothing at `dest`) when the bytes do not match the snapshot's checksum."""
    sha256 = hashlib.sha256()
    git_sha1 = hashlib.sha1(f"blob {source.size}\0".encode())  # git's object id of a file's content
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    with source.path.open("rb") as reader, partial.open("wb") as writer:
        while chunk := reader.read(CHUNK):
            sha256.update(chunk)
            git_sha1.update(chunk)
            writer.write(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
        writer.flush()
        os.fsync(writer.fileno())
    if source.expected is not None:
        kind, expected = source.expected
        actual = sha256.hexdigest() if kind == "sha256" else git_sha1.hexdigest()
        if actual != expected:
            partial.unlink()
            raise ChecksumError(
                f"{source.relative}: {kind} is {actual}, the snapshot says {expected} (corrupt or incomplete copy)"
            )
    partial.replace(dest)
    return sha256.hexdigest()


def staging_dir(dest: Path) -> Path:
    """Where an import is built before it becomes `dest`: beside it, so the final rename stays on one filesystem."""
    return dest.with_name(f".{dest.name}.importing")


def import_snapshot(
    snapshot: Path, dest: Path, on_bytes: Callable[[int], None] | None = None, plan=None
) -> ImportResult:
    """Copy the diffusers layout of `snapshot` into `dest`, checking each file; writes `dest/SHA256SUMS`.

    The files go into a staging folder beside `dest`, renamed to `dest` once all are copied and checked: a failure
    (a checksum mismatch, an unreadable file, a full disk) removes it and leaves nothing half-made. `dest` must not
    exist yet, or be empty. A staging folder left by an interrupted import is started over."""
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise FileExistsError(f"{dest} already exists and is not empty: import into a new folder")
    files, skipped = plan or plan_import(snapshot)
    result = ImportResult(skipped=skipped, total_bytes=sum(f.size for f in files))
    staging = staging_dir(dest)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        for source in files:
            digest = copy_checked(source, staging / source.relative, on_bytes)
            checked = f"{source.expected[0]} matches" if source.expected else "no reference checksum"
            result.copied.append((source.relative, digest, checked))
        manifest = "".join(f"{digest}  {relative}\n" for relative, digest, _ in result.copied)
        (staging / MANIFEST).write_text(manifest)
        if dest.exists():
            dest.rmdir()  # empty (checked above)
        staging.rename(dest)
    except BaseException:  # also Ctrl-C: nothing half-made stays behind
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return result
