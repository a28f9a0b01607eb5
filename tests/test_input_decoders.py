"""The fast input decoders (server/service/inputs.py) give what the standard library and Pillow gave: pybase64 the
same bytes and errors as `base64.b64decode(validate=True)`, Wuffs the same pixels as Pillow for the plain PNGs it
takes, every other PNG kind left to Pillow, and broken files the same errors (Wuffs refuses them, Pillow names them)."""

from __future__ import annotations

import base64
import binascii
import io
import json
import random
import struct
import subprocess
import sys
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import PIL.Image
import PIL.PngImagePlugin
import pytest

from benchmarks.encoders import photo_like
from server.errors import InputError
from server.service import inputs

MAX = 10_000_000
# Adam7's seven passes: first column, first row, column step, row step
ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def raw_png(pixels: np.ndarray, interlaced: bool = False, extra: bytes = b"") -> bytes:
    """A PNG of grey (HxW) or RGB (HxWx3) samples, 8- or 16-bit, written by hand: Pillow writes neither Adam7 nor
    16-bit RGB. `extra` chunks go between IHDR and IDAT."""
    colour_type = 2 if pixels.ndim == 3 else 0
    depth = 16 if pixels.dtype == np.uint16 else 8
    stored = pixels.astype(">u2") if depth == 16 else pixels
    passes = ADAM7 if interlaced else ((0, 0, 1, 1),)
    rows = b"".join(
        b"\0" + row.tobytes() for x0, y0, dx, dy in passes for row in stored[y0::dy, x0::dx] if row.size
    )  # filter type 0 (None) on every row
    height, width = pixels.shape[:2]
    header = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, int(interlaced))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + extra
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def saved(image: PIL.Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **options)
    return buffer.getvalue()


def chunks(data: bytes) -> list[tuple[bytes, int, int]]:
    """(type, offset of the chunk, data length) of each chunk."""
    found, position = [], 8
    while position + 8 <= len(data):
        length = int.from_bytes(data[position : position + 4], "big")
        found.append((data[position + 4 : position + 8], position, length))
        position += 12 + length
    return found


def insert_before_iend(data: bytes, extra: bytes) -> bytes:
    return data[:-12] + extra + data[-12:]


@pytest.fixture
def wuffs_calls(monkeypatch) -> list[bool]:
    """Each call of the Wuffs path: True where it returned the image, False where it left the file to Pillow."""
    calls: list[bool] = []
    real = inputs.decode_png_with_wuffs

    def spy(data: bytes, width: int, height: int):
        image = real(data, width, height)
        calls.append(image is not None)
        return image

    monkeypatch.setattr(inputs, "decode_png_with_wuffs", spy)
    return calls


def outcome(data: bytes, pillow_only: bool = False, max_pixels: int = MAX):
    """What decode_image makes of the bytes: ("ok", mode, size, pixels, notice) or ("error", the 422's detail)."""
    real = inputs.plain_png
    if pillow_only:
        inputs.plain_png = lambda data, image: False  # the decoder before Wuffs: Pillow for every image
    try:
        image, notice = inputs.decode_image(data, "data:...", 0, max_pixels)
    except InputError as exc:
        return ("error", exc.detail)
    finally:
        inputs.plain_png = real
    return ("ok", image.mode, image.size, np.asarray(image).tobytes(), notice)


PHOTO = np.asarray(photo_like(64, seed=1))
GREY = np.asarray(photo_like(64, seed=2).convert("L"))
ODD = np.asarray(photo_like(64, seed=3))[:37, :53]  # Adam7 passes of uneven sizes


def orientation_exif() -> bytes:
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    return exif.tobytes()


def xmp_orientation() -> PIL.PngImagePlugin.PngInfo:
    info = PIL.PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", '<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>')
    return info


def text_before_pixels() -> PIL.PngImagePlugin.PngInfo:
    info = PIL.PngImagePlugin.PngInfo()
    info.add_text("Software", "a camera app")
    return info


def palette_image(transparency: bool) -> bytes:
    image = PIL.Image.fromarray(PHOTO).quantize(64)
    return saved(image, transparency=0) if transparency else saved(image)


def apng() -> bytes:
    frames = [PIL.Image.fromarray(PHOTO), PIL.Image.fromarray(PHOTO[::-1].copy())]
    return saved(frames[0], save_all=True, append_images=frames[1:])


