"""Output images: encode in the requested format, then keep them in the file storage or inline as data URIs.

The encoders were chosen by measurement (`python -m benchmarks.encoders`: one 1024x1024 photo-like image, results in
benchmarks/results/encoders.json and README "Output encoding"):

- PNG (fal's default format, up to 4 per request): fpng (`fpng` on PyPI, a binding of Rich Geldreich's fpng) by
  default, ~20x faster than Pillow's zlib at level 1 and ~40x than at Pillow's default level 6, for files the size of
  level 1's (~14 % larger than level 6's). Lossless like any PNG: it decodes to the same pixels (tests check it).
  `FLUX2_PNG_ENCODER=pillow` writes with Pillow at `FLUX2_PNG_COMPRESS_LEVEL` instead (smaller files, slower);
  level 1 by default, half of level 6's time for a few percent more bytes.
- JPEG: Pillow (libjpeg-turbo), quality 95: already ~45x faster than a level-6 PNG; simplejpeg and OpenCV were
  slower.
- WebP: Pillow (libwebp), quality 95, `method=0` (the encoder's fastest effort): about twice as fast as its default
  `method=4`, for files of about the same size and PSNR on this image.
"""

from __future__ import annotations

import base64
import io
import shutil
import uuid
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

import fpng
import PIL.Image

from server.errors import InsufficientStorage
from server.files.storage import FileStorage, LocalStorage
from server.schemas import ImageFile

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
SAVE_OPTIONS = {"png": {}, "jpeg": {"quality": 95}, "webp": {"quality": 95, "method": 0}}


@dataclass(frozen=True)
class Encoding:
    """How PNGs are written (FLUX2_PNG_ENCODER, FLUX2_PNG_COMPRESS_LEVEL); JPEG and WebP have one way."""

    png_encoder: str = "fpng"
    png_compress_level: int = 1  # zlib's 0-9, for the Pillow encoder


DEFAULT_ENCODING = Encoding()


def encode(image: PIL.Image.Image, output_format: str, encoding: Encoding = DEFAULT_ENCODING) -> bytes:
    if output_format == "png" and encoding.png_encoder == "fpng":
        # fpng writes 24- and 32-bit PNGs: the model's outputs are RGB
        return fpng.from_pil(image if image.mode in ("RGB", "RGBA") else image.convert("RGB"))
    options = dict(SAVE_OPTIONS[output_format])
    if output_format == "png":
        options["compress_level"] = encoding.png_compress_level
    buffer = io.BytesIO()
    image.save(buffer, format=output_format.upper(), **options)
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

    def __init__(self, data_dir: Path, storage: FileStorage | None = None, encoding: Encoding = DEFAULT_ENCODING):
        self.storage = storage or LocalStorage(data_dir / "files")
        self.files_dir = self.storage.local_dir  # None where the files are not on this machine's disk
        self.encoding = encoding

    def save(
        self,
        images: list[PIL.Image.Image],
        output_format: str,
        base_url: str,
        sync_mode: bool,
        pool: Executor | None = None,
    ) -> list[ImageFile]:
        """Encode each image and write it (with `pool`: the images side by side on its threads); with `sync_mode`
        return data URIs and write nothing. Returns once every file is written."""

        def one(image: PIL.Image.Image) -> ImageFile:
            data = encode(image, output_format, self.encoding)
            name = f"{uuid.uuid4().hex}.{output_format}"
            content_type = CONTENT_TYPES[output_format]
            if sync_mode:
                url = f"data:{content_type};base64,{base64.b64encode(data).decode()}"
            else:
                self.storage.put(name, data, content_type)
                url = self.storage.url(name, base_url)
            return ImageFile(
                url=url,
                content_type=content_type,
                file_name=name,
                file_size=len(data),
                width=image.width,
                height=image.height,
            )

        if pool is None or len(images) < 2:
            return [one(image) for image in images]
        return list(pool.map(one, images))
