"""Output images: encode in the requested format, then store under the data directory or inline as data URIs."""

from __future__ import annotations

import base64
import io
import uuid
from pathlib import Path

import PIL.Image

from server.schemas import ImageFile

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
SAVE_OPTIONS = {"png": {}, "jpeg": {"quality": 95}, "webp": {"quality": 95}}


def encode(image: PIL.Image.Image, output_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=output_format.upper(), **SAVE_OPTIONS[output_format])
    return buffer.getvalue()


class OutputStore:
    """Writes output files to `<data_dir>/files`, served by the app under /files/."""

    def __init__(self, data_dir: Path):
        self.files_dir = data_dir / "files"
        self.files_dir.mkdir(parents=True, exist_ok=True)

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
                (self.files_dir / name).write_bytes(data)
                url = f"{base_url.rstrip('/')}/files/{name}"
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
