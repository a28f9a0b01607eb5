"""fal's own Python client, unmodified, against the server over TLS with a locally made CA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from server.cli.tls import make_certificates
from tests.conftest import data_uri, decode, image_bytes, start_server

SCRIPT = Path(__file__).with_name("fal_client_script.py")


@pytest.fixture(scope="module")
def tls_server(tiny_weights, tmp_path_factory):
    root = tmp_path_factory.mktemp("tls")
    paths = make_certificates(["127.0.0.1", "localhost"], root / "tls")
    process, url = start_server(
        tiny_weights,
        root / "data",
        root / "server.log",
        "--ssl-certfile",
        str(paths["cert"]),
        "--ssl-keyfile",
        str(paths["key"]),
        scheme="https",
        verify=str(paths["ca"]),
        env={"FLUX2_API_KEYS": "studio-secret"},
    )
    yield url, paths["ca"]
    process.terminate()
    process.wait(timeout=30)


def test_fal_client_python(tls_server, tmp_path):
    url, ca = tls_server
    host = url.removeprefix("https://")
    env = {
        **os.environ,
        "FAL_RUN_HOST": host,
        "FAL_QUEUE_RUN_HOST": f"{host}/queue",
        "FAL_KEY": "studio-secret",  # sent as `Authorization: Key studio-secret`
        "SSL_CERT_FILE": str(ca),
    }
    big = tmp_path / "large.png"
    big.write_bytes(image_bytes(2900, 2900, seed=8))  # incompressible noise: about 25 MB of PNG
    ran = subprocess.run(
        [sys.executable, str(SCRIPT), data_uri(image_bytes(96, 96)), str(big)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    out = json.loads(ran.stdout)

    def pixels(result):
        image = result["images"][0]
        assert image["url"].startswith(url + "/files/")
        return np.asarray(decode(httpx.get(image["url"], verify=str(ca)).content))

    # subscribe: queue updates with per-step logs, then the result
    assert pixels(out["subscribe"]).shape == (512, 512, 3)
    assert out["subscribe_updates"][-1]["type"] == "Completed"
    final_logs = out["subscribe_updates"][-1]["logs"]
    assert [m for m in final_logs if m.startswith("step ")] == [f"step {i}/6" for i in range(1, 7)]

    # submit + status events + result, status by id
    assert out["status_types"][-1] == "Completed"
    assert out["status_by_id"] == "Completed"
    assert out["result"]["seed"] == 5 and len(out["result"]["images"]) == 1

    # cancel: a queued request at once, a running one at its next step
    assert out["cancelled_queued"] == {
        "error": "Request was cancelled",
        "error_type": "request_cancelled",
        "status_code": 400,
        "steps_logged": 0,
    }
    running = out["cancelled_running"]
    assert running["error_type"] == "request_cancelled" and 0 < running["steps_logged"] < 50

    # run (sync endpoint) and the async client
    assert np.array_equal(pixels(out["run"]), pixels(out["async_subscribe"]))  # same seed, same profile
    assert np.array_equal(pixels(out["run"]), pixels(out["async_get"]))

    # a large local file as a data URI through the real client
    assert out["large_data_uri_chars"] > 30_000_000
    assert pixels(out["large"]).shape == (512, 512, 3)


def test_fal_shapes_as_the_python_client_sees_them(tls_server):
    """Issue 16 through fal_client: lax inputs, any integer seed, queue-time validation with the request id on the
    error, a refused webhook URL at submit, and an unknown endpoint's 404 naming the served ones."""
    url, ca = tls_server
    host = url.removeprefix("https://")
    env = {**os.environ, "FAL_RUN_HOST": host, "FAL_QUEUE_RUN_HOST": f"{host}/queue", "FAL_KEY": "studio-secret"}
    script = SCRIPT.with_name("fal_client_compat_script.py")
    refused_hook = "http://127.0.0.1:9/hook"  # loopback: the SSRF guard refuses it (no FLUX2_FETCH_ALLOW here)
    ran = subprocess.run(
        [sys.executable, str(script), data_uri(image_bytes(64, 64)), refused_hook],
        env={**env, "SSL_CERT_FILE": str(ca)},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    out = json.loads(ran.stdout)
    assert out["lax"] == {"seed": -7, "width": 512}
    invalid = out["invalid_queued"]
    assert invalid["status"] == 422 and invalid["request_id"] == invalid["expected"]
    assert invalid["body"]["detail"][0]["loc"] == ["body", "prompt"]
    refused = out["refused_webhook"]
    assert refused["status"] == 422 and refused["body"]["detail"][0]["loc"] == ["query", "fal_webhook"]
    assert out["unknown"]["status"] == 404 and "fal-ai/flux-2/edit" in out["unknown"]["body"]["detail"]


def test_text_to_image_endpoints_through_the_python_client(tls_server):
    """fal-ai/flux-2, /turbo and /flash through fal_client: subscribe (queue, logs), submit/status/result by id, and
    run (sync); fal's default size for text to image (landscape_4_3: 1024x768); each profile's steps."""
    url, ca = tls_server
    host = url.removeprefix("https://")
    env = {**os.environ, "FAL_RUN_HOST": host, "FAL_QUEUE_RUN_HOST": f"{host}/queue", "FAL_KEY": "studio-secret"}
    ran = subprocess.run(
        [sys.executable, str(SCRIPT.with_name("fal_client_text_to_image_script.py"))],
        env={**env, "SSL_CERT_FILE": str(ca)},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    out = json.loads(ran.stdout)

    def size(result) -> tuple[int, int]:
        image = result["images"][0]
        assert image["url"].startswith(url + "/files/")
        decoded = decode(httpx.get(image["url"], verify=str(ca)).content)
        assert decoded.size == (image["width"], image["height"])
        return decoded.size

    for endpoint, steps in (("fal-ai/flux-2", 5), ("fal-ai/flux-2/turbo", 8), ("fal-ai/flux-2/flash", 4)):
        called = out[endpoint]
        assert size(called["result"]) == (512, 512) and called["result"]["seed"] == 3
        assert [m for m in called["logs"] if m.startswith("step ")] == [
            f"step {i}/{steps}" for i in range(1, steps + 1)
        ]
        assert any("text to image" in m for m in called["logs"])  # no reference images were fetched
    assert out["status_by_id"] in ("Queued", "InProgress", "Completed")
    assert size(out["default_size"]) == (1024, 768)
    assert size(out["run"]) == (512, 512)
    # the sync run is the queued call's twin (same seed, profile and size): the same PNG bytes
    assert out["run"]["images"][0]["file_size"] == out["fal-ai/flux-2/turbo"]["result"]["images"][0]["file_size"]
