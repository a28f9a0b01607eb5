"""Shared fixtures: the tiny model built once per session, and the real server started on loopback."""

from __future__ import annotations

import os

# One OpenMP thread per process (this one and every server, worker and script the tests start, which inherit the
# environment), set before torch loads. The tiny model's operations are too small to gain from a second thread,
# and with more threads than free cores (a busy machine, `pytest -n`) OpenMP's threads wait for each other at
# every operation: a tiny 512x512 edit measured 18 s with two threads on a loaded 2-core machine, 1.3 s with one.
# An explicit OMP_NUM_THREADS in the environment wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import base64
import io
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import PIL.Image
import pytest
from fastapi.testclient import TestClient

from benchmarks.loopback import free_port, start_server  # noqa: F401 (tests import them from here)
from server.cli.tiny import ensure_tiny
from server.config import Settings
from server.http.app import create_app
from server.service import model as service_model
from weights.tiny import build_tiny


def image_bytes(width: int = 64, height: int = 48, seed: int = 0, fmt: str = "PNG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def data_uri(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def decode(data: bytes) -> PIL.Image.Image:
    image = PIL.Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory, worker_id) -> Path:
    """The tiny model, built once per run: under pytest-xdist (`-n`) the workers share one copy in the run's
    temporary directory, built by the first that needs it under a file lock (server.cli.tiny.ensure_tiny)."""
    return tiny_model_for(tmp_path_factory, worker_id)


def tiny_model_for(tmp_path_factory, worker_id: str) -> Path:
    if worker_id == "master":  # no xdist
        return build_tiny(tmp_path_factory.mktemp("tiny") / "FLUX.2-tiny")
    # xdist gives each worker <run's temporary directory>/popen-gwN: the run's directory is shared
    return ensure_tiny(tmp_path_factory.getbasetemp().parent / "tiny" / "FLUX.2-tiny")


@pytest.fixture(scope="session")
def worker_id(request) -> str:
    """pytest-xdist's worker name (gw0, gw1, ...), or "master" in a plain run (xdist's own fixture when loaded)."""
    return getattr(request.config, "workerinput", {}).get("workerid", "master")


@dataclass
class RunningServer:
    url: str
    data_dir: Path
    log_path: Path
    client: httpx.Client

    def post(self, endpoint: str, body: dict) -> httpx.Response:
        return self.client.post(f"{self.url}/{endpoint}", json=body)

    def log(self) -> str:
        return self.log_path.read_text()

    def fetch_image(self, image: dict) -> tuple[bytes, PIL.Image.Image]:
        """The bytes behind an output ImageFile (data URI or served URL), and the decoded image."""
        url = image["url"]
        if url.startswith("data:"):
            data = base64.b64decode(url.partition(",")[2])
        else:
            response = self.client.get(url)
            assert response.status_code == 200, response.text
            assert response.headers["content-type"] == image["content_type"]
            data = response.content
        return data, decode(data)


@pytest.fixture(scope="session")
def server(tiny_weights, tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    process, url = start_server(tiny_weights, root / "data", root / "server.log")
    with httpx.Client(timeout=300) as client:
        yield RunningServer(url=url, data_dir=root / "data", log_path=root / "server.log", client=client)
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture
def fake_server(tmp_path, monkeypatch):
    """The real app in this process (routes, services, dispatcher; tests/fake_editor.py for the model): call it
    with a FakeEditor (and settings) to get (TestClient, app). Milliseconds per request, no model, no process."""
    opened = []

    def start(editor, **settings) -> tuple[TestClient, object]:
        monkeypatch.setattr(service_model, "load_model", lambda *args: editor)
        settings = {"allowed_hosts": "testserver", **settings}  # TestClient's Host
        app = create_app(Settings(data_dir=tmp_path / "data", **settings), tmp_path / "weights")
        client = TestClient(app)
        client.__enter__()
        opened.append(client)
        assert client.get("/ready").status_code == 200
        return client, app

    yield start
    for client in opened:
        client.__exit__(None, None, None)


def pytest_terminal_summary(terminalreporter) -> None:
    """The suite ends by saying what it skipped and why (e.g. no redis-server, no chromium), with counts."""
    reasons: dict[str, int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        reasons[reason] = reasons.get(reason, 0) + 1
    if reasons:
        terminalreporter.section("skipped, and why")
        for reason, count in sorted(reasons.items(), key=lambda item: -item[1]):
            terminalreporter.write_line(f"{count:4} {reason}")
