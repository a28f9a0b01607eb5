"""Where output files (and files uploaded through the storage emulation) are kept, configured by one URL.

- none (default): `<data_dir>/files` on this machine, served by this server under /files/.
- `file:///mnt/flux2-files`: a directory shared by every front-end and worker (NFS, a mounted volume), served
  by each front-end under /files/.
- `s3://bucket/prefix?endpoint_url=http://minio:9000&region=us-east-1&urls=presigned`: an S3-compatible bucket
  (AWS S3, MinIO, Ceph RGW...) through boto3, credentials from boto3's usual chain (AWS_ACCESS_KEY_ID... or
  ~/.aws). `urls=presigned` (default) returns presigned GET URLs valid for the retention period (at most 7 days,
  SigV4's limit), fetched straight from the bucket; `urls=proxy` returns `{public_url}/files/NAME`, which the
  front-ends stream from the bucket (for clients that can't reach the bucket).
"""

from __future__ import annotations

import mimetypes
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable
from urllib.parse import parse_qs, urlsplit

MAX_PRESIGN_S = 7 * 24 * 3600  # SigV4 presigned URLs live at most a week
CHUNK_BYTES = 1024 * 1024  # a stored file is read (served, or read back as an input) this much at a time


@dataclass
class StoredFile:
    """A stored file opened for reading: its size known before any byte is read, its bytes a chunk at a time."""

    size: int
    content_type: str
    chunks: Iterator[bytes]
    close: Callable[[], None]  # call when done, read to the end or not

    def read(self, max_bytes: int) -> bytes | None:
        """All its bytes, or None (and nothing more read) once they pass `max_bytes`; closes the file."""
        try:
            if self.size > max_bytes:
                return None
            data = bytearray()
            for chunk in self.chunks:
                data += chunk
                if len(data) > max_bytes:  # it grew since it was opened
                    return None
            return bytes(data)
        finally:
            self.close()


@runtime_checkable
class FileStorage(Protocol):
    @property
    def local_dir(self) -> Path | None:
        """Set: the files are this directory's, served under /files/ as static files."""

    def put(self, name: str, data: bytes, content_type: str) -> None: ...

    def url(self, name: str, base_url: str) -> str:
        """The URL a client fetches the file from; `base_url` is the front-end's public URL."""

    def get(self, name: str) -> tuple[bytes, str] | None:
        """(bytes, content type), or None if there is no such file."""

    def open(self, name: str) -> StoredFile | None:
        """The file opened for reading in chunks, or None if there is no such file."""

    def sweep(self, older_than: float) -> int:
        """Delete files last written before this time; returns how many."""

    def delete(self, name: str) -> None:
        """Delete one file (nothing if there is none): the output of a run whose result was not recorded."""


class LocalStorage:
    def __init__(self, directory: Path):
        self.local_dir = directory
        directory.mkdir(parents=True, exist_ok=True)

    def put(self, name: str, data: bytes, content_type: str) -> None:
        """Written under a temporary name, then renamed: a full disk leaves no truncated file under `name`."""
        partial = self.local_dir / f".{name}.partial"
        try:
            with partial.open("wb") as out:
                out.write(data)
            os.replace(partial, self.local_dir / name)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise

    def url(self, name: str, base_url: str) -> str:
        return f"{base_url.rstrip('/')}/files/{name}"

    def get(self, name: str) -> tuple[bytes, str] | None:
        path = self.local_dir / name
        if "/" in name or not path.is_file():
            return None
        return path.read_bytes(), mimetypes.guess_type(name)[0] or "application/octet-stream"

    def open(self, name: str) -> StoredFile | None:
        path = self.local_dir / name
        if "/" in name or not path.is_file():
            return None
        file = path.open("rb")
        content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        chunks = iter(lambda: file.read(CHUNK_BYTES), b"")
        return StoredFile(path.stat().st_size, content_type, chunks, file.close)

    def delete(self, name: str) -> None:
        if "/" not in name:
            (self.local_dir / name).unlink(missing_ok=True)

    def sweep(self, older_than: float) -> int:
        old = [f for f in self.local_dir.iterdir() if f.is_file() and f.stat().st_mtime < older_than]
        for path in old:
            path.unlink(missing_ok=True)
        return len(old)


class S3Storage:
    local_dir = None

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        urls: str = "presigned",
        presign_expires_s: float = MAX_PRESIGN_S,
    ):
        import boto3
        from botocore.config import Config

        if urls not in ("presigned", "proxy"):
            raise ValueError(f"urls={urls!r}: use presigned or proxy")
        self.bucket, self.prefix, self.urls = bucket, prefix.strip("/"), urls
        self.presign_expires_s = int(min(presign_expires_s, MAX_PRESIGN_S))
        self.client = boto3.client(
            "s3", endpoint_url=endpoint_url, region_name=region, config=Config(signature_version="s3v4")
        )

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def put(self, name: str, data: bytes, content_type: str) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(name), Body=data, ContentType=content_type)

    def url(self, name: str, base_url: str) -> str:
        if self.urls == "proxy":
            return f"{base_url.rstrip('/')}/files/{name}"
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._key(name)}, ExpiresIn=self.presign_expires_s
        )

    def get(self, name: str) -> tuple[bytes, str] | None:
        try:
            reply = self.client.get_object(Bucket=self.bucket, Key=self._key(name))
        except self.client.exceptions.NoSuchKey:
            return None
        return reply["Body"].read(), reply.get("ContentType") or "application/octet-stream"

    def open(self, name: str) -> StoredFile | None:
        try:
            reply = self.client.get_object(Bucket=self.bucket, Key=self._key(name))
        except self.client.exceptions.NoSuchKey:
            return None
        body = reply["Body"]
        content_type = reply.get("ContentType") or "application/octet-stream"
        return StoredFile(int(reply["ContentLength"]), content_type, body.iter_chunks(CHUNK_BYTES), body.close)

    def delete(self, name: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(name))

    def sweep(self, older_than: float) -> int:
        removed = 0
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=f"{self.prefix}/" if self.prefix else ""
        )
        for page in pages:
            old = [{"Key": o["Key"]} for o in page.get("Contents", []) if o["LastModified"].timestamp() < older_than]
            if old:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": old, "Quiet": True})
                removed += len(old)
        return removed


def open_storage(url: str | None, data_dir: Path, retention_s: float) -> FileStorage:
    if not url:
        return LocalStorage(data_dir / "files")
    parts = urlsplit(url)
    if parts.scheme == "file":
        return LocalStorage(Path(parts.path))
    if parts.scheme == "s3":
        options = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        unknown = set(options) - {"endpoint_url", "region", "urls"}
        if unknown:
            raise ValueError(f"unknown storage option(s) {sorted(unknown)} in {url!r}")
        return S3Storage(parts.netloc, parts.path, presign_expires_s=retention_s, **options)
    raise ValueError(f"unknown storage URL {url!r}: use file:///DIR or s3://BUCKET/PREFIX?endpoint_url=...")
