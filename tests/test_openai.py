"""OpenAI's images API (/v1/images/generations, /v1/images/edits) through the unmodified `openai` package, pointed at
the real server on loopback (`base_url=.../v1`, the server's API key as the OpenAI key), on the tiny model."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest

from tests.conftest import decode, image_bytes, start_server

openai = pytest.importorskip("openai", reason="needs the openai package (test extra)")
KEY = "openai-key"


@pytest.fixture(scope="module")
def keyed(tiny_weights, tmp_path_factory):
    root = tmp_path_factory.mktemp("openai")
    process, url = start_server(tiny_weights, root / "data", root / "server.log", env={"FLUX2_API_KEYS": KEY})
    yield url
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def client(keyed):
    return openai.OpenAI(base_url=f"{keyed}/v1", api_key=KEY, max_retries=0, timeout=300)


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(decode(data))


def test_generations_url_is_the_fal_endpoints_image(keyed, client):
    """model flux-2-flash runs fal-ai/flux-2/flash: the same pixels for the same seed, a URL on this server."""
    answer = client.images.generate(
        prompt="A lighthouse at dusk", model="flux-2-flash", size="512x640", extra_body={"seed": 5}
    )
    assert answer.size == "512x640" and answer.output_format == "png" and answer.created > 0
    (image,) = answer.data
    assert image.url.startswith(f"{keyed}/files/") and image.b64_json is None and image.revised_prompt is None
    served = httpx.get(image.url, timeout=30)
    assert served.headers["content-type"] == "image/png" and decode(served.content).size == (512, 640)
    fal = httpx.post(
        f"{keyed}/fal-ai/flux-2/flash",
        json={"prompt": "A lighthouse at dusk", "seed": 5, "image_size": {"width": 512, "height": 640}},
        headers={"Authorization": f"Key {KEY}"},
        timeout=300,
    ).json()
    assert np.array_equal(pixels(served.content), pixels(httpx.get(fal["images"][0]["url"], timeout=30).content))


def test_generations_b64_json_several_images_in_another_format(client):
    answer = client.images.generate(
        prompt="A lighthouse at dusk",
        model="flux-2-turbo",
        n=2,
        size="512x512",
        response_format="b64_json",
        output_format="jpeg",
        quality="high",  # OpenAI's options without a FLUX.2 counterpart are accepted and ignored
        extra_body={"seed": 8},
    )
    assert answer.output_format == "jpeg" and len(answer.data) == 2
    for image in answer.data:
        assert image.url is None
        decoded = decode(base64.b64decode(image.b64_json))
        assert decoded.format == "JPEG" and decoded.size == (512, 512)


def test_generations_default_model_and_size(client):
    """No model: flux-2 (the base profile, fal-ai/flux-2); size auto: fal's text-to-image default, 1024x768."""
    answer = client.images.generate(prompt="p", response_format="b64_json", extra_body={"seed": 1})
    assert answer.size == "1024x768"
    assert decode(base64.b64decode(answer.data[0].b64_json)).size == (1024, 768)


def test_edits_with_one_image_and_with_several(keyed, client):
    one = client.images.edit(
        image=("photo.png", image_bytes(96, 64, seed=1), "image/png"),
        prompt="Make it snow",
        model="flux-2-flash",
        response_format="b64_json",
        extra_body={"seed": 3},
    )
    assert one.size == "1024x1024"  # size auto: fal's flash edit default (square_hd)
    several = client.images.edit(  # a list goes as `image[]` parts
        image=[
            ("a.png", image_bytes(96, 64, seed=1), "image/png"),
            ("b.jpg", image_bytes(64, 64, seed=2, fmt="JPEG"), "image/jpeg"),
        ],
        prompt="Make it snow",
        model="flux-2-flash",
        size="512x512",
        extra_body={"seed": 3},
    )
    assert several.size == "512x512" and several.data[0].url.startswith(f"{keyed}/files/")
    fal = httpx.post(
        f"{keyed}/fal-ai/flux-2/flash/edit",
        json={
            "prompt": "Make it snow",
            "seed": 3,
            "image_size": "square",
            "image_urls": [
                "data:image/png;base64," + base64.b64encode(image_bytes(96, 64, seed=1)).decode(),
                "data:image/jpeg;base64," + base64.b64encode(image_bytes(64, 64, seed=2, fmt="JPEG")).decode(),
            ],
        },
        headers={"Authorization": f"Key {KEY}"},
        timeout=300,
    ).json()
    expected = pixels(httpx.get(fal["images"][0]["url"], timeout=30).content)
    assert np.array_equal(pixels(httpx.get(several.data[0].url, timeout=30).content), expected)


