"""Output images: encode in the requested format, then keep them in the file storage or inline as data URIs."""

from __future__ import annotations

import base64
import io
import shutil
import uuid
from pathlib import Path

import PIL.Image

from server.errors import InsufficientStorage
from server.files.storage import FileStorage, LocalStorage
from server.schemas import ImageFile

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
SAVE_OPTIONS = {"png": {}, "jpeg": {"quality": 95}, "webp": {"quality": 95}}


def encode(image: PIL.Image.Image, output_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=output_format.upper(), **SAVE_OPTIONS[output_format])
    return buffer.getvalue()


def check_free_space(directory: Path, floor_bytes: int) -> None:
    """Refuse new work (507) while `directory` (the data directory: the queue, uploads, outputs) has less than
    `floor_bytes` free, so the queue can still record the requests it runs."""
    if floor_bytes <= 0 or not directory.exists():
        return
    free = shutil.disk_usage(directory).free
    if free < floor_bytes:
        raise InsufficientStorage(
            f"The server is low on disk space ({free} bytes free, keeps {floor_bytes}); try again later."
        )


class OutputStore:
    """Writes output files to the file storage (default `<data_dir>/files`, served by the app under /files/)."""

    def __init__(self, data_dir: Path, storage: FileStorage | None = None):
        self.storage = storage or LocalStorage(data_dir / "files")
        self.files_dir = self.storage.local_dir  # None where the files are not on this machine's disk

    def save(
        self, images: list[PIL.Image.Image], output_format: str, base_url: str, sync_mode: bool
    ) -> list[ImageFile]:
        """Encode each image; with `sync_mode` return data URIs and write nothing."""
        files = []
        for image in images:
            data = encode(image, output_format)
            name = f"{uuid.uuid4().hex}.{output_format}"
            content_type = CONTENT_TYPES[output_format]
            if sync_mode:
                url = f"data:{content_type};base64,{base64.b64encode(data).decode()}"
            else:
                self.storage.put(name, data, content_type)
                url = self.storage.url(name, base_url)
            files.append(
                ImageFile(
                    url=url,
                    content_type=content_type,
                    file_name=name,
                    file_size=len(data),
                    width=image.width,
                    height=image.height,
                )
            )
        return files
