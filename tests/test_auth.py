"""API keys: required on every API route when configured, checked against fal's `Authorization: Key` header."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import data_uri, image_bytes, start_server

BODY = {"prompt": "p", "image_urls": [data_uri(image_bytes(96, 96))], "image_size": "square"}


@pytest.fixture(scope="module")
def keyed_server(tiny_weights, tmp_path_factory):
    root = tmp_path_factory.mktemp("keyed")
    (root / "keys").write_text("first-key\nsecond-key\n")
    process, url = start_server(
        tiny_weights,
        root / "data",
        root / "log",
        "--api-keys-file",
        str(root / "keys"),
        env={"FLUX2_API_KEYS": "env-key"},
    )
    yield url, root / "log"
    process.terminate()
    process.wait(timeout=30)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/fal-ai/flux-2/edit"),
        ("POST", "/queue/fal-ai/flux-2/flash/edit"),
        ("GET", "/queue/fal-ai/flux-2/requests/some-id/status"),
        ("GET", "/queue/fal-ai/flux-2/requests/some-id"),
        ("PUT", "/queue/fal-ai/flux-2/requests/some-id/cancel"),
    ],
)
@pytest.mark.parametrize("authorization", [None, "Key wrong", "Bearer first-key", "first-key"])
def test_api_routes_refuse_without_a_valid_key(keyed_server, method, path, authorization):
    url, _ = keyed_server
    headers = {"Authorization": authorization} if authorization else {}
    response = httpx.request(method, url + path, json=BODY, headers=headers)
    assert response.status_code == 401
    assert "API key" in response.json()["detail"]


@pytest.mark.parametrize("key", ["first-key", "second-key", "env-key"])
def test_a_configured_key_is_accepted(keyed_server, key):
    url, _ = keyed_server
    response = httpx.post(
        url + "/fal-ai/flux-2/flash/edit", json=BODY, headers={"Authorization": f"Key {key}"}, timeout=60
    )
    assert response.status_code == 200


def test_health_stays_open(keyed_server):
    url, _ = keyed_server
    assert httpx.get(url + "/health").status_code == 200


def test_an_open_server_says_so(server, keyed_server):
    assert "the API is open to anyone" in server.log()
    assert "the API is open to anyone" not in keyed_server[1].read_text()


def test_health_shows_paths_and_hosts_only_with_a_key(fake_server):
    import socket
    import time

    from tests.fake_editor import FakeEditor

    client, _ = fake_server(FakeEditor(), api_keys="k")
    for _ in range(200):  # bounded: the heartbeat advertises this process as a worker
        if client.get("/health", headers={"Authorization": "Key k"}).json()["workers"]:
            break
        time.sleep(0.01)
    keyed = client.get("/health", headers={"Authorization": "Key k"})
    assert "/fake" in keyed.text and socket.gethostname() in keyed.text
    anonymous = client.get("/health")
    assert anonymous.status_code == 200 and anonymous.json()["capabilities"]["weights"] is None
    assert "/fake" not in anonymous.text and f'"{socket.gethostname()}"' not in anonymous.text
