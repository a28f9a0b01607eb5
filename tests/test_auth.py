"""API keys: required on every API route when configured, checked against fal's `Authorization: Key` header."""

from __future__ import annotations

import hashlib

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


def test_a_request_answers_only_to_its_key_and_operators(fake_server):
    """Status (stream, logs), result and cancel of a request answer to the key that submitted it and to an operator
    key; to any other key it is unknown (404, as an id that doesn't exist), in every path form, sync ones included."""
    import time

    from tests.fake_editor import FakeEditor

    client, app = fake_server(FakeEditor(step_s=0.05), api_keys="alice-key,bob-key", operator_keys="op-key")
    alice, bob, op = ({"Authorization": f"Key {k}"} for k in ("alice-key", "bob-key", "op-key"))
    handle = client.post("/queue/fal-ai/flux-2/flash/edit", json=BODY, headers=alice).json()
    rid = handle["request_id"]
    unknown = handle["status_url"].replace(rid, "00000000-0000-0000-0000-000000000000")
    for url in (handle["status_url"], handle["status_url"] + "?logs=1", handle["response_url"], unknown):
        answer = client.get(url, headers=bob)
        assert answer.status_code == 404 and "not found" in answer.json()["detail"], url
    stream = client.get(handle["status_url"] + "/stream", headers=bob)
    assert stream.status_code == 404
    endpoint_form = f"/queue/fal-ai/flux-2/flash/edit/requests/{rid}/status"
    assert client.get(endpoint_form, headers=bob).status_code == 404
    cancel = client.put(handle["cancel_url"], headers=bob)
    assert (cancel.status_code, cancel.json()) == (404, {"status": "NOT_FOUND"})
    assert client.get(handle["status_url"], headers=alice).status_code in (200, 202)
    assert client.get(endpoint_form, headers=op).status_code in (200, 202)
    for _ in range(1000):  # bounded
        if client.get(handle["status_url"], headers=alice).json()["status"] == "COMPLETED":
            break
        time.sleep(0.01)
    assert client.get(handle["response_url"], headers=alice).status_code == 200  # bob's cancel did nothing
    assert client.get(handle["response_url"], headers=op).status_code == 200
    assert client.get(handle["response_url"], headers=bob).status_code == 404
    # the queue keeps a hash of the key, never the key
    assert app.state.services.store.get(rid).owner == hashlib.sha256(b"alice-key").hexdigest()
    # a sync request belongs to its key too; an operator may cancel anyone's
    sync_id = client.post("/fal-ai/flux-2/flash/edit", json=BODY, headers=alice).headers["x-fal-request-id"]
    assert client.get(f"/queue/fal-ai/flux-2/requests/{sync_id}", headers=bob).status_code == 404
    assert client.get(f"/queue/fal-ai/flux-2/requests/{sync_id}", headers=alice).status_code == 200
    slow = client.post("/queue/fal-ai/flux-2/edit", json={**BODY, "num_inference_steps": 50}, headers=bob).json()
    assert client.put(slow["cancel_url"], headers=op).status_code in (202, 400)  # 400: it finished meanwhile


def test_without_keys_requests_stay_open_to_all(fake_server):
    from tests.fake_editor import FakeEditor

    client, app = fake_server(FakeEditor())
    handle = client.post("/queue/fal-ai/flux-2/flash/edit", json=BODY, headers={"Authorization": "Key any"}).json()
    assert app.state.services.store.get(handle["request_id"]).owner is None
    assert client.get(handle["status_url"]).status_code in (200, 202)


def test_operator_keys_open_the_api_and_come_from_a_file(tmp_path):
    from server.config import Settings

    keys_file = tmp_path / "operators"
    keys_file.write_text("# the studio's admins\nop-one\n\n  op-two  \n")
    settings = Settings(api_keys="k", operator_keys="op-env", operator_keys_file=keys_file)
    assert settings.operators() == ["op-env", "op-one", "op-two"]
    assert settings.keys() == ["k", "op-env", "op-one", "op-two"]  # an operator key is an API key
    assert Settings(operator_keys="only-op").keys() == ["only-op"]  # so the API is not open
