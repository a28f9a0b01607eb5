"""Fuzzing: schemathesis against the server's own /openapi.json, every operation in it, every check it has.

The server runs with an API key (so the auth checks see 401s) and the tiny model with every capability on disk
(adapter and safety checker), so nothing answers 503 for a missing part. Zero failures means: no 5xx, every
status and body as documented (the error answers are declared in server/http/responses.py), invalid input
refused, a valid key required. One check is left out, `positive_data_acceptance`: an input can match the schema
and still be refused with 422, because an image URL must also be fetchable and decode as an image (which no
schema can say). For the operations with an edit body, tests/schemathesis.toml also turns off
`negative_data_rejection`: the body is validated in pydantic's lax mode as fal's is ("2" accepted for 2).

The seed is fixed so CI is reproducible; run `st run` by hand with other seeds (the command is in the failure
message) to search further.
"""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import httpx
import pytest

from tests.conftest import start_server

KEY = "fuzz-key"
CONFIG = Path(__file__).with_name("schemathesis.toml")


@pytest.fixture(scope="module")
def keyed_server(tiny_weights, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    keys = root / "keys"
    keys.write_text(KEY + "\n")
    # outputs capped at 256² (FLUX2_MAX_OUTPUT_PIXELS): text to image needs no input, so most valid examples run the
    # model; at the default 1024x768 they would take the run's whole time limit on two CPU cores
    limit = ("--max-output-pixels", str(256 * 256))
    process, url = start_server(tiny_weights, root / "data", root / "server.log", "--api-keys-file", str(keys), *limit)
    yield url, root / "server.log"
    process.terminate()
    process.wait(timeout=30)


def test_schemathesis_finds_nothing_on_any_route(keyed_server, tmp_path):
    url, log_path = keyed_server
    command = [
        str(Path(sys.executable).with_name("st")),  # schemathesis' CLI, installed beside this Python
        "--config-file",
        str(CONFIG),
        "--no-color",
        "run",
        f"{url}/openapi.json",
        "--checks",
        "all",
        "--exclude-checks",
        "positive_data_acceptance",
        "--header",
        f"Authorization: Key {KEY}",
        "--max-examples",
        "30",
        "--seed",
        "1",
        "--workers",
        "1",
        # a valid text-to-image body (no image URL to fail on) runs the model, queued ones too: a sync call may wait
        # behind them longer than schemathesis' default 10 s
        "--request-timeout",
        "120",
        "--report-junit-path",
        str(tmp_path / "junit.xml"),
    ]
    # in tmp_path: the CLI keeps its example database in ./.schemathesis
    run = subprocess.run(command, check=False, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    report = run.stdout + run.stderr
    server_log = log_path.read_text()[-4000:]
    assert run.returncode == 0, f"{' '.join(command)}\n{report[-12000:]}\n--- server log ---\n{server_log}"

    # every operation of the document was exercised, each with many generated requests
    document = httpx.get(f"{url}/openapi.json", timeout=10).json()
    operations = {f"{method.upper()} {path}" for path, item in document["paths"].items() for method in item}
    cases = {case.get("name") for case in ET.parse(tmp_path / "junit.xml").iter("testcase")}
    assert operations <= cases, operations - cases
    assert len(operations) >= 18
    # and the server is still healthy after it
    assert httpx.get(f"{url}/health", timeout=5).json()["status"] == "ok"
