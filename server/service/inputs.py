"""Input images: fetch `image_urls` (http, https, data URIs) and decode them, naming the URL on any failure.

Hostile inputs are refused before they cost much: http(s) URLs go through the SSRF guard (server/net/guard.py)
with limits on redirects, total time and bytes; data URIs are sized before they are decoded; images are sized
from their header before any pixel is decoded (decompression bombs), and decoded images are brought to RGB the
same way whatever they came as (CMYK, 16-bit, alpha, palette; EXIF orientation applied; first frame of an
animation, with a notice). The server's own output files (its /files/ URLs, storage uploads included) are read
from disk, never fetched over HTTP.

Decoding speed (a 1024x1024 photo-like PNG sent inline, benchmarks/decoders.py): base64 is decoded by pybase64
(SIMD, 0.15 ms against 4.7 ms; its strict mode refuses a few inputs the standard library's `validate=True` takes,
such as `QUJD=`, so a refusal is decoded again by `base64.b64decode`: same bytes and same error messages as
before). Plain PNGs (8-bit RGB or grey, no transparency, no animation, no EXIF/XMP orientation, nothing but IDAT
between the first IDAT and IEND) are decoded by Wuffs (pywuffs; Google's memory-safe decoders, "Wrangling Untrusted
File Formats Safely"): 15.7 ms against Pillow's 33.4 ms, pixel for pixel the same. Every other image, and any PNG
Wuffs refuses, is decoded by Pillow as before, so errors read the same. Wuffs was chosen over pyspng (libspng,
17.3 ms, the next fastest): Wuffs is memory-safe by construction (the bytes are anyone's); it releases the GIL while
it decodes, where pyspng holds it (a Python thread beside a pyspng decode runs at ~20 % of its speed: the event loop
would stall for the whole decode); and it verifies the chunk CRCs and zlib's Adler-32 when asked (pyspng skips CRCs;
wuffs_aux skips both by default, and Pillow refuses a bad Adler-32, so the check is turned on). Its cost: pywuffs is
published as source only, so installing it compiles C++ (g++, ~40 s). Wuffs' decoder objects are not thread-safe:
each decode makes its own (microseconds).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import re
import urllib.parse
from dataclasses import dataclass
from typing import cast

import httpx
import PIL.Image
import PIL.ImageOps
import pybase64
import pywuffs
import pywuffs.aux

from server.errors import InputError
from server.files.storage import FileStorage
from server.net.guard import AddressRefused

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# The only formats decoded: what fal's clients send (and fal's image endpoints write). Pillow tries no other
# plugin, so ICO/ICNS (sized after decoding), EPS (Ghostscript) and the other 40-odd formats are never parsed.
DECODED_FORMATS = ("PNG", "JPEG", "WEBP")
SAFE_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# PNG chunks after which Pillow's pixels are not the stored RGB/grey samples (transparency, APNG frames, EXIF
# orientation): a PNG holding any of them is decoded by Pillow. So are PNGs whose header (as Pillow read it) has
# transparency or may carry an orientation (EXIF or XMP in text chunks).
PILLOW_ONLY_PNG_CHUNKS = frozenset({b"tRNS", b"acTL", b"fcTL", b"fdAT", b"eXIf"})
PILLOW_ONLY_PNG_INFO = ("transparency", "exif", "xmp", "XML:com.adobe.xmp", "Raw profile type exif")
PNG_RGB8_OR_GREY8 = (b"\x08\x02", b"\x08\x00")  # IHDR's bit depth and colour type


def wuffs_png_config() -> pywuffs.aux.ImageDecoderConfig:
    """PNG only, to 8-bit RGB, checksums verified (wuffs_aux skips PNG checksums by default; Pillow checks zlib's)."""
    config = pywuffs.aux.ImageDecoderConfig()
    config.enabled_decoders = [pywuffs.ImageDecoderType.PNG]
    config.pixel_format = pywuffs.PixelFormat.RGB
    config.quirks = {pywuffs.ImageDecoderQuirks.IGNORE_CHECKSUM: 0}
    return config


WUFFS_PNG = wuffs_png_config()  # read-only: each decode builds its own decoder from it


@dataclass(frozen=True)
class InputLimits:
    max_bytes: int  # per image, after transfer decoding (http) or base64 decoding (data URIs)
    max_pixels: int  # width x height, read from the image header before decoding
    timeout_s: float  # per URL, all redirects and the whole body included


@dataclass(frozen=True)
class LocalFiles:
    """This server's own files: URLs under `<base_url>/files/` are read from its file storage, not fetched."""

    base_url: str
    storage: FileStorage

    def name_for(self, url: str) -> str | None:
        """The stored file's name for one of this server's /files/ URLs, or None for any other URL."""
        prefix = self.base_url.rstrip("/") + "/files/"
        if not url.startswith(prefix):
            return None
        name = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rpartition("/files/")[2])
        return name if SAFE_FILE_NAME.fullmatch(name) else ""  # "": never a file the server wrote (not found)