def test_unknown_model_is_openais_404(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.images.generate(prompt="p", model="dall-e-3")
    error = caught.value.body
    assert error["code"] == "model_not_found" and error["param"] == "model" and error["type"] == "invalid_request_error"
    assert "flux-2-flash" in error["message"]


def test_a_bad_key_and_no_key_are_openais_401(keyed):
    with pytest.raises(openai.AuthenticationError) as caught:
        openai.OpenAI(base_url=f"{keyed}/v1", api_key="wrong", max_retries=0).images.generate(prompt="p")
    assert caught.value.body["code"] == "invalid_api_key" and "Bearer" in caught.value.body["message"]
    anonymous = httpx.post(f"{keyed}/v1/images/generations", json={"prompt": "p"})  # the openai client needs a key
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    ("call", "param", "code"),
    [
        ({"n": 5}, "n", "less_than_equal"),
        ({"size": "100x100"}, "size", "greater_than_equal"),
        ({"size": "big"}, "size", "invalid_value"),
        ({"output_format": "gif"}, "output_format", "literal_error"),
        ({"stream": True}, "stream", "unsupported_value"),
        ({"prompt": ""}, "prompt", "string_too_short"),
    ],
)
def test_invalid_input_is_openais_400_naming_the_field(client, call, param, code):
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(**{"prompt": "p", "model": "flux-2-flash", **call})
    assert (caught.value.body["param"], caught.value.body["code"]) == (param, code)


def test_edit_refusals_name_the_field(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(image=("a.png", image_bytes(64, 64), "image/png"), mask=io.BytesIO(b"m"), prompt="p")
    assert caught.value.body["param"] == "mask"
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(image=[("a.png", image_bytes(64, 64), "image/png")] * 5, prompt="p")
    assert caught.value.body["param"] == "image" and "1-4" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError) as caught:  # decodes to nothing: the input check's own refusal
        client.images.edit(image=("a.png", b"not an image", "image/png"), prompt="p", model="flux-2-flash")
    assert caught.value.body["param"] == "image" and caught.value.body["type"] == "invalid_request_error"


def test_models_and_other_paths(keyed, client):
    assert [m.id for m in client.models.list().data] == ["flux-2", "flux-2-turbo", "flux-2-flash"]
    missing = httpx.post(f"{keyed}/v1/chat/completions", json={}, headers={"Authorization": f"Bearer {KEY}"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_documented_in_openapi_with_openais_error_shape(tiny_weights, tmp_path):
    from server.config import Settings
    from server.http.app import create_app

    spec = create_app(Settings(data_dir=tmp_path), tiny_weights, tiny=True).openapi()
    generations = spec["paths"]["/v1/images/generations"]["post"]
    edits = spec["paths"]["/v1/images/edits"]["post"]
    assert set(edits["requestBody"]["content"]) == {"multipart/form-data"}
    assert edits["requestBody"]["content"]["multipart/form-data"]["schema"]["required"] == ["image", "prompt"]
    for operation in (generations, edits):
        for status in ("400", "401", "404", "413", "429", "500", "503"):
            schema = operation["responses"][status]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/OpenAIError"}, (status, schema)
        assert operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("ImagesResponse")
