"""Input decoders on one 1024x1024 photo-like PNG sent as a data URI: base64 and PNG decoding, Pillow and the
standard library against the faster libraries.

    python -m benchmarks.decoders [--repeats N] [--size N] [--out FILE]

Measures each PNG decoder's median time to RGB pixels on the same file (Pillow's PNG at its default level 6, as a
client using Pillow sends it), checks the pixels equal Pillow's, and says whether the decoder lets other Python
threads run while it decodes (the share of a pure-Python loop's speed kept meanwhile: near 0 when the GIL is held;
the server decodes in threads, next to its event loop). Also the server's own `decode_image` (Wuffs path and Pillow
path) and the base64 decoding of the data URI (standard library against pybase64). The server's choices
(server/service/inputs.py) are pybase64 and Wuffs (pywuffs) with Pillow for the rest; to measure the others too,
`pip install pyspng imagecodecs opencv-python-headless` first (a side venv will do). Writes JSON (with the command,
machine and load average) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import PIL.Image
import pybase64
import pywuffs
import pywuffs.aux

from benchmarks.encoders import photo_like
from benchmarks.gil import python_speed_kept
from benchmarks.overhead import device_name
from benchmarks.report import command, write
from server.service import inputs

Decoder = Callable[[bytes], np.ndarray]


def pillow(data: bytes) -> np.ndarray:
    with PIL.Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def wuffs(data: bytes) -> np.ndarray:
    return pywuffs.aux.ImageDecoder(inputs.WUFFS_PNG).decode(data).pixbuf  # the server's settings: checksums on


def server_decode(fast: bool) -> Decoder:
    """server/service/inputs.decode_image: header, size check, decode, RGB; `fast=False` as before Wuffs."""

    def decode(data: bytes) -> np.ndarray:
        plain_png = inputs.plain_png
        if not fast:
            inputs.plain_png = lambda data, image: False
        try:
            return np.asarray(inputs.decode_image(data, "data:...", 0, 10**9)[0])
        finally:
            inputs.plain_png = plain_png

    return decode


def candidates() -> dict[str, Decoder | None]:
    """name -> decoder to an RGB array, or None when its library is not installed."""
    found: dict[str, Decoder | None] = {
        "pillow": pillow,
        "wuffs (pywuffs)": wuffs,
        "server decode_image, Wuffs path": server_decode(fast=True),
        "server decode_image, Pillow path (before)": server_decode(fast=False),
    }
    try:
        import pyspng

        found["pyspng (libspng)"] = pyspng.load
    except ImportError:
        found["pyspng (libspng)"] = None
    try:
        import imagecodecs

        found["imagecodecs png (libpng)"] = imagecodecs.png_decode
    except ImportError:
        found["imagecodecs png (libpng)"] = None
    try:
        import cv2

        found["opencv imdecode"] = lambda data: cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)
    except ImportError:
        found["opencv imdecode"] = None
    return found


def median_seconds(call: Callable[[], object], repeats: int) -> float:
    call()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(decode: Decoder, data: bytes, reference: np.ndarray, repeats: int, gil_seconds: float) -> dict:
    pixels = decode(data)
    return {
        "seconds": median_seconds(lambda: decode(data), repeats),
        "same_pixels": bool(pixels.shape == reference.shape and np.array_equal(pixels, reference)),
        "python_speed_kept_while_decoding": round(
            statistics.median(python_speed_kept(lambda: decode(data), gil_seconds) for _ in range(3)), 2
        ),
    }


def run(repeats: int, size: int, gil_seconds: float = 0.3) -> dict:
    load_before = os.getloadavg()
    image = photo_like(size, seed=2)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # Pillow's default, level 6
    data = buffer.getvalue()
    reference = np.asarray(image)
    rows = []
    for name, decode in candidates().items():
        if decode is None:
            rows.append({"decoder": name, "installed": False})
            continue
        rows.append({"decoder": name, "installed": True} | measure(decode, data, reference, repeats, gil_seconds))
    payload = base64.b64encode(data).decode()
    base64_rows = []
    for name, b64decode in (
        ("base64.b64decode(validate=True)", base64.b64decode),
        ("pybase64.b64decode(validate=True)", pybase64.b64decode),
    ):
        seconds = median_seconds(lambda b64decode=b64decode: b64decode(payload, validate=True), repeats)
        same = b64decode(payload, validate=True) == data
        base64_rows.append({"decoder": name, "seconds": seconds, "same_bytes": same})
    return {
        "benchmark": "input decoders, one photo-like PNG as a data URI",
        "command": command("benchmarks.decoders"),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": device_name(),
        "versions": versions(),
        "workload": {
            "size": size,
            "png_bytes": len(data),
            "data_uri_payload_characters": len(payload),
            "repeats": repeats,
            "statistic": "median",
            "threads": 1,
            "gil_seconds": gil_seconds,
        },
        # the machine's other work competes for the CPU: its load average (1, 5, 15 min)
        "load_average": {"at_start": list(load_before), "at_end": list(os.getloadavg())},
        "note": "A shared 2-core machine: times vary run to run; the ratios hold.",
        "png": rows,
        "base64": base64_rows,
    }


def versions() -> dict[str, str]:
    import importlib.metadata

    import PIL.features

    found = {"python": sys.version.split()[0], "zlib (Pillow's)": str(PIL.features.version("zlib"))}
    for package in ("pillow", "pywuffs", "pybase64", "pyspng", "imagecodecs", "opencv-python-headless"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def markdown(report: dict) -> str:
    lines = [
        "| PNG decoder | ms | same pixels as Pillow | Python speed kept while decoding (GIL) |",
        "| --- | --- | --- | --- |",
    ]
    for row in report["png"]:
        if not row["installed"]:
            lines.append(f"| {row['decoder']} | not installed | | |")
            continue
        lines.append(
            f"| {row['decoder']} | {row['seconds'] * 1000:.1f} | {'yes' if row['same_pixels'] else 'NO'} | "
            f"{row['python_speed_kept_while_decoding']:.2f} |"
        )
    lines += ["", "| base64 decoder (data URI payload) | ms | same bytes |", "| --- | --- | --- |"]
    for row in report["base64"]:
        lines.append(f"| {row['decoder']} | {row['seconds'] * 1000:.2f} | {'yes' if row['same_bytes'] else 'NO'} |")
    workload = report["workload"]
    head = (
        f"{report['benchmark']} ({workload['size']}², {workload['png_bytes'] / 1e6:.2f} MB PNG, "
        f"{workload['data_uri_payload_characters'] / 1e6:.2f} M base64 characters) — {report['device']}, load average "
        f"{report['load_average']['at_end'][1]:.1f} (5 min) — `{report['command']}`"
    )
    return head + "\n\n" + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--gil-seconds", type=float, default=0.3, help="length of each of the 3 GIL measurements")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/decoders.json"))
    args = parser.parse_args(argv)
    report = run(args.repeats, args.size, args.gil_seconds)
    write(report, args.out, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
