"""`flux2-server serve --tiny` builds the tiny model into a cache on first use and serves it."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx

from server.cli import ensure_tiny
from tests.conftest import free_port
from weights.verify import verify


def test_ensure_tiny_builds_once_then_reuses(tmp_path):
    directory = tmp_path / "tiny"
    assert ensure_tiny(directory) == directory and verify(directory).ok
    marker = directory / "model_index.json"
    built_at = marker.stat().st_mtime_ns
    ensure_tiny(directory)
    assert marker.stat().st_mtime_ns == built_at  # reused, not rebuilt
    (directory / "vae" / "config.json").unlink()
    ensure_tiny(directory)  # a damaged cache is rebuilt
    assert verify(directory).ok


def test_ensure_tiny_called_at_once_builds_once(tmp_path, monkeypatch):
    """Test workers (pytest -n) and servers may ask for the cache together: one builds, the others wait for it."""
    import threading

    import weights.tiny

    real_build, builds = weights.tiny.build_tiny, []

    def slow_build(directory):
        builds.append(directory)
        time.sleep(0.5)  # both callers are past their first check before the first build ends
        return real_build(directory)

    monkeypatch.setattr(weights.tiny, "build_tiny", slow_build)
    directory = tmp_path / "tiny"
    threads = [threading.Thread(target=ensure_tiny, args=(directory,)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1 and verify(directory).ok


def test_serve_tiny_from_a_cold_cache(tmp_path):
    port = free_port()
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--tiny", "--port", str(port), "--data-dir", str(tmp_path / "d")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        health = None
        for _ in range(600):
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).json()
                break
            except httpx.HTTPError:
                assert process.poll() is None, process.stdout.read()
                time.sleep(0.2)
        assert health and health["tiny_model"] is True
        assert verify(tmp_path / "cache" / "flux2-server" / "tiny-v3").ok
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert "serving the TINY random-weight model" in output
