"""The playground at / in headless Chromium: form from the schema, uploads (picker and drag-drop), a queued run with
live step progress, the result shown with its seed, a validation error shown at its field, and snippets.

Set FLUX2_PLAYGROUND_SCREENSHOT=path to keep the screenshot (docs/playground.png is made this way)."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import image_bytes

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
playwright = pytest.importorskip("playwright.sync_api", reason="needs the playwright package (test extra)")
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (.ci/run installs it)")

DROP = """([name, b64]) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const transfer = new DataTransfer();
  transfer.items.add(new File([bytes], name, { type: "image/png" }));
  document.querySelector("#dropzone").dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true }));
}"""
RECORD_STATUS = """() => {
  window.statusTexts = [];
  new MutationObserver(() => window.statusTexts.push(document.querySelector("#status-text").textContent))
    .observe(document.querySelector("#status-text"), { childList: true, characterData: true, subtree: true });
}"""


JS_DIR = Path(__file__).with_name("js")  # @fal-ai/client is installed there


def run_js_snippet_under_node(snippet: str, url: str) -> None:
    """The JS tab's snippet, as a user pastes it, runs under Node with the unmodified @fal-ai/client and gets its
    image from this server (a plain-string proxyUrl would send it to fal.run instead)."""
    if shutil.which("node") is None or not (JS_DIR / "node_modules" / "@fal-ai" / "client").is_dir():
        pytest.skip("needs node and `npm install --prefix tests/js`")
    script = JS_DIR / f"snippet-{os.getpid()}.mjs"  # beside node_modules, so the import resolves
    script.write_text(snippet)
    try:
        ran = subprocess.run(["node", str(script)], capture_output=True, text=True, timeout=300, check=False)
    finally:
        script.unlink()
    assert ran.returncode == 0, ran.stderr + ran.stdout
    assert f"{url}/files/" in ran.stdout.splitlines()[-1] and "COMPLETED" in ran.stdout


@pytest.fixture
def page(server):
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
        )
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        outside = []  # every request the page makes must go to this server (air-gapped)
        page.on(
            "request", lambda r: None if r.url.startswith((server.url, "blob:", "data:")) else outside.append(r.url)
        )
        yield page
        browser.close()
        assert not outside, f"the playground reached outside the server: {outside}"


def test_playground_end_to_end(server, page, tmp_path):
    picked = tmp_path / "picked.png"
    picked.write_bytes(image_bytes(128, 96, seed=5))
    page.goto(server.url + "/?endpoint_id=fal-ai/flux-2/flash/edit")
    page.wait_for_selector("body[data-ready=true]")

    # the form comes from the endpoint's schema: flash has no steps field; ranges and defaults are shown
    assert page.locator("#fields [data-field=num_inference_steps]").count() == 0
    assert "0–20, default 2.5" in page.locator("[data-field=guidance_scale] .name").inner_text()
    page.select_option("#endpoint", "fal-ai/flux-2/edit")
    page.wait_for_selector("[data-field=num_inference_steps]")
    assert "4–50, default 28" in page.locator("[data-field=num_inference_steps] .name").inner_text()
    assert page.input_value("#f-num_inference_steps") == "28"

    # two references: one through the file picker, one dropped; both uploaded through the storage emulation
    page.set_input_files("#files", str(picked))
    page.evaluate(DROP, ["dropped.png", base64.b64encode(image_bytes(96, 96, seed=6)).decode()])
    page.wait_for_function("document.querySelectorAll('#thumbs li.uploaded').length === 2")

    page.fill("#f-prompt", "Make the sky purple")
    page.fill("#f-seed", "7")
    page.fill("#f-num_inference_steps", "30")
    page.select_option("#f-image_size", "square_hd")
    page.evaluate(RECORD_STATUS)
    page.click("#submit")
    page.wait_for_selector(".result img", timeout=240_000)
    page.wait_for_function("document.querySelector('.result img').naturalWidth === 1024", timeout=60_000)
    texts = page.evaluate("window.statusTexts")
    assert any(t.startswith("Running: step ") and t.endswith(" of 30") for t in texts), texts  # live progress
    assert page.locator("#status-text").inner_text() == "Completed"
    assert page.locator("#log li", has_text="step 30/30").count() == 1
    meta = page.locator(".result .meta").inner_text()
    assert "seed 7" in meta and "fal-ai/flux-2/edit" in meta and "inference" in meta
    download = page.locator(".result figcaption a")
    assert download.get_attribute("href").startswith(server.url + "/files/") and download.get_attribute("download")

    # snippets point at this server with the form's input
    curl = page.locator("#snippet").inner_text()
    assert f"curl -X POST {server.url}/fal-ai/flux-2/edit" in curl and '"num_inference_steps":30' in curl
    assert f"{server.url}/files/upload-" in curl
    page.click("[data-snippet=python]")
    python = page.locator("#snippet").inner_text()
    # served over http://, which fal_client can't use: the snippet says what to run first and gives the TLS form
    assert "this page is served over http://: it can't reach this address" in python
    assert "flux2-server tls 127.0.0.1 --out tls" in python and "--ssl-certfile tls/server.pem" in python
    assert 'os.environ["FAL_QUEUE_RUN_HOST"] = "127.0.0.1:8443/queue"' in python and '"seed": 7' in python
    assert 'os.environ["SSL_CERT_FILE"] = "tls/ca.pem"' in python
    page.click("[data-snippet=js]")
    js = page.locator("#snippet").inner_text()
    assert f'proxyUrl: {{ url: "{server.url}/api/fal/proxy", when: "always" }}' in js
    run_js_snippet_under_node(js, server.url)
    page.click("[data-snippet=curl]")

    screenshot = tmp_path / "playground.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000
    if os.environ.get("FLUX2_PLAYGROUND_SCREENSHOT"):
        shutil.copy(screenshot, os.environ["FLUX2_PLAYGROUND_SCREENSHOT"])

    # a value out of range: the server's 422, in plain words at the field
    page.fill("#f-guidance_scale", "25")
    page.click("#submit")
    error = page.locator("[data-error-for=guidance_scale]")
    error.wait_for(state="visible")
    assert "less than or equal to 20" in error.inner_text()
    assert page.locator("[data-field=guidance_scale]").get_attribute("class") == "field invalid"
    assert "The server refused the request (422)" in page.locator("#banner").inner_text()
    assert page.locator(".result").count() == 1  # nothing new was run


def test_switching_endpoint_with_a_changed_field_focused(server, page):
    """No uncaught error when the endpoint changes while an edited field (gone from the new schema) has focus; no
    request of the page fails (the favicon included)."""
    errors, failed = [], []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    page.goto(server.url + "/?endpoint_id=fal-ai/flux-2/edit")
    page.wait_for_selector("body[data-ready=true]")
    page.fill("#f-num_inference_steps", "30")  # changed, and still focused
    page.focus("#f-num_inference_steps")
    page.select_option("#endpoint", "fal-ai/flux-2/flash/edit")
    page.wait_for_function("!document.querySelector('[data-field=num_inference_steps]')")
    page.fill("#f-prompt", "a red hat")  # the form still works: the snippet follows it
    assert '"prompt":"a red hat"' in page.locator("#snippet").inner_text()
    # the page's icon, and the one browsers ask /favicon.ico for unasked, both decode as images
    icon = page.get_attribute("link[rel=icon]", "href")
    for url in (icon, "/favicon.ico"):
        width = page.evaluate(
            "(url) => new Promise((done) => { const i = new Image(); i.onload = () => done(i.naturalWidth); "
            "i.onerror = () => done(0); i.src = url; })",
            url,
        )
        assert width > 0, url
    assert errors == [], errors
    assert failed == [], failed


def test_playground_assets_are_served_without_a_key(server):
    for path, kind in (("/", "text/html"), ("/static/playground.js", "javascript"), ("/static/playground.css", "css")):
        response = server.client.get(server.url + path)
        assert response.status_code == 200 and kind in response.headers["content-type"]
    assert "cdn" not in server.client.get(server.url + "/").text.lower()


def test_text_to_image_in_the_playground(server, page):
    """A text-to-image endpoint: no drop zone, the form from its schema (fal's default size), a run without images,
    and snippets without image_urls."""
    page.goto(server.url + "/?endpoint_id=fal-ai/flux-2/flash")
    page.wait_for_selector("body[data-ready=true]")
    assert page.input_value("#endpoint") == "fal-ai/flux-2/flash"
    options = page.eval_on_selector_all("#endpoint option", "(os) => os.map((o) => o.value)")
    assert {"fal-ai/flux-2", "fal-ai/flux-2/turbo", "fal-ai/flux-2/flash", "fal-ai/flux-2/edit"} <= set(options)
    assert not page.locator("[data-field=image_urls]").is_visible()
    assert page.input_value("#f-image_size") == "landscape_4_3"
    page.fill("#f-prompt", "A lighthouse at dusk")
    page.fill("#f-seed", "4")
    page.select_option("#f-image_size", "square")
    page.click("#submit")
    page.wait_for_selector(".result img", timeout=240_000)
    page.wait_for_function("document.querySelector('.result img').naturalWidth === 512", timeout=60_000)
    assert "fal-ai/flux-2/flash · seed 4" in page.locator(".result .meta").inner_text()
    assert "image_urls" not in page.locator("#snippet").inner_text()
    page.select_option("#endpoint", "fal-ai/flux-2/edit")  # back to an edit endpoint: the drop zone is back
    page.wait_for_selector("[data-field=num_inference_steps]")
    assert page.locator("[data-field=image_urls]").is_visible()


def test_loras_in_the_playground(server, page):
    """The LoRA endpoints: a row per LoRA (path, scale), at most 3, in the request and its snippets; kept across a
    switch between the two LoRA endpoints."""
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(server.url + "/?endpoint_id=fal-ai/flux-2/lora")
    page.wait_for_selector("body[data-ready=true]")
    options = page.eval_on_selector_all("#endpoint option", "(os) => os.map((o) => o.value)")
    assert {"fal-ai/flux-2/lora", "fal-ai/flux-2/lora/edit"} <= set(options)
    for _ in range(3):
        page.click("[data-field=loras] .add-lora")
    assert page.is_disabled("[data-field=loras] .add-lora")  # fal's maximum: 3
    rows = page.locator("[data-field=loras] .lora")
    rows.nth(0).locator("input[type=text]").fill("studio/ink")
    rows.nth(0).locator("input[type=number]").fill("0.8")
    rows.nth(1).locator("input[type=text]").fill("https://example.com/style.safetensors")
    rows.nth(2).locator("button").click()  # removed; and a row left empty is not sent
    assert not page.is_disabled("[data-field=loras] .add-lora")
    snippet = page.locator("#snippet").inner_text()
    assert '"loras":[{"path":"studio/ink","scale":0.8},{"path":"https://example.com/style.safetensors","scale":1}]' in (
        snippet
    )
    page.select_option("#endpoint", "fal-ai/flux-2/lora/edit")
    page.wait_for_selector("[data-field=image_urls]:visible")
    assert page.locator("[data-field=loras] .lora").count() == 2  # carried over
    page.select_option("#endpoint", "fal-ai/flux-2/edit")  # no loras there: the field is gone
    page.wait_for_function("!document.querySelector('[data-field=loras]')")
    assert "loras" not in page.locator("#snippet").inner_text()
    assert errors == [], errors
