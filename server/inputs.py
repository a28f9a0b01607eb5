"""Input images: fetch `image_urls` (http, https, data URIs) and decode them, naming the URL on any failure."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import urllib.parse

import httpx
import PIL.Image
import PIL.ImageOps

from server.errors import InputError


def short(url: str, limit: int = 120) -> str:
    """A URL as error messages show it: data URIs and long URLs cut, so errors never echo megabytes."""
    return url if len(url) <= limit else url[:limit] + f"... ({len(url)} characters)"


def url_error(index: int, url: str, msg: str, type_: str) -> InputError:
    """A 422 naming `image_urls[index]`, the URL (shortened) and why it can't be used."""
    return InputError(["image_urls", index], msg, type_, short(url))


def decode_data_uri(url: str, index: int) -> bytes:
    """Bytes of a `data:[<media type>][;base64],<data>` URI (RFC 2397)."""
    header, sep, payload = url.partition(",")
    if not sep:
        raise url_error(index, url, "Invalid data URI: no ',' before the data.", "invalid_data_uri")
    if header.endswith(";base64"):
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise url_error(index, url, f"Invalid base64 in data URI: {exc}", "invalid_data_uri")
    return urllib.parse.unquote_to_bytes(payload)


async def fetch(client: httpx.AsyncClient, url: str, index: int, max_bytes: int) -> bytes:
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme == "data":
        return decode_data_uri(url, index)
    if scheme not in ("http", "https"):
        raise url_error(
            index,
            url,
            f"Unsupported URL scheme {scheme!r}: image URLs must be http, https or data URIs.",
            "invalid_url",
        )
    try:
        async with client.stream("GET", url) as response:
            if response.status_code >= 400:
                raise url_error(
                    index,
                    url,
                    f"Failed to download the file: the server answered HTTP {response.status_code}.",
                    "file_download_error",
                )
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > max_bytes:
                    raise url_error(index, url, f"The file is larger than {max_bytes} bytes.", "file_too_large")
            return bytes(body)
    except httpx.HTTPError as exc:
        raise url_error(
            index, url, f"Failed to download the file: {type(exc).__name__}: {exc}", "file_download_error"
        ) from exc


def decode_image(data: bytes, url: str, index: int) -> PIL.Image.Image:
    """Decode to RGB with EXIF orientation applied."""
    try:
        with PIL.Image.open(io.BytesIO(data)) as image:
            image.load()
            image = PIL.ImageOps.exif_transpose(image)
            return image.convert("RGB")
    except PIL.UnidentifiedImageError as exc:
        raise url_error(
            index,
            url,
            f"Could not decode the image: {len(data)} bytes that are not in any image format Pillow reads.",
            "image_load_error",
        ) from exc
    except (PIL.Image.DecompressionBombError, OSError, ValueError) as exc:
        raise url_error(index, url, f"Could not decode the image: {exc}", "image_load_error") from exc


async def load_images(client: httpx.AsyncClient, urls: list[str], max_bytes: int) -> list[PIL.Image.Image]:
    """Fetch and decode every URL concurrently; decoding runs off the event loop."""

    async def one(index: int, url: str) -> PIL.Image.Image:
        data = await fetch(client, url, index, max_bytes)
        return await asyncio.to_thread(decode_image, data, url, index)

    return list(await asyncio.gather(*(one(i, u) for i, u in enumerate(urls))))
