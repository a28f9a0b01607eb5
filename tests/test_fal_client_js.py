"""fal's JavaScript client, unmodified, under Node, through the server's own fal proxy route."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import decode, image_bytes, start_server

JS_DIR = Path(__file__).with_name("js")

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or not (JS_DIR / "node_modules" / "@fal-ai" / "client").is_dir(),
    reason="needs node and `npm install --prefix tests/js` (README test command does it)",
)


@pytest.fixture(scope="module")
def keyed_server(tiny_weights, tmp_path_factory):
    root = tmp_path_factory.mktemp("js")
    env = {"FLUX2_API_KEYS": "js-key", "FLUX2_CORS_ORIGINS": "http://studio.example"}
    process, url = start_server(tiny_weights, root / "data", root / "log", env=env)
    yield url, root
    process.terminate()
    process.wait(timeout=30)


def test_fal_client_js_through_the_proxy(keyed_server, tmp_path):
    url, _ = keyed_server
    reference = image_bytes(96, 96, seed=21)
    (tmp_path / "input.png").write_bytes(reference)
    ran = subprocess.run(
        ["node", str(JS_DIR / "fal_client_test.mjs"), f"{url}/api/fal/proxy", str(tmp_path / "input.png")],
        env={**os.environ, "FAL_KEY": "js-key"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr + ran.stdout
    out = json.loads(ran.stdout)

    # storage.upload: the file is served back byte for byte, and the server used it as the input
    assert out["uploadedUrl"].startswith(url + "/files/upload-")
    assert httpx.get(out["uploadedUrl"]).content == reference

    def pixels(result):
        return np.asarray(decode(httpx.get(result["images"][0]["url"]).content))

    assert pixels(out["subscribe"]["data"]).shape == (512, 512, 3)
    final = out["subscribe"]["updates"][-1]
    assert final["status"] == "COMPLETED"
    assert [m for m in final["logs"] if m.startswith("step ")] == [f"step {i}/5" for i in range(1, 6)]
    assert out["queue"]["finalStatus"] == "COMPLETED" and out["queue"]["steps"] == 8
    assert out["queue"]["result"]["seed"] == 9
    assert out["streamDone"] == "COMPLETED" and out["streamed"][-1] == "COMPLETED"
    assert out["cancelled"][0] == {"error_type": "request_cancelled", "steps": 0}
    assert out["cancelled"][1]["error_type"] == "request_cancelled" and out["cancelled"][1]["steps"] < 50
    assert pixels(out["run"]).shape == (512, 512, 3)


def test_proxy_refuses_other_targets_and_needs_a_key(keyed_server):
    url, _ = keyed_server
    proxy = f"{url}/api/fal/proxy"
    elsewhere = httpx.get(proxy, headers={"x-fal-target-url": "https://example.com/x", "Authorization": "Key js-key"})
    assert elsewhere.status_code == 412 and "not served here" in elsewhere.json()["detail"]
    assert httpx.get(proxy).status_code == 412
    no_key = httpx.post(proxy, headers={"x-fal-target-url": "https://queue.fal.run/fal-ai/flux-2/edit"}, json={})
    assert no_key.status_code == 401


def test_upload_urls_are_one_time_and_size_limited(keyed_server):
    url, _ = keyed_server
    headers = {"Authorization": "Key js-key"}
    target = httpx.post(f"{url}/storage/upload/initiate", json={"content_type": "image/png"}, headers=headers).json()
    assert httpx.put(target["upload_url"], content=b"png bytes").status_code == 200
    assert httpx.put(target["upload_url"], content=b"again").status_code == 404
    assert httpx.get(target["file_url"]).content == b"png bytes"
    assert httpx.put(f"{url}/storage/upload/put/not-a-token", content=b"x").status_code == 404


def test_multipart_upload(keyed_server):
    url, _ = keyed_server
    headers = {"Authorization": "Key js-key"}
    target = httpx.post(
        f"{url}/storage/upload/initiate-multipart", json={"content_type": "image/png"}, headers=headers
    ).json()
    parts = [httpx.put(f"{target['upload_url']}/{n}", content=chunk).json() for n, chunk in [(1, b"ab"), (2, b"cd")]]
    done = httpx.post(f"{target['upload_url']}/complete", json={"parts": parts})
    assert done.status_code == 200
    assert httpx.get(target["file_url"]).content == b"abcd"


def test_cors_for_browser_pages_on_allowed_origins_only(keyed_server, server):
    url, _ = keyed_server
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type,x-fal-target-url",
    }
    allowed = httpx.options(f"{url}/api/fal/proxy", headers={"Origin": "http://studio.example", **preflight})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "http://studio.example"
    assert "x-fal-target-url" in allowed.headers["access-control-allow-headers"].lower()
    other = httpx.options(f"{url}/api/fal/proxy", headers={"Origin": "http://elsewhere.example", **preflight})
    assert "access-control-allow-origin" not in other.headers
    # closed by default: the shared test server has no CORS origins configured
    closed = server.client.get(f"{server.url}/health", headers={"Origin": "http://studio.example"})
    assert "access-control-allow-origin" not in closed.headers


def test_fal_shapes_as_the_js_client_sees_them(keyed_server, tmp_path):
    """Issue 16 through @fal-ai/client: IN_QUEUE submit, lax inputs, queue-time validation, request ids on errors
    (ApiError.requestId), cancel NOT_FOUND, and the 404 of an unknown endpoint."""
    url, _ = keyed_server
    (tmp_path / "input.png").write_bytes(image_bytes(64, 64, seed=3))
    ran = subprocess.run(
        ["node", str(JS_DIR / "fal_compat_test.mjs"), f"{url}/api/fal/proxy", str(tmp_path / "input.png")],
        env={**os.environ, "FAL_KEY": "js-key"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr + ran.stdout
    out = json.loads(ran.stdout)
    assert out["submitted"] == {"status": "IN_QUEUE", "sameGatewayId": True}
    assert out["result"]["seed"] == -3 and out["result"]["requestId"] == out["result"]["expected"]
    invalid = out["invalidQueued"]
    assert invalid["status"] == 422 and invalid["validation"] and invalid["requestId"] == invalid["expected"]
    assert invalid["body"]["detail"][0]["loc"] == ["body", "prompt"]
    assert out["invalidRun"]["status"] == 422 and len(out["invalidRun"]["requestId"]) == 36
    assert out["cancelUnknown"]["status"] == 404 and out["cancelUnknown"]["body"] == {"status": "NOT_FOUND"}
    unknown = out["unknownEndpoint"]
    assert unknown["status"] == 404 and "fal-ai/flux-2/flash/edit" in unknown["body"]["detail"]
