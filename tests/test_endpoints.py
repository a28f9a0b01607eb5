"""The three edit endpoints through the real server on loopback: every input field honoured and observable."""

from __future__ import annotations

import re

import numpy as np
import pytest

from tests.conftest import data_uri, image_bytes

ENDPOINTS = ["fal-ai/flux-2/edit", "fal-ai/flux-2/turbo/edit", "fal-ai/flux-2/flash/edit"]
STEPS = {"fal-ai/flux-2/edit": 4, "fal-ai/flux-2/turbo/edit": 8, "fal-ai/flux-2/flash/edit": 4}
REFS = [data_uri(image_bytes(96, 64, seed=i)) for i in range(5)]


def body(**fields) -> dict:
    base = {"prompt": "Change the weather to winter", "image_urls": REFS[:1], "image_size": "square", "seed": 7}
    return {**base, **fields}


def steps_logged(server, request_id: str) -> list[str]:
    return re.findall(rf"request {request_id}: step (\d+/\d+)", server.log())


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("n_refs", [1, 2, 4, 5])
def test_each_endpoint_edits_with_1_to_4_references(server, endpoint, n_refs):
    response = server.post(endpoint, body(image_urls=REFS[:n_refs], num_inference_steps=4))
    assert response.status_code == 200, response.text
    out = response.json()
    assert len(out["images"]) == 1
    data, image = server.fetch_image(out["images"][0])
    assert image.format == "PNG" and image.size == (512, 512)
    assert out["images"][0] | {"url": None} == {
        "url": None,
        "content_type": "image/png",
        "file_name": out["images"][0]["file_name"],
        "file_size": len(data),
        "width": 512,
        "height": 512,
    }
    assert out["seed"] == 7 and out["prompt"] == "Change the weather to winter"
    assert set(out["timings"]) == {"fetch_inputs", "inference", "safety_checker", "encode", "total"}
    assert (n_refs == 5) == any("first 4 of 5" in n for n in out["notices"])
    assert len(steps_logged(server, response.headers["x-fal-request-id"])) == STEPS[endpoint]


def test_five_references_use_the_first_four(server):
    four = server.post("fal-ai/flux-2/flash/edit", body(image_urls=REFS[:4])).json()
    five = server.post("fal-ai/flux-2/flash/edit", body(image_urls=REFS[:5])).json()
    three = server.post("fal-ai/flux-2/flash/edit", body(image_urls=REFS[:3])).json()
    pixels = {k: np.asarray(server.fetch_image(v["images"][0])[1]) for k, v in [(4, four), (5, five), (3, three)]}
    assert np.array_equal(pixels[4], pixels[5])
    assert not np.array_equal(pixels[4], pixels[3])


@pytest.mark.parametrize("steps", [4, 9])
def test_base_runs_the_requested_number_of_steps(server, steps):
    response = server.post("fal-ai/flux-2/edit", body(num_inference_steps=steps))
    assert response.status_code == 200
    logged = steps_logged(server, response.headers["x-fal-request-id"])
    assert logged == [f"{i}/{steps}" for i in range(1, steps + 1)]


def test_turbo_and_flash_ignore_a_requested_step_count(server):
    response = server.post("fal-ai/flux-2/turbo/edit", body(num_inference_steps=30))
    assert len(steps_logged(server, response.headers["x-fal-request-id"])) == 8


@pytest.mark.parametrize("num_images", [1, 2, 4])
def test_num_images(server, num_images):
    out = server.post("fal-ai/flux-2/flash/edit", body(num_images=num_images)).json()
    assert len(out["images"]) == num_images == len(out["has_nsfw_concepts"])
    pixels = [np.asarray(server.fetch_image(i)[1]) for i in out["images"]]
    assert len({p.tobytes() for p in pixels}) == num_images  # each image its own noise


@pytest.mark.parametrize(
    ("fmt", "pil_format", "mime"),
    [("png", "PNG", "image/png"), ("jpeg", "JPEG", "image/jpeg"), ("webp", "WEBP", "image/webp")],
)
def test_output_format(server, fmt, pil_format, mime):
    out = server.post("fal-ai/flux-2/flash/edit", body(output_format=fmt)).json()
    _, image = server.fetch_image(out["images"][0])
    assert image.format == pil_format and out["images"][0]["content_type"] == mime
    assert out["images"][0]["file_name"].endswith("." + fmt)


