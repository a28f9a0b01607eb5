"""fal's JavaScript client in a real browser (headless Chromium), on a page from another origin, through the proxy."""

from __future__ import annotations

import base64
import functools
import shutil
import subprocess
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.conftest import free_port, image_bytes, start_server

JS_DIR = Path(__file__).with_name("js")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ESBUILD = JS_DIR / "node_modules" / ".bin" / "esbuild"

playwright = pytest.importorskip("playwright.sync_api", reason="needs the playwright package (test extra)")
pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists() or not ESBUILD.exists(),
    reason="needs Debian's chromium and `npm install --prefix tests/js` (.ci/run installs both)",
)


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def page_site(tmp_path):
    """A static site on its own port (its own origin) with the bundled client."""
    subprocess.run(
        [
            str(ESBUILD),
            str(JS_DIR / "browser_entry.mjs"),
            "--bundle",
            "--format=iife",
            "--platform=browser",
            f"--outfile={tmp_path / 'bundle.js'}",
            "--log-level=warning",
        ],
        check=True,
        cwd=JS_DIR,
    )
    (tmp_path / "index.html").write_text('<!doctype html><title>studio</title><script src="bundle.js"></script>')
    site = ThreadingHTTPServer(("127.0.0.1", free_port()), functools.partial(QuietHandler, directory=str(tmp_path)))
    threading.Thread(target=site.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{site.server_port}"
    site.shutdown()


def test_fal_client_in_a_browser_on_another_origin(page_site, tiny_weights, tmp_path):
    process, url = start_server(
        tiny_weights, tmp_path / "data", tmp_path / "log", env={"FLUX2_CORS_ORIGINS": page_site}
    )
    reference = image_bytes(96, 96, seed=33)
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM,
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
            )
            page = browser.new_page()
            page.goto(page_site + "/index.html")
            out = page.evaluate(
                "([proxy, png]) => window.runFal(proxy, png)",
                [f"{url}/api/fal/proxy", base64.b64encode(reference).decode()],
            )
            browser.close()
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert out["uploaded"].startswith(url + "/files/upload-")
    assert out["statuses"][-1] == "COMPLETED"
    image = out["data"]["images"][0]
    assert (image["width"], image["height"]) == (512, 512) and out["data"]["seed"] == 4
    assert out["requestId"]
    assert image["url"].startswith(url + "/files/")