# (kind, PNG bytes, whether Wuffs decodes it)
KINDS = [
    ("8-bit RGB", saved(PIL.Image.fromarray(PHOTO)), True),
    ("8-bit RGB, level 1", saved(PIL.Image.fromarray(PHOTO), compress_level=1), True),
    ("8-bit grey", saved(PIL.Image.fromarray(GREY)), True),
    ("8-bit RGB, Adam7", raw_png(ODD, interlaced=True), True),
    ("8-bit grey, Adam7", raw_png(GREY[:29, :31], interlaced=True), True),
    (
        "8-bit RGB, a tEXt chunk before the pixels",
        saved(PIL.Image.fromarray(PHOTO), pnginfo=text_before_pixels()),
        True,
    ),
    ("RGBA", saved(PIL.Image.fromarray(PHOTO).convert("RGBA").rotate(30)), False),  # transparent corners
    ("grey + alpha", saved(PIL.Image.fromarray(GREY).convert("LA").rotate(30)), False),
    ("palette", palette_image(transparency=False), False),
    ("palette + tRNS", palette_image(transparency=True), False),
    ("8-bit RGB + tRNS", saved(PIL.Image.fromarray(PHOTO), transparency=tuple(int(v) for v in PHOTO[0, 0])), False),
    ("8-bit grey + tRNS", saved(PIL.Image.fromarray(GREY), transparency=int(GREY[0, 0])), False),
    ("16-bit grey", raw_png(GREY.astype(np.uint16) * 257 + 5), False),
    ("16-bit RGB", raw_png(PHOTO.astype(np.uint16) * 250), False),
    ("16-bit RGB, Adam7", raw_png(ODD.astype(np.uint16) * 250, interlaced=True), False),
    ("1-bit", saved(PIL.Image.fromarray(GREY).convert("1")), False),
    ("APNG (first frame, a notice)", apng(), False),
    ("eXIf orientation", saved(PIL.Image.fromarray(PHOTO[:, :40].copy()), exif=orientation_exif()), False),
    ("XMP orientation", saved(PIL.Image.fromarray(PHOTO[:, :40].copy()), pnginfo=xmp_orientation()), False),
    (
        "a tEXt chunk after the pixels",
        insert_before_iend(saved(PIL.Image.fromarray(PHOTO)), chunk(b"tEXt", b"k\0v")),
        False,
    ),
]


@pytest.mark.parametrize(("kind", "data", "fast"), KINDS, ids=[kind for kind, _, _ in KINDS])
def test_each_png_kind_decodes_to_pillows_pixels_on_either_path(kind, data, fast, wuffs_calls):
    decoded = outcome(data)
    assert decoded[0] == "ok" and decoded[1] == "RGB", kind
    assert wuffs_calls == ([True] if fast else []), kind
    assert decoded == outcome(data, pillow_only=True), kind


def test_orientation_and_animation_are_still_applied():
    """The kinds left to Pillow keep its handling: rotated by EXIF or XMP, an APNG's first frame with a notice."""
    kinds = {kind: data for kind, data, _ in KINDS}
    for data in (kinds["eXIf orientation"], kinds["XMP orientation"]):
        _, _, size, _, _ = outcome(data)
        assert size == (64, 40)  # stored 40 wide, 64 high: displayed rotated
    _, _, _, pixels, notice = outcome(apng())
    assert pixels == PHOTO.tobytes() and "animated (2 frames)" in notice


def test_a_plain_png_is_decoded_by_wuffs_to_exactly_its_samples(wuffs_calls):
    image, notice = inputs.decode_image(saved(PIL.Image.fromarray(PHOTO)), "data:...", 0, MAX)
    assert wuffs_calls == [True] and notice is None
    assert image.mode == "RGB" and np.array_equal(np.asarray(image), PHOTO)
    image, _ = inputs.decode_image(raw_png(GREY), "data:...", 0, MAX)
    assert np.array_equal(np.asarray(image), np.repeat(GREY[:, :, None], 3, axis=2))


def test_the_size_is_checked_from_the_header_before_wuffs_runs(wuffs_calls):
    data = raw_png(PHOTO)
    assert outcome(data, max_pixels=64 * 64 - 1)[1]["type"] == "image_too_large"
    assert wuffs_calls == []