@pytest.mark.parametrize(
    ("image_size", "expected"),
    [
        ("square_hd", (1024, 1024)),
        ("square", (512, 512)),
        ("portrait_4_3", (768, 1024)),
        ("portrait_16_9", (576, 1024)),
        ("landscape_4_3", (1024, 768)),
        ("landscape_16_9", (1024, 576)),
        ({"width": 640, "height": 528}, (640, 528)),
        ({"width": 600, "height": 521}, (600, 521)),  # not multiples of 16: still exactly what was asked
    ],
)
def test_image_size(server, image_size, expected):
    out = server.post("fal-ai/flux-2/flash/edit", body(image_size=image_size)).json()
    assert server.fetch_image(out["images"][0])[1].size == expected
    assert (out["images"][0]["width"], out["images"][0]["height"]) == expected


def test_default_sizes(server):
    wide = data_uri(image_bytes(300, 200))
    base = server.post("fal-ai/flux-2/edit", {"prompt": "p", "image_urls": [wide], "num_inference_steps": 4}).json()
    assert (base["images"][0]["width"], base["images"][0]["height"]) == (768, 512)  # the input's shape
    flash = server.post("fal-ai/flux-2/flash/edit", {"prompt": "p", "image_urls": [wide]}).json()
    assert (flash["images"][0]["width"], flash["images"][0]["height"]) == (1024, 1024)  # square_hd


def pixels_of(server, endpoint, **fields) -> np.ndarray:
    response = server.post(endpoint, body(**fields))
    assert response.status_code == 200, response.text
    return np.asarray(server.fetch_image(response.json()["images"][0])[1])


def test_guidance_scale_reaches_the_model(server):
    a = pixels_of(server, "fal-ai/flux-2/flash/edit", guidance_scale=1.0)
    b = pixels_of(server, "fal-ai/flux-2/flash/edit", guidance_scale=9.0)
    assert not np.array_equal(a, b)


def test_prompt_reaches_the_model(server):
    a = pixels_of(server, "fal-ai/flux-2/flash/edit", prompt="a red bicycle")
    b = pixels_of(server, "fal-ai/flux-2/flash/edit", prompt="a blue boat")
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_determinism(server, endpoint):
    first = pixels_of(server, endpoint, seed=11, num_inference_steps=4)
    again = pixels_of(server, endpoint, seed=11, num_inference_steps=4)
    other = pixels_of(server, endpoint, seed=12, num_inference_steps=4)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_random_seed_when_absent_is_returned_and_reproduces(server):
    fields = body()
    del fields["seed"]
    one, two = (server.post("fal-ai/flux-2/flash/edit", fields).json() for _ in range(2))
    assert isinstance(one["seed"], int) and one["seed"] != two["seed"]
    replay = pixels_of(server, "fal-ai/flux-2/flash/edit", seed=one["seed"])
    assert np.array_equal(replay, np.asarray(server.fetch_image(one["images"][0])[1]))


def test_sync_mode_returns_data_uris_and_stores_nothing(server):
    files_dir = server.data_dir / "files"
    before = set(files_dir.iterdir())
    out = server.post("fal-ai/flux-2/flash/edit", body(sync_mode=True, num_images=2)).json()
    assert set(files_dir.iterdir()) == before
    assert all(i["url"].startswith("data:image/png;base64,") for i in out["images"])
    stored = server.post("fal-ai/flux-2/flash/edit", body(num_images=2)).json()
    assert len(set(files_dir.iterdir()) - before) == 2
    for inline, served in zip(out["images"], stored["images"]):
        assert served["url"].startswith(server.url + "/files/")
        inline_bytes, _ = server.fetch_image(inline)
        served_bytes, _ = server.fetch_image(served)
        assert inline_bytes == served_bytes and len(served_bytes) == served["file_size"]


def test_output_files_are_served_safely(server):
    assert server.client.get(f"{server.url}/files/").status_code == 404  # no listing
    assert server.client.get(f"{server.url}/files/..%2F..%2Fetc%2Fpasswd").status_code == 404
    assert server.client.get(f"{server.url}/files/nope.png").status_code == 404


def test_jpeg_webp_and_rgba_inputs(server):
    inputs = [
        data_uri(image_bytes(64, 64, fmt="JPEG"), "image/jpeg"),
        data_uri(image_bytes(64, 64, fmt="WEBP"), "image/webp"),
    ]
    assert server.post("fal-ai/flux-2/flash/edit", body(image_urls=inputs)).status_code == 200


def test_inputs_from_an_http_url(server):
    """A URL the server fetches: one of its own output files."""
    first = server.post("fal-ai/flux-2/flash/edit", body()).json()["images"][0]["url"]
    response = server.post("fal-ai/flux-2/flash/edit", body(image_urls=[first]))
    assert response.status_code == 200, response.text