def short(url: str, limit: int = 120) -> str:
    """A URL as error messages show it: data URIs and long URLs cut, so errors never echo megabytes."""
    return url if len(url) <= limit else url[:limit] + f"... ({len(url)} characters)"


def url_error(index: int, url: str, msg: str, type_: str) -> InputError:
    """A 422 naming `image_urls[index]`, the URL (shortened) and why it can't be used."""
    return InputError(["image_urls", index], msg, type_, short(url))


def decode_data_uri(url: str, index: int, max_bytes: int) -> bytes:
    """Bytes of a `data:[<media type>][;base64],<data>` URI (RFC 2397), refused before decoding if too large."""
    header, sep, payload = url.partition(",")
    if not sep:
        raise url_error(index, url, "Invalid data URI: no ',' before the data.", "invalid_data_uri")
    is_base64 = header.endswith(";base64")
    if (len(payload) * 3 // 4 if is_base64 else len(payload) // 3) > max_bytes:
        raise url_error(index, url, f"The data URI holds more than {max_bytes} bytes.", "file_too_large")
    if is_base64:
        try:
            data = pybase64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            try:  # pybase64 is stricter on padding: the standard library decides, and names the error as before
                data = base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise url_error(index, url, f"Invalid base64 in data URI: {exc}", "invalid_data_uri")
    else:
        data = urllib.parse.unquote_to_bytes(payload)
    if len(data) > max_bytes:
        raise url_error(index, url, f"The data URI holds more than {max_bytes} bytes.", "file_too_large")
    return data


def read_local(local: LocalFiles, name: str, url: str, index: int, max_bytes: int) -> bytes:
    """One of this server's own files, sized before it is read and read no further than `max_bytes`."""
    found = local.storage.open(name) if name else None
    if found is None:
        raise url_error(
            index, url, "Failed to download the file: no such file on this server (HTTP 404).", "file_download_error"
        )
    data = found.read(max_bytes)
    if data is None:
        raise url_error(index, url, f"The file is larger than {max_bytes} bytes.", "file_too_large")
    return data


async def download(client: httpx.AsyncClient, url: str, index: int, limits: InputLimits) -> bytes:
    too_large = f"The file is larger than {limits.max_bytes} bytes."
    try:
        async with asyncio.timeout(limits.timeout_s):
            async with client.stream("GET", url) as response:
                if response.status_code >= 400:
                    raise url_error(
                        index,
                        url,
                        f"Failed to download the file: the server answered HTTP {response.status_code}.",
                        "file_download_error",
                    )
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > limits.max_bytes:
                    raise url_error(index, url, too_large, "file_too_large")
                body = bytearray()
                # aiter_bytes decodes gzip/deflate/br: the limit counts decompressed bytes (no compression bombs)
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > limits.max_bytes:
                        raise url_error(index, url, too_large, "file_too_large")
                return bytes(body)
    except TimeoutError as exc:
        raise url_error(
            index, url, f"Failed to download the file within {limits.timeout_s:g} s.", "file_download_error"
        ) from exc
    except AddressRefused as exc:
        raise url_error(index, url, f"URL not allowed: {exc}.", "url_not_allowed") from exc
    except httpx.TooManyRedirects as exc:
        raise url_error(
            index,
            url,
            f"Failed to download the file: more than {client.max_redirects} redirects.",
            "file_download_error",
        ) from exc
    except httpx.HTTPError as exc:
        raise url_error(
            index, url, f"Failed to download the file: {type(exc).__name__}: {exc}", "file_download_error"
        ) from exc


async def fetch(
    client: httpx.AsyncClient, url: str, index: int, limits: InputLimits, local: LocalFiles | None = None
) -> bytes:
    if url[:5].lower() == "data:":  # an inline image: megabytes, which urlsplit would scan and copy for its scheme
        return decode_data_uri(url, index, limits.max_bytes)
    try:
        scheme = urllib.parse.urlsplit(url).scheme.lower()
        if scheme in ("http", "https"):
            httpx.URL(url)  # parsed as it will be fetched: 0177.0.0.1, 256.0.0.1, [::1, full-width digits...
    except (httpx.InvalidURL, ValueError) as exc:
        raise url_error(index, url, f"Invalid URL: {exc}", "invalid_url") from exc
    if scheme == "data":
        return decode_data_uri(url, index, limits.max_bytes)
    if scheme not in ("http", "https"):
        raise url_error(
            index,
            url,
            f"Unsupported URL scheme {scheme!r}: image URLs must be http, https or data URIs.",
            "invalid_url",
        )
    name = local.name_for(url) if local is not None else None
    if name is not None:
        return await asyncio.to_thread(read_local, local, name, url, index, limits.max_bytes)  # type: ignore[arg-type]
    return await download(client, url, index, limits)


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """8-bit RGB: 16-bit and float greys scaled (not clipped), transparency composited over white."""
    if image.mode in SIXTEEN_BIT_MODES:
        image = image.convert("I")
        image = image.point(lambda v: v * (255 / 65535)).convert("L")
    elif image.mode == "I":
        high = cast(float, image.getextrema()[1])  # one band: (low, high)
        image = (image.point(lambda v: v * (255 / 65535)) if high > 255 else image).convert("L")
    elif image.mode == "F":
        high = cast(float, image.getextrema()[1])
        image = (image.point(lambda v: v * 255) if high <= 1.0 else image).convert("L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def plain_png(data: bytes, image: PIL.Image.Image) -> bool:
    """An opened image that Wuffs decodes to exactly Pillow's RGB: a PNG of 8-bit RGB or grey samples (interlaced or
    not), without transparency, animation or orientation metadata, with only IDATs from the first IDAT to IEND
    (chunks Pillow would read after the pixels are left to Pillow)."""
    if image.format != "PNG" or image.mode not in ("RGB", "L") or data[12:16] != b"IHDR":
        return False
    if data[24:26] not in PNG_RGB8_OR_GREY8 or any(key in image.info for key in PILLOW_ONLY_PNG_INFO):
        return False
    position, in_pixels = 8, False
    while position + 8 <= len(data):
        kind = data[position + 4 : position + 8]
        if kind in PILLOW_ONLY_PNG_CHUNKS:
            return False
        if kind == b"IEND":
            return in_pixels
        if kind == b"IDAT":
            in_pixels = True
        elif in_pixels:
            return False
        position += 12 + int.from_bytes(data[position : position + 4], "big")
    return False  # no IEND: truncated, or the chunk lengths run past the end


def decode_png_with_wuffs(data: bytes, width: int, height: int) -> PIL.Image.Image | None:
    """RGB pixels of a plain PNG (see `plain_png`), or None when Wuffs refuses it (Pillow then decodes it and says
    why). The GIL is released while Wuffs decodes."""
    try:
        result = pywuffs.aux.ImageDecoder(WUFFS_PNG).decode(data)
        if result.error_message:  # a partial image (truncated, bad checksum) included
            return None
        pixels = result.pixbuf
    except (RuntimeError, MemoryError, TypeError, ValueError):  # pybind11's translations of C++ exceptions
        return None  # Pillow decides, as it did before Wuffs
    return PIL.Image.fromarray(pixels) if pixels.shape == (height, width, 3) else None


def decode_image(data: bytes, url: str, index: int, max_pixels: int) -> tuple[PIL.Image.Image, str | None]:
    """Decode to RGB with EXIF orientation applied; the image's size is checked from its header first.

    Returns the image and a notice when only part of it was used (the first frame of an animation)."""
    try:
        with PIL.Image.open(io.BytesIO(data), formats=DECODED_FORMATS) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise url_error(
                    index,
                    url,
                    f"Image too large: {width}x{height} is {width * height} pixels, more than the {max_pixels} "
                    "this server decodes.",
                    "image_too_large",
                )
            if plain_png(data, image) and (fast := decode_png_with_wuffs(data, width, height)) is not None:
                return fast, None
            notice = None
            if getattr(image, "is_animated", False):
                frames = getattr(image, "n_frames", "several")
                notice = f"image_urls[{index}] is animated ({frames} frames): only its first frame was used."
                image.seek(0)
            image.load()
            return to_rgb(PIL.ImageOps.exif_transpose(image)), notice
    except PIL.UnidentifiedImageError as exc:
        raise url_error(
            index,
            url,
            f"Could not decode the image: {len(data)} bytes that are not a PNG, JPEG or WebP image (the formats "
            "this server reads).",
            "image_load_error",
        ) from exc
    except PIL.Image.DecompressionBombError as exc:
        raise url_error(index, url, f"Image too large: {exc}", "image_too_large") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise url_error(index, url, f"Could not decode the image: {exc}", "image_load_error") from exc


async def load_images(
    client: httpx.AsyncClient, urls: list[str], limits: InputLimits, local: LocalFiles | None = None
) -> tuple[list[PIL.Image.Image], list[str]]:
    """Fetch and decode every URL concurrently (decoding off the event loop): the images, and notices about them."""

    async def one(index: int, url: str) -> tuple[PIL.Image.Image, str | None]:
        data = await fetch(client, url, index, limits, local)
        return await asyncio.to_thread(decode_image, data, url, index, limits.max_pixels)

    decoded = await asyncio.gather(*(one(i, u) for i, u in enumerate(urls)))
    return [image for image, _ in decoded], [notice for _, notice in decoded if notice]
