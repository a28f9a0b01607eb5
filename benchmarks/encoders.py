"""Output encoders on one 1024x1024 photo-like image: Pillow against the faster libraries, same image, same format.

    python -m benchmarks.encoders [--repeats N] [--out FILE]

Measures, per format, each encoder's median time and file size, and checks that each file is a valid file of its
format (Pillow opens and verifies it) and, for PNG, that it decodes to exactly the input pixels. Candidates that are
not installed are listed as such: the server's own choice (server/files/outputs.py) is `fpng` and Pillow; to measure
the others too, `pip install opencv-python-headless pyspng-seunglab simplejpeg` first. Writes JSON (with the
command and machine) and prints a markdown table.

The image is synthetic but photo-like (smooth regions, edges, fine noise), so compression works as on a photo:
a flat image would make every PNG encoder look fast.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import PIL.Image

from benchmarks.gil import python_speed_kept
from benchmarks.overhead import device_name
from benchmarks.report import command, write


def photo_like(size: int = 1024, seed: int = 0) -> PIL.Image.Image:
    """Smooth colour fields (bicubic from 16x16), mid-scale detail (from 128x128) and sensor-like noise."""
    rng = np.random.default_rng(seed)

    def upscaled(cells: int, resample) -> np.ndarray:
        small = PIL.Image.fromarray(rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8))
        return np.asarray(small.resize((size, size), resample), dtype=np.float32)

    smooth, detail = upscaled(16, PIL.Image.Resampling.BICUBIC), upscaled(128, PIL.Image.Resampling.BILINEAR)
    pixels = 0.75 * smooth + 0.25 * detail + rng.normal(0, 3, (size, size, 3))
    return PIL.Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def pillow(fmt: str, **options) -> Callable[[PIL.Image.Image], bytes]:
    def encode(image: PIL.Image.Image) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **options)
        return buffer.getvalue()

    return encode


def candidates() -> dict[str, tuple[str, Callable[[PIL.Image.Image], bytes] | None]]:
    """name -> (format, encoder or None when its library is not installed)."""
    found: dict[str, tuple[str, Callable[[PIL.Image.Image], bytes] | None]] = {
        "pillow png level 6 (Pillow's default)": ("png", pillow("PNG")),
        "pillow png level 1": ("png", pillow("PNG", compress_level=1)),
        "pillow jpeg q95": ("jpeg", pillow("JPEG", quality=95)),
        "pillow webp q95 method 4 (Pillow's default)": ("webp", pillow("WEBP", quality=95)),
        "pillow webp q95 method 0": ("webp", pillow("WEBP", quality=95, method=0)),
    }
    try:
        import fpng

        found["fpng"] = ("png", fpng.from_pil)
    except ImportError:
        found["fpng"] = ("png", None)
    try:
        import cv2

        def opencv(ext: str, *params: int) -> Callable[[PIL.Image.Image], bytes]:
            return lambda image: cv2.imencode(ext, np.asarray(image)[:, :, ::-1], list(params))[1].tobytes()

        found["opencv png level 1"] = ("png", opencv(".png", cv2.IMWRITE_PNG_COMPRESSION, 1))
        found["opencv jpeg q95"] = ("jpeg", opencv(".jpg", cv2.IMWRITE_JPEG_QUALITY, 95))
        found["opencv webp q95"] = ("webp", opencv(".webp", cv2.IMWRITE_WEBP_QUALITY, 95))
    except ImportError:
        for name, fmt in (("opencv png level 1", "png"), ("opencv jpeg q95", "jpeg"), ("opencv webp q95", "webp")):
            found[name] = (fmt, None)
    try:
        import pyspng

        found["pyspng level 1"] = ("png", lambda image: pyspng.encode(np.asarray(image), compress_level=1))
    except ImportError:
        found["pyspng level 1"] = ("png", None)
    try:
        import simplejpeg

        found["simplejpeg q95"] = (
            "jpeg",
            lambda image: simplejpeg.encode_jpeg(np.asarray(image), quality=95, colorspace="RGB"),
        )
    except ImportError:
        found["simplejpeg q95"] = ("jpeg", None)
    return found


def measure(encode: Callable[[PIL.Image.Image], bytes], image: PIL.Image.Image, repeats: int) -> tuple[float, bytes]:
    data = encode(image)  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        data = encode(image)
        times.append(time.perf_counter() - started)
    return statistics.median(times), data


def check(data: bytes, fmt: str, image: PIL.Image.Image) -> dict:
    with PIL.Image.open(io.BytesIO(data)) as opened:
        valid = opened.format == fmt.upper()
        opened.verify()  # chunk CRCs and structure
    decoded = np.asarray(PIL.Image.open(io.BytesIO(data)).convert("RGB"))
    error = np.abs(decoded.astype(np.int16) - np.asarray(image).astype(np.int16))
    return {"valid_file": valid, "same_pixels": bool(error.max() == 0), "max_pixel_error": int(error.max())}


def run(repeats: int, size: int, gil_seconds: float = 0.3) -> dict:
    image = photo_like(size)
    rows = []
    for name, (fmt, encode) in candidates().items():
        if encode is None:
            rows.append({"encoder": name, "format": fmt, "installed": False})
            continue
        seconds, data = measure(encode, image, repeats)
        # ~1: the encode releases the GIL (a request's images encode side by side, the server's other threads run
        # meanwhile); near 0: it holds it (they wait for each other)
        kept = statistics.median(python_speed_kept(lambda: encode(image), gil_seconds) for _ in range(3))  # noqa: B023
        rows.append(
            {"encoder": name, "format": fmt, "installed": True, "seconds": seconds, "bytes": len(data)}
            | check(data, fmt, image)
            | {"python_speed_kept_while_encoding": round(kept, 2)}
        )
    return {
        "benchmark": "output encoders, one photo-like image",
        "command": command("benchmarks.encoders"),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": device_name(),
        "versions": {"python": sys.version.split()[0], "pillow": PIL.__version__},
        "workload": {"size": size, "repeats": repeats, "statistic": "median", "threads": 1, "gil_seconds": gil_seconds},
        "note": "A shared 2-core machine: times vary run to run by ±30 %; the ratios hold.",
        "results": rows,
    }


def markdown(report: dict) -> str:
    lines = [
        "| encoder | format | ms | size (MB) | valid | same pixels | Python speed kept while encoding (GIL) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in report["results"]:
        if not row["installed"]:
            lines.append(f"| {row['encoder']} | {row['format']} | not installed | | | | |")
            continue
        lines.append(
            f"| {row['encoder']} | {row['format']} | {row['seconds'] * 1000:.1f} | {row['bytes'] / 1e6:.2f} | "
            f"{'yes' if row['valid_file'] else 'NO'} | {'yes' if row['same_pixels'] else 'no (lossy)'} | "
            f"{row['python_speed_kept_while_encoding']:.2f} |"
        )
    head = f"{report['benchmark']} ({report['workload']['size']}²) — {report['device']} — `{report['command']}`"
    return head + "\n\n" + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--gil-seconds", type=float, default=0.3, help="length of each of the 3 GIL measurements")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/encoders.json"))
    args = parser.parse_args(argv)
    report = run(args.repeats, args.size, args.gil_seconds)
    write(report, args.out, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
