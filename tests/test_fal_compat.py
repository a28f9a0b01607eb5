"""The small shapes a fal client can tell apart (issue 16), in-process with tests/fake_editor.py: request ids on
every answer about a request, the seed, cancel of an unknown id, unknown paths, the webhook error string, the
status stream's keep-alive, per-endpoint schema names, queue-time validation. The real clients' view of these is in
tests/test_fal_client.py and tests/test_fal_client_js.py."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient

from tests.conftest import data_uri, image_bytes
from tests.fake_editor import FakeEditor
from tests.test_webhooks import Receiver

BODY = {"prompt": "p", "image_urls": [data_uri(image_bytes(64, 64))], "image_size": "square", "seed": 1}
FLASH = "fal-ai/flux-2/flash/edit"


def wait_completed(client: TestClient, handle: dict, timeout_s: float = 30) -> dict:
    deadline = time.monotonic() + timeout_s
    while (status := client.get(handle["status_url"]).json())["status"] != "COMPLETED":
        assert time.monotonic() < deadline, status
        time.sleep(0.01)
    return status


def test_every_answer_about_a_request_carries_its_fal_request_id(fake_server):
    client, _ = fake_server(FakeEditor())
    submitted = client.post(f"/queue/{FLASH}", json=BODY)
    request_id = submitted.json()["request_id"]
    assert submitted.headers["x-fal-request-id"] == request_id
    wait_completed(client, submitted.json())
    for answer in (
        client.get(submitted.json()["status_url"]),
        client.get(submitted.json()["response_url"]),
        client.put(submitted.json()["cancel_url"]),
        client.get(f"/queue/{FLASH}/requests/{request_id}/status"),
    ):
        assert answer.headers["x-fal-request-id"] == request_id, answer
    sync = client.post(f"/{FLASH}", json=BODY)
    assert sync.status_code == 200 and len(sync.headers.get_list("x-fal-request-id")) == 1
    refused = client.post(f"/{FLASH}", json={**BODY, "num_images": 9})  # a 422 has an id too (ApiError.requestId)
    assert refused.status_code == 422 and len(refused.headers["x-fal-request-id"]) == 36
    assert "x-fal-request-id" not in client.get("/health").headers
    assert "x-fal-request-id" not in client.get("/queue/fal-ai/flux-2/requests/%C2%AE%01/status").headers


def test_any_integer_seed_is_mapped_onto_the_generator_and_echoed(fake_server):
    editor = FakeEditor()
    client, _ = fake_server(editor)
    for given in (-1, 2**64 + 5, 2**70, 12):
        answer = client.post(f"/{FLASH}", json={**BODY, "seed": given})
        assert answer.status_code == 200, answer.text
        assert answer.json()["seed"] == given  # echoed as given
    assert [call.seed for call in editor.calls] == [2**64 - 1, 5, 0, 12]  # modulo 2**64: same seed, same images


def test_cancel_of_an_unknown_id_is_fals_not_found(fake_server):
    client, _ = fake_server(FakeEditor())
    answer = client.put("/queue/fal-ai/flux-2/requests/00000000-0000-0000-0000-000000000000/cancel")
    assert answer.status_code == 404 and answer.json() == {"status": "NOT_FOUND"}


def test_a_quiet_status_stream_sends_keep_alive_comments(fake_server):
    client, _ = fake_server(FakeEditor(step_s=0.3), stream_keepalive_s=0.2)
    handle = client.post(f"/queue/{FLASH}", json=BODY).json()  # 4 steps of 0.3 s: quiet stretches
    with client.stream("GET", handle["status_url"] + "/stream", params={"logs": 0}) as stream:
        lines = list(stream.iter_lines())
    assert ": keep-alive" in lines
    assert '"COMPLETED"' in [line for line in lines if line.startswith("data:")][-1]


def test_unknown_paths_answer_fals_404_naming_the_served_endpoints(fake_server):
    client, _ = fake_server(FakeEditor())
    for path in ("/fal-ai/flux-2-pro", "/queue/fal-ai/flux-2/dev", "/nothing/here"):
        answer = client.post(path, json=BODY)
        assert answer.status_code == 404
        detail = answer.json()["detail"]
        assert detail.startswith(f"Path {path} not found") and "fal-ai/flux-2/flash/edit" in detail, detail
    known = client.get("/queue/fal-ai/flux-2/requests/00000000-0000-0000-0000-000000000000/status")
    assert known.json() == {"detail": "Request 00000000-0000-0000-0000-000000000000 not found"}  # a route's own 404


def test_the_queue_validates_a_body_when_the_request_runs(fake_server):
    receiver = Receiver(failures=0)
    client, _ = fake_server(FakeEditor(), fetch_allow="127.0.0.1/32")
    missing_prompt = {key: value for key, value in BODY.items() if key != "prompt"}
    submitted = client.post(f"/queue/{FLASH}", params={"fal_webhook": receiver.url}, json=missing_prompt)
    assert submitted.status_code == 200 and submitted.json()["status"] == "IN_QUEUE"  # accepted: it gets an id
    status = wait_completed(client, submitted.json())
    assert status["error_type"] == "validation_error" and status["error"] == "Field required"
    result = client.get(submitted.json()["response_url"])
    assert result.status_code == 422
    [error] = result.json()["detail"]
    assert error["loc"] == ["body", "prompt"] and error["type"] == "missing"
    [webhook] = receiver.wait_for(1)  # fal's ERROR webhook, the 422 body as its payload
    assert webhook["status"] == "ERROR" and webhook["error"] == "Invalid status code: 422"
    assert webhook["payload"] == result.json()

    not_json = client.post(f"/queue/{FLASH}", content=b"{nope", headers={"content-type": "application/json"})
    assert not_json.status_code == 422 and not_json.json()["detail"][0]["type"] == "json_invalid"
    assert not_json.headers["x-fal-request-id"]