def recompressed(data: bytes, rows: bytes, damage=lambda z: z) -> bytes:
    """The PNG with its pixel data replaced by `rows`, deflated then damaged, in one IDAT with a valid CRC."""
    return data[:33] + chunk(b"IDAT", damage(zlib.compress(rows))) + chunk(b"IEND", b"")


def flip_last_byte(z: bytes) -> bytes:
    return z[:-1] + bytes([z[-1] ^ 1])


GOOD = raw_png(PHOTO[:24, :24])
ROWS = zlib.decompress(GOOD[41 : 41 + chunks(GOOD)[1][2]])
IDAT_OFFSET, IDAT_LENGTH = chunks(GOOD)[1][1:]
BROKEN = {
    "bad Adler-32 (Pillow refuses; Wuffs must too)": recompressed(GOOD, ROWS, flip_last_byte),
    "bad IDAT CRC (Pillow reads it; Wuffs refuses)": GOOD[: IDAT_OFFSET + 8 + IDAT_LENGTH]
    + bytes([GOOD[IDAT_OFFSET + 8 + IDAT_LENGTH] ^ 1])
    + GOOD[IDAT_OFFSET + 9 + IDAT_LENGTH :],
    "no Adler-32": recompressed(GOOD, ROWS, lambda z: z[:-4]),
    "more pixel data than the image": recompressed(GOOD, ROWS + b"\0" * 100),
    "less pixel data than the image": recompressed(GOOD, ROWS[:-100]),
    "a bad filter type": recompressed(GOOD, b"\x09" + ROWS[1:]),
    "no IEND": GOOD[:-12],
    "truncated in the pixel data": GOOD[: IDAT_OFFSET + 40],
    "truncated in the IDAT CRC": GOOD[: IDAT_OFFSET + 10 + IDAT_LENGTH],
    "garbage after IEND": GOOD + b"garbage",
    "an IDAT length past the end": GOOD[:IDAT_OFFSET] + struct.pack(">I", 2**31) + GOOD[IDAT_OFFSET + 4 :],
    "no pixel data": GOOD[:33] + chunk(b"IEND", b""),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_broken_pngs_give_the_same_pixels_or_the_same_error(name):
    assert outcome(BROKEN[name]) == outcome(BROKEN[name], pillow_only=True), name


def test_broken_pngs_left_to_pillow_are_named_as_before():
    assert outcome(BROKEN["bad Adler-32 (Pillow refuses; Wuffs must too)"])[1]["type"] == "image_load_error"
    assert outcome(BROKEN["truncated in the pixel data"])[1]["type"] == "image_load_error"
    assert outcome(BROKEN["bad IDAT CRC (Pillow reads it; Wuffs refuses)"])[3] == PHOTO[:24, :24].tobytes()


def damaged(data: bytes, rng: random.Random) -> bytes:
    """One byte flipped, a cut, or a few bytes inserted or removed."""
    damaged, at = bytearray(data), rng.randrange(len(data))
    how = rng.randrange(4)
    if how == 0:
        damaged[at] ^= 1 << rng.randrange(8)
    elif how == 1:
        del damaged[at:]
    elif how == 2:
        damaged[at:at] = rng.randbytes(rng.randint(1, 6))
    else:
        del damaged[at : at + rng.randint(1, 6)]
    return bytes(damaged)


def mutations(count: int, seed: int = 0):
    """Damaged plain PNGs: half damaged anywhere after the signature, half in the pixel data (the IDAT chunk's body)
    with its length and CRC made right again, so that Wuffs reads through to the damaged deflate stream and rows."""
    rng = random.Random(seed)
    sources = [GOOD, raw_png(ODD, interlaced=True), raw_png(GREY[:20, :30])]
    for number in range(count):
        data = rng.choice(sources)
        if number % 2:
            yield data[:8] + damaged(data[8:], rng)
        else:
            _, position, length = chunks(data)[1]  # IHDR, then the one IDAT
            body = damaged(data[position + 8 : position + 8 + length], rng)
            yield data[:position] + chunk(b"IDAT", body) + data[position + 12 + length :]


def test_damaged_pngs_give_the_same_outcome_as_pillow_alone(wuffs_calls):
    cases = list(mutations(400))
    for data in cases:
        assert outcome(data) == outcome(data, pillow_only=True), data.hex()
    assert len(wuffs_calls) > len(cases) / 2  # most reached Wuffs (past Pillow's header checks) and were refused


def test_decoding_from_many_threads_at_once():
    """Wuffs decodes with the GIL released; each decode makes its own decoder object (they are not thread-safe)."""
    images = [np.asarray(photo_like(96, seed=seed)) for seed in range(8)]
    pngs = [raw_png(image, interlaced=seed % 2 == 1) for seed, image in enumerate(images)]
    barrier = threading.Barrier(4)

    def decode(index: int) -> bool:
        if index < 4:
            barrier.wait()  # the first four start together
        image, _ = inputs.decode_image(pngs[index % 8], "data:...", 0, MAX)
        return np.array_equal(np.asarray(image), images[index % 8])

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(decode, range(32)))


