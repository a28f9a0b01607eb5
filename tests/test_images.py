"""Input images as they come: bombs and absurd sizes refused from the header, broken bytes named, animations,
CMYK, 16-bit, alpha and palettes brought to RGB correctly, EXIF orientation applied."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import PIL.Image
import pytest

from server.errors import InputError
from server.service.inputs import decode_image
from tests.conftest import data_uri, image_bytes

MAX = 10_000_000


def encode(image: PIL.Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def decoded(data: bytes, max_pixels: int = MAX) -> tuple[PIL.Image.Image, str | None]:
    return decode_image(data, "data:...", 0, max_pixels)


def failure(data: bytes, max_pixels: int = MAX) -> dict:
    with pytest.raises(InputError) as info:
        decoded(data, max_pixels)
    return info.value.detail


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with one tiny IDAT: decoding it would need width*height pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(("width", "height"), [(5000, 5000), (100_000, 100_000), (2**31 - 1, 1)])
def test_absurd_dimensions_refused_from_the_header(width, height):
    started = time.perf_counter()
    detail = failure(png_header_only(width, height))
    assert detail["type"] == "image_too_large" and "too large" in detail["msg"].lower()
    assert time.perf_counter() - started < 1  # nothing was decoded


@pytest.mark.parametrize(
    "data",
    [
        b"this is not an image",
        b"",
        image_bytes(96, 96)[:300],  # truncated PNG
        image_bytes(96, 96, fmt="JPEG")[:400],  # truncated JPEG
        b"GIF89a" + b"\xff" * 50,  # a GIF signature and garbage
        png_header_only(96, 96),  # a valid header and pixel data that isn't there
    ],
)
def test_broken_bytes_are_named(data):
    assert failure(data)["type"] == "image_load_error"


def test_animated_first_frame_with_a_notice():
    frames = [PIL.Image.new("RGB", (80, 80), color) for color in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    webp = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    image, notice = decoded(webp)
    assert image.mode == "RGB" and image.getpixel((40, 40)) == (255, 0, 0)
    assert "animated (3 frames)" in notice and "first frame" in notice and "image_urls[0]" in notice
    apng = encode(frames[0], "PNG", save_all=True, append_images=frames[1:])
    image, notice = decoded(apng)
    assert image.getpixel((40, 40)) == (255, 0, 0) and "3 frames" in notice
    assert decoded(image_bytes(80, 80))[1] is None


def ico_of(size: int) -> bytes:
    """An ICO whose one entry is a PNG of size x size (ICO's own header can't say more than 256)."""
    png = image_bytes(size, size)
    header = struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 22)
    return header + png


@pytest.mark.parametrize(
    ("fmt", "data"),
    [
        ("GIF", encode(PIL.Image.new("RGB", (40, 40)), "GIF")),
        ("TIFF", encode(PIL.Image.new("RGB", (40, 40)), "TIFF")),
        ("BMP", encode(PIL.Image.new("RGB", (40, 40)), "BMP")),
        ("ICO", ico_of(3000)),  # a header that says 256 (0) and a PNG of 9 000 000 pixels inside
        ("EPS", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"),  # Ghostscript, where installed
        ("PSD", b"8BPS\x00\x01" + b"\x00" * 20),
    ],
)
def test_only_png_jpeg_and_webp_are_decoded(fmt, data):
    detail = failure(data, max_pixels=1_000_000)
    assert detail["type"] == "image_load_error" and "PNG, JPEG or WebP" in detail["msg"], (fmt, detail)


def test_cmyk_jpeg_to_rgb():
    cmyk = PIL.Image.new("CMYK", (80, 80), (0, 255, 255, 0))  # pure red in CMYK
    image, _ = decoded(encode(cmyk, "JPEG", quality=95))
    r, g, b = image.getpixel((40, 40))
    assert image.mode == "RGB" and r > 240 and g < 15 and b < 15


def test_sixteen_bit_grey_is_scaled_not_clipped():
    half = np.full((80, 80), 32768, dtype=np.uint16)
    png16 = encode(PIL.Image.fromarray(half), "PNG")
    assert PIL.Image.open(io.BytesIO(png16)).mode.startswith("I")
    image, _ = decoded(png16)
    assert image.mode == "RGB" and all(abs(c - 128) <= 1 for c in image.getpixel((10, 10)))
    full = encode(PIL.Image.fromarray(np.full((80, 80), 65535, dtype=np.uint16)), "PNG")
    assert decoded(full)[0].getpixel((0, 0)) == (255, 255, 255)


def test_alpha_and_palette_transparency_composite_over_white():
    rgba = PIL.Image.new("RGBA", (80, 80), (0, 0, 0, 0))  # fully transparent black
    rgba.paste((255, 0, 0, 128), (0, 0, 40, 80))  # left half: half-transparent red
    image, _ = decoded(encode(rgba, "PNG"))
    assert image.getpixel((60, 40)) == (255, 255, 255)  # transparent: white, not black
    r, g, b = image.getpixel((20, 40))
    assert r == 255 and 120 <= g <= 135 and g == b  # red at half strength over white
    la = PIL.Image.new("LA", (80, 80), (0, 0))
    assert decoded(encode(la, "PNG"))[0].getpixel((0, 0)) == (255, 255, 255)
    palette = PIL.Image.new("P", (80, 80), 0)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.paste(1, (0, 0, 40, 80))
    image, _ = decoded(encode(palette, "PNG", transparency=0))
    assert image.getpixel((20, 40)) == (0, 255, 0) and image.getpixel((60, 40)) == (255, 255, 255)


def test_other_modes_to_rgb():
    for mode, value in (("L", 200), ("1", 1), ("P", 3), ("I;16", 1000)):
        image, _ = decoded(encode(PIL.Image.new(mode, (70, 70), value), "PNG"))
        assert image.mode == "RGB" and image.size == (70, 70)


def test_exif_orientation_applied():
    image = PIL.Image.new("RGB", (120, 60), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))  # a red marker at the top left as stored
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # stored rotated: display rotated 90 degrees clockwise
    upright, _ = decoded(encode(image, "JPEG", quality=95, exif=exif.tobytes()))
    assert upright.size == (60, 120)
    r, _, b = upright.getpixel((50, 10))  # the marker is now at the top right
    assert r > 200 and b < 60


def test_through_the_server(server):
    """The same handling end to end: a CMYK JPEG and an animated WebP are used, a bomb is a 422."""
    frames = [PIL.Image.new("RGB", (96, 96), c) for c in ((255, 0, 0), (0, 0, 255))]
    webp = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    cmyk = encode(PIL.Image.new("CMYK", (96, 96), (0, 255, 255, 0)), "JPEG")
    body = {"prompt": "p", "image_urls": [data_uri(cmyk, "image/jpeg"), data_uri(webp, "image/webp")], "seed": 1}
    response = server.post("fal-ai/flux-2/flash/edit", {**body, "image_size": "square"})
    assert response.status_code == 200, response.text
    assert any("image_urls[1] is animated (2 frames)" in n for n in response.json()["notices"])
    bomb = server.post("fal-ai/flux-2/flash/edit", {**body, "image_urls": [data_uri(png_header_only(60000, 60000))]})
    assert bomb.status_code == 422
    [detail] = bomb.json()["detail"]
    assert detail["loc"] == ["body", "image_urls", 0] and detail["type"] == "image_too_large"
