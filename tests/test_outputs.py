"""Output encoders (server/files/outputs.py): every encoder writes a valid file of the requested format, PNGs decode
to exactly the model's pixels, and a request's images are written side by side on a pool; the encoder benchmark
runs (briefly) and writes its report."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import PIL.Image
import pytest

from benchmarks.encoders import photo_like
from server.files.outputs import CONTENT_TYPES, Encoding, OutputStore, encode


@pytest.mark.parametrize(
    "output_format, encoding",
    [
        ("png", Encoding()),  # fpng, the default
        ("png", Encoding("pillow", 1)),
        ("png", Encoding("pillow", 9)),
        ("jpeg", Encoding()),
        ("webp", Encoding()),
    ],
)
def test_each_encoder_writes_a_valid_file_of_its_format(output_format, encoding):
    image = photo_like(256, seed=3)
    data = encode(image, output_format, encoding)
    with PIL.Image.open(io.BytesIO(data)) as opened:
        assert opened.format == output_format.upper() and opened.size == (256, 256)
        opened.verify()  # structure and checksums
    decoded = np.asarray(PIL.Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)
    error = np.abs(decoded - np.asarray(image, dtype=np.int16))
    if output_format == "png":
        assert error.max() == 0  # lossless: the same pixels
    else:
        assert error.mean() < 6  # lossy at quality 95 (the fine noise goes), but the same picture


def test_fpng_is_the_default_and_writes_the_same_pixels_as_pillow():
    image = photo_like(128, seed=1)
    fast, pillow = encode(image, "png"), encode(image, "png", Encoding("pillow", 6))
    assert fast != pillow  # two different encoders ...
    as_pixels = lambda data: np.asarray(PIL.Image.open(io.BytesIO(data)))
    assert np.array_equal(as_pixels(fast), as_pixels(pillow))  # ... of the same image
    grey = PIL.Image.new("L", (20, 10), 77)  # fpng writes RGB(A): other modes are converted first
    assert PIL.Image.open(io.BytesIO(encode(grey, "png"))).getpixel((0, 0)) == (77, 77, 77)


def test_a_requests_images_are_encoded_side_by_side_on_the_pool(tmp_path, monkeypatch):
    """With a pool, the images of one request are encoded at once (all four enter before any leaves), and the
    files come back in the images' order with what fal's File carries."""
    from server.files import outputs

    entered, release = [], threading.Event()
    real = outputs.encode

    def gated(image, output_format, encoding=outputs.DEFAULT_ENCODING):
        entered.append(image.size)
        if len(entered) == 4:
            release.set()
        assert release.wait(10), "the images were encoded one after another"
        return real(image, output_format, encoding)

    monkeypatch.setattr(outputs, "encode", gated)
    images = [photo_like(32 + 8 * n, seed=n) for n in range(4)]
    store = OutputStore(tmp_path)
    with ThreadPoolExecutor(4) as pool:
        files = store.save(images, "png", "http://h/", sync_mode=False, pool=pool)
    assert [(f.width, f.height) for f in files] == [image.size for image in images]
    for f, image in zip(files, images, strict=True):
        assert f.content_type == CONTENT_TYPES["png"] and f.url == f"http://h/files/{f.file_name}"
        written = (tmp_path / "files" / f.file_name).read_bytes()
        assert f.file_size == len(written)
        assert np.array_equal(np.asarray(PIL.Image.open(io.BytesIO(written))), np.asarray(image))


def test_encoder_benchmark_writes_its_report(tmp_path):
    out = tmp_path / "encoders.json"
    ran = subprocess.run(
        [sys.executable, "-m", "benchmarks.encoders", "--repeats", "1", "--size", "128", "--gil-seconds", "0.01"]
        + ["--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    report = json.loads(out.read_text())
    assert report["command"].startswith("python") and report["device"]
    rows = {row["encoder"]: row for row in report["results"]}
    assert rows["fpng"]["installed"] and rows["fpng"]["same_pixels"] and rows["fpng"]["valid_file"]
    assert all(row["valid_file"] for row in rows.values() if row["installed"])
    assert all(0 <= row["python_speed_kept_while_encoding"] for row in rows.values() if row["installed"])
    assert "| fpng | png |" in out.with_suffix(".md").read_text()
