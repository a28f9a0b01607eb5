"""The real server as a subprocess on loopback, for tests and benchmarks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    weights: Path | None, data_dir: Path, log_path: Path, *extra: str, scheme: str = "http", verify=True, env=None
):
    """`flux2-server serve` on a free port; `weights=None` serves the API alone (pass `--queue redis://...`)."""
    port = free_port()
    log_file = log_path.open("w")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "server.cli",
            "serve",
            *(["--weights", str(weights)] if weights is not None else []),
            "--port",
            str(port),
            "--data-dir",
            str(data_dir),
            *extra,
        ],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    url = f"{scheme}://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            if httpx.get(f"{url}/ready", timeout=1, verify=verify).status_code == 200:  # the model is loaded
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"server did not start:\n{log_path.read_text()}")


def start_worker(weights: Path, queue: str | None, data_dir: Path, log_path: Path, *extra: str, env=None):
    """`flux2-server worker` on the shared queue (`queue=None`: FLUX2_QUEUE in `env`); returns once it has loaded
    its model and takes requests."""
    log_file = log_path.open("w")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "server.cli",
            "worker",
            *(["--queue", queue] if queue else []),
            "--weights",
            str(weights),
        ]
        + ["--data-dir", str(data_dir), *extra],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"worker exited with {process.returncode}:\n{log_path.read_text()}")
        if " serving " in log_path.read_text():
            return process
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"worker did not start:\n{log_path.read_text()}")


def start_redis(directory: Path, port: int | None = None, appendonly: bool = False):
    """A private redis-server on a free loopback port (Debian's `redis-server` package); returns (process, URL).
    `port`: that one (to start it again where its clients look for it); `appendonly`: with the README's AOF
    settings, so a restart keeps the queue."""
    port = port or free_port()
    directory.mkdir(parents=True, exist_ok=True)
    aof = ["--appendonly", "yes", "--appendfsync", "always"] if appendonly else ["--appendonly", "no"]
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory), "--save", "", *aof],
        stdout=(directory / "redis.log").open("a"),
        stderr=subprocess.STDOUT,
    )
    url = f"redis://127.0.0.1:{port}/0"
    import redis

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            redis.Redis.from_url(url).ping()
            return process, url
        except redis.ConnectionError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("redis-server did not start")