# base64 of data URIs: pybase64, with the standard library's answer wherever pybase64 refuses


def stdlib_data_uri(url: str) -> tuple[str, object]:
    """What the data URI decoded to before pybase64: the bytes, or the error's message."""
    payload = url.partition(",")[2]
    try:
        return ("ok", base64.b64decode(payload, validate=True))
    except (binascii.Error, ValueError) as exc:
        return ("error", f"Invalid base64 in data URI: {exc}")


def data_uri_outcome(url: str) -> tuple[str, object]:
    try:
        return ("ok", inputs.decode_data_uri(url, 0, 1_000_000))
    except InputError as exc:
        assert exc.detail["type"] == "invalid_data_uri" and exc.detail["loc"][-2:] == ["image_urls", 0]
        return ("error", exc.detail["msg"])


B64_CASES = [
    base64.b64encode(GOOD).decode(),
    "",
    "QQ==",
    "QUJD",
    "QUJD=",  # the standard library takes padding after a whole group; pybase64 does not
    "QUJD==",
    "QUJDQQ",  # padding missing
    "QUJDQQ=",
    "QQ==QQ==",  # data after padding
    "====",
    "Q",
    "QUJD\n",  # a line break
    " QUJD",
    "QU=D",
    "QUJ-",  # the URL-safe alphabet
    "QUJ_",
    "%%%notbase64",
    "QUJDé",  # not ASCII
]


@pytest.mark.parametrize("payload", B64_CASES)
def test_data_uris_decode_to_the_same_bytes_and_errors_as_before(payload):
    url = "data:image/png;base64," + payload
    assert data_uri_outcome(url) == stdlib_data_uri(url)


def test_random_base64_like_payloads_decode_as_before():
    rng = random.Random(0)
    for _ in range(3000):
        url = "data:;base64," + "".join(rng.choice("QUJD+/=\n_-") for _ in range(rng.randint(0, 9)))
        assert data_uri_outcome(url) == stdlib_data_uri(url), url


def test_pybase64_decodes_valid_data_uris(monkeypatch):
    """The common case is pybase64's (the standard library is not called), and the size is checked first."""
    monkeypatch.setattr(inputs.base64, "b64decode", lambda *args, **kwargs: pytest.fail("the standard library ran"))
    assert inputs.decode_data_uri("data:image/png;base64," + base64.b64encode(GOOD).decode(), 0, 10**6) == GOOD
    calls = []
    monkeypatch.setattr(inputs.pybase64, "b64decode", lambda *args, **kwargs: calls.append(1))
    with pytest.raises(InputError) as info:
        inputs.decode_data_uri("data:image/png;base64," + "A" * 4000, 0, 2000)
    assert info.value.detail["type"] == "file_too_large" and calls == []


def test_decoder_benchmark_writes_its_report(tmp_path):
    out = tmp_path / "decoders.json"
    ran = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.decoders",
            "--repeats",
            "1",
            "--size",
            "64",
            "--gil-seconds",
            "0.01",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    report = json.loads(out.read_text())
    assert report["command"].startswith("python") and report["device"] and len(report["load_average"]["at_end"]) == 3
    rows = {row["decoder"]: row for row in report["png"]}
    assert rows["wuffs (pywuffs)"]["same_pixels"] and rows["server decode_image, Wuffs path"]["same_pixels"]
    assert all(row["same_pixels"] for row in rows.values() if row["installed"])
    assert all(row["same_bytes"] for row in report["base64"])
    assert "| wuffs (pywuffs) |" in out.with_suffix(".md").read_text()
