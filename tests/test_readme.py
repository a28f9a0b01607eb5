"""README's examples run as written: the curl one-liner sends a real local file to the tiny server; the suite
says what it skipped and why (README's Test paragraph)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import decode, image_bytes

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def readme_block(marker: str) -> str:
    """The indented code block between `<!-- marker ... -->` and `<!-- /marker -->`, dedented."""
    found = re.search(rf"<!-- {marker}\b[^\n]*-->\n(.*?)<!-- /{marker} -->", README.read_text(), re.DOTALL)
    assert found, f"README.md has lost its {marker} markers"
    return "".join(line.removeprefix("    ") + "\n" for line in found[1].splitlines())


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_readme_curl_example_edits_a_local_file(server, tmp_path):
    (tmp_path / "photo.jpg").write_bytes(image_bytes(96, 96, seed=3, fmt="JPEG"))
    command = readme_block("curl-example").replace("http://127.0.0.1:8000", server.url)
    result = subprocess.run(
        ["bash", "-c", command], check=False, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    data, image = server.fetch_image(answer["images"][0])
    assert image.size == (1024, 1024) and answer["prompt"] == "make it winter"
    assert decode(data).format == "PNG"


def test_the_suite_says_what_it_skipped_and_why(tmp_path):
    (tmp_path / "test_skips.py").write_text(
        "import pytest\n\n"
        "@pytest.mark.skipif(True, reason='needs redis-server')\n"
        "def test_a():\n    pass\n\n"
        "@pytest.mark.skipif(True, reason='needs redis-server')\n"
        "def test_b():\n    pass\n\n"
        "def test_c():\n    pytest.skip('needs chromium')\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider", str(tmp_path)],
        check=False,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))},
    )
    summary = result.stdout.partition("skipped, and why")[2]
    assert "   2 needs redis-server" in summary and "   1 needs chromium" in summary, result.stdout
