"""Bad input gets a 4xx in fal's error shape naming the field; the server answers the next good request."""

from __future__ import annotations

import base64
import json

import pytest

from tests.conftest import data_uri, image_bytes

GOOD = {"prompt": "p", "image_urls": [data_uri(image_bytes(96, 96))], "image_size": "square", "seed": 1}


@pytest.mark.parametrize(
    ("endpoint", "change", "loc"),
    [
        ("fal-ai/flux-2/edit", {"guidance_scale": 20.5}, ["body", "guidance_scale"]),
        ("fal-ai/flux-2/edit", {"guidance_scale": -1}, ["body", "guidance_scale"]),
        ("fal-ai/flux-2/edit", {"num_inference_steps": 3}, ["body", "num_inference_steps"]),
        ("fal-ai/flux-2/edit", {"num_inference_steps": 51}, ["body", "num_inference_steps"]),
        ("fal-ai/flux-2/edit", {"num_inference_steps": "many"}, ["body", "num_inference_steps"]),
        ("fal-ai/flux-2/edit", {"acceleration": "max"}, ["body", "acceleration"]),
        ("fal-ai/flux-2/edit", {"num_images": 0}, ["body", "num_images"]),
        ("fal-ai/flux-2/turbo/edit", {"num_images": 5}, ["body", "num_images"]),
        ("fal-ai/flux-2/flash/edit", {"num_images": "two"}, ["body", "num_images"]),
        ("fal-ai/flux-2/flash/edit", {"seed": "abc"}, ["body", "seed"]),
        ("fal-ai/flux-2/flash/edit", {"output_format": "gif"}, ["body", "output_format"]),
        ("fal-ai/flux-2/flash/edit", {"sync_mode": "sometimes"}, ["body", "sync_mode"]),
        ("fal-ai/flux-2/flash/edit", {"image_size": "huge"}, ["body", "image_size"]),
        ("fal-ai/flux-2/flash/edit", {"image_size": {"width": 256, "height": 512}}, ["body", "image_size"]),
        ("fal-ai/flux-2/edit", {"image_size": {"width": 512, "height": 4096}}, ["body", "image_size"]),
        ("fal-ai/flux-2/flash/edit", {"prompt": ""}, ["body", "prompt"]),
        ("fal-ai/flux-2/flash/edit", {"prompt": None}, ["body", "prompt"]),
        ("fal-ai/flux-2/flash/edit", {"image_urls": []}, ["body", "image_urls"]),
        ("fal-ai/flux-2/flash/edit", {"image_urls": "https://example.com/a.png"}, ["body", "image_urls"]),
        ("fal-ai/flux-2/flash/edit", {"image_urls": [5]}, ["body", "image_urls", 0]),
        ("fal-ai/flux-2/edit", {"num_inference_steps": 8.5}, ["body", "num_inference_steps"]),
    ],
)
def test_invalid_fields_are_422_naming_the_field(server, endpoint, change, loc):
    response = server.post(endpoint, {**GOOD, **change})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, list) and detail
    assert any(d["loc"][: len(loc)] == loc and d["msg"] and d["type"] for d in detail), detail


@pytest.mark.parametrize(
    ("endpoint", "change", "seen"),
    [
        # pydantic's lax mode, as fal's framework validates: numbers and booleans as strings, floats for integers
        ("fal-ai/flux-2/edit", {"num_inference_steps": "4"}, "4 steps"),
        ("fal-ai/flux-2/edit", {"num_inference_steps": 4.0, "guidance_scale": "3.5"}, "4 steps"),
        ("fal-ai/flux-2/flash/edit", {"image_size": {"width": 512.0, "height": "512"}, "seed": "7"}, "512x512"),
        ("fal-ai/flux-2/flash/edit", {"enable_safety_checker": "false", "sync_mode": 1}, "data:"),
    ],
)
def test_coercible_values_are_accepted_as_fal_does(server, endpoint, change, seen):
    response = server.post(endpoint, {**GOOD, **change})
    assert response.status_code == 200, response.text
    out = response.json()
    if seen == "data:":
        assert out["images"][0]["url"].startswith("data:")  # sync_mode 1 read as true
    elif seen == "512x512":
        assert (out["images"][0]["width"], out["images"][0]["height"], out["seed"]) == (512, 512, 7)
    else:
        assert out["timings"]  # ran


@pytest.mark.parametrize("missing", ["prompt", "image_urls"])
def test_missing_required_fields(server, missing):
    body = {k: v for k, v in GOOD.items() if k != missing}
    response = server.post("fal-ai/flux-2/edit", body)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", missing]
    assert response.json()["detail"][0]["type"] == "missing"


def test_not_json_at_all(server):
    response = server.client.post(
        f"{server.url}/fal-ai/flux-2/edit", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert response.json()["detail"][0]["type"] == "json_invalid"


TEXT_BYTES = base64.b64encode(b"this is not an image").decode()


@pytest.mark.parametrize(
    ("url", "error_type", "message"),
    [
        ("data:image/png;base64,%%%notbase64", "invalid_data_uri", "Invalid base64"),
        ("data:image/png;base64", "invalid_data_uri", "no ','"),
        (f"data:image/png;base64,{TEXT_BYTES}", "image_load_error", "not a png, jpeg or webp image"),
        ("data:image/png;base64," + base64.b64encode(image_bytes(96, 96)[:200]).decode(), "image_load_error", "decode"),
        (data_uri(image_bytes(32, 32)), "invalid_image", "too small"),
        (data_uri(image_bytes(1200, 100)), "invalid_image", "aspect ratio"),
        ("ftp://example.com/a.png", "invalid_url", "Unsupported URL scheme"),
        ("not a url", "invalid_url", "Unsupported URL scheme"),
        ("http://127.0.0.1:1/unreachable.png", "url_not_allowed", "loopback"),  # see tests/test_ssrf.py
    ],
)
def test_unusable_image_urls_name_the_url_and_why(server, url, error_type, message):
    urls = [GOOD["image_urls"][0], url]
    response = server.post("fal-ai/flux-2/flash/edit", {**GOOD, "image_urls": urls})
    assert response.status_code == 422, response.text
    [detail] = response.json()["detail"]
    assert detail["loc"] == ["body", "image_urls", 1]
    assert detail["type"] == error_type
    assert message.lower() in detail["msg"].lower()
    assert detail["input"].startswith(url[:50]) and len(detail["input"]) < 200


def test_a_url_that_answers_404_is_named(server):
    missing = f"{server.url}/files/does-not-exist.png"
    response = server.post("fal-ai/flux-2/flash/edit", {**GOOD, "image_urls": [missing]})
    assert response.status_code == 422
    assert "HTTP 404" in response.json()["detail"][0]["msg"]
    assert response.json()["detail"][0]["input"] == missing


def test_server_still_answers_after_bad_requests(server):
    for bad in ({"prompt": ""}, {"image_urls": ["data:,"]}, {"num_images": 9}):
        assert server.post("fal-ai/flux-2/flash/edit", {**GOOD, **bad}).status_code == 422
    response = server.post("fal-ai/flux-2/flash/edit", GOOD)
    assert response.status_code == 200
    assert server.client.get(f"{server.url}/health").json()["status"] == "ok"


# What Python's json reads but JSON can't carry: each a 422 naming the field, on the sync route and at queue submit
# (before it is queued), not a 500 from the error's own echo of the input or from the queue writing it.
NOT_JSON = [
    ('"prompt": NaN', ["body", "prompt"], "finite_number"),
    ('"guidance_scale": NaN', ["body", "guidance_scale"], "finite_number"),
    ('"guidance_scale": Infinity', ["body", "guidance_scale"], "finite_number"),
    ('"guidance_scale": -Infinity', ["body", "guidance_scale"], "finite_number"),
    ('"guidance_scale": 1e400', ["body", "guidance_scale"], "finite_number"),
    ('"seed": 1e400', ["body", "seed"], "finite_number"),
    ('"seed": -1e400', ["body", "seed"], "finite_number"),
    ('"num_images": Infinity', ["body", "num_images"], "finite_number"),
    ('"image_size": {"width": NaN, "height": 512}', ["body", "image_size", "width"], "finite_number"),
    ('"prompt": "a \\ud800 b"', ["body", "prompt"], "string_unicode"),
    ('"prompt": "\\udfff"', ["body", "prompt"], "string_unicode"),
    ('"extra": ["ok", "\\ud83d"]', ["body", "extra", 1], "string_unicode"),
]


@pytest.mark.parametrize("path", ["/fal-ai/flux-2/flash/edit", "/fal-ai/flux-2/edit", "/queue/fal-ai/flux-2/edit"])
def test_values_json_cannot_carry_are_a_422_naming_the_field(fake_server, path):
    from tests.fake_editor import FakeEditor

    client, _ = fake_server(editor := FakeEditor())
    json_type = {"content-type": "application/json"}
    for field, loc, error_type in NOT_JSON:
        body = json.dumps({"prompt": "p", "image_urls": GOOD["image_urls"]})[:-1] + f", {field}}}"
        response = client.post(path, content=body, headers=json_type)
        assert response.status_code == 422, (field, response.text)
        [detail] = response.json()["detail"]
        assert (detail["loc"], detail["type"]) == (loc, error_type)
        assert detail["msg"] and len(detail["input"]) <= 50
    assert not editor.calls  # nothing queued, nothing ran
    good = json.dumps({"prompt": "p \U0001f600", "image_urls": GOOD["image_urls"]})  # a surrogate pair: fine
    assert client.post(path, content=good, headers=json_type).status_code == 200


def test_every_api_route_refuses_what_json_cannot_carry(fake_server):
    """Every route /openapi.json says takes a JSON body gets the check (server/http/json_body.py), whoever adds it."""
    from tests.fake_editor import FakeEditor

    client, _ = fake_server(FakeEditor())
    checked = []
    for path, operations in client.get("/openapi.json").json()["paths"].items():
        for method, operation in operations.items():
            if "application/json" not in operation.get("requestBody", {}).get("content", {}):
                continue
            url = path.replace("{request_id}", "x").replace("{token}", "x")
            answer = client.request(
                method, url, content='{"prompt": NaN}', headers={"content-type": "application/json"}
            )
            if path.startswith("/v1/"):  # OpenAI's images API answers in OpenAI's shape
                assert answer.status_code == 400, (method, path, answer.text)
                assert answer.json()["error"]["param"] == "prompt", (path, answer.text)
            else:
                assert answer.status_code == 422, (method, path, answer.text)
                assert answer.json()["detail"][0]["loc"] == ["body", "prompt"], path
            checked.append(path)
    assert len(checked) >= 7, checked  # 3 sync endpoints, 3 queue submits, the storage initiations, ...
    assert "/v1/images/generations" in checked
