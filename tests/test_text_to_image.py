"""fal's text-to-image endpoints (fal-ai/flux-2, /turbo, /flash) through the real server on loopback: the same
pipeline without reference images, fal's defaults, the queue, /health, the playground page and the CLI."""

from __future__ import annotations

import re

import numpy as np
import pytest

from server.endpoints import BY_ID, ENDPOINTS
from tests.conftest import decode
from tests.test_cli_commands import cli

STEPS = {"fal-ai/flux-2": 5, "fal-ai/flux-2/turbo": 8, "fal-ai/flux-2/flash": 4}
TEXT_TO_IMAGE = list(STEPS)


def body(**fields) -> dict:
    return {"prompt": "A lighthouse at dusk", "image_size": "square", "seed": 11, **fields}


def steps_logged(server, request_id: str) -> list[str]:
    return re.findall(rf"request {request_id}: step (\d+/\d+)", server.log())


def test_the_text_to_image_endpoints_are_declared_as_fal_names_them():
    assert [e.endpoint_id for e in ENDPOINTS if not e.takes_images] == [*TEXT_TO_IMAGE, "fal-ai/flux-2/lora"]
    assert {e.endpoint_id: (e.profile, e.schema_name, e.category) for e in ENDPOINTS if not e.takes_images} == {
        "fal-ai/flux-2": ("edit", "Flux2", "text-to-image"),
        "fal-ai/flux-2/turbo": ("turbo", "Flux2Turbo", "text-to-image"),
        "fal-ai/flux-2/flash": ("flash", "Flux2Flash", "text-to-image"),
        "fal-ai/flux-2/lora": ("edit", "Flux2Lora", "text-to-image"),
    }


@pytest.mark.parametrize("endpoint", TEXT_TO_IMAGE)
def test_each_endpoint_generates_from_the_prompt_alone(server, endpoint):
    fields = {"num_inference_steps": 5, "acceleration": "none"} if endpoint == "fal-ai/flux-2" else {}
    response = server.post(endpoint, body(**fields))
    assert response.status_code == 200, response.text
    out = response.json()
    data, image = server.fetch_image(out["images"][0])
    assert image.format == "PNG" and image.size == (512, 512)
    assert out["images"][0] | {"url": None, "file_name": None} == {
        "url": None,
        "content_type": "image/png",
        "file_name": None,
        "file_size": len(data),
        "width": 512,
        "height": 512,
    }
    assert out["seed"] == 11 and out["prompt"] == "A lighthouse at dusk" and out["has_nsfw_concepts"] == [False]
    assert set(out["timings"]) == {"fetch_inputs", "inference", "safety_checker", "encode", "total"}
    assert out["notices"] == []
    request_id = response.headers["x-fal-request-id"]
    assert steps_logged(server, request_id)[-1] == f"{STEPS[endpoint]}/{STEPS[endpoint]}"
    assert f"request {request_id}: {BY_ID[endpoint].profile} 512x512, text to image, seed 11" in server.log()


def test_fals_default_size_is_landscape_4_3_and_fixed_schedules_ignore_steps(server):
    """fal's text-to-image default (landscape_4_3, 1024x768; the edit endpoints derive theirs from the image), and
    turbo's fixed schedule saying it ignored num_inference_steps as its edit twin does."""
    response = server.post("fal-ai/flux-2/turbo", {"prompt": "A lighthouse at dusk", "num_inference_steps": 20})
    assert response.status_code == 200, response.text
    out = response.json()
    assert server.fetch_image(out["images"][0])[1].size == (1024, 768)
    assert out["notices"] == ["The turbo profile runs a fixed schedule: num_inference_steps was ignored."]
    assert steps_logged(server, response.headers["x-fal-request-id"])[-1] == "8/8"


def test_seed_decides_the_image_and_the_prompt_alone_conditions_it(server):
    """Same seed: the same pixels; another prompt: other pixels (nothing else conditions a text-to-image call)."""

    def pixels(**fields):
        response = server.post("fal-ai/flux-2/flash", body(**fields))
        assert response.status_code == 200, response.text
        return np.asarray(server.fetch_image(response.json()["images"][0])[1])

    first = pixels()
    assert np.array_equal(first, pixels())
    assert not np.array_equal(first, pixels(prompt="A forest in fog"))
    assert not np.array_equal(first, pixels(seed=12))


def test_invalid_input_is_a_422_naming_the_field(server):
    response = server.post("fal-ai/flux-2", body(num_inference_steps=3))
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "num_inference_steps"]
    missing = server.post("fal-ai/flux-2/flash", {"image_size": "square"})
    assert missing.status_code == 422 and missing.json()["detail"][0]["loc"] == ["body", "prompt"]


def test_through_the_queue(server):
    """Submit at {queue}/fal-ai/flux-2/flash; status and result at fal's request URLs (both path forms)."""
    submitted = server.client.post(f"{server.url}/queue/fal-ai/flux-2/flash", json=body(num_images=2))
    assert submitted.status_code == 200, submitted.text
    handle = submitted.json()
    assert handle["response_url"] == f"{server.url}/queue/fal-ai/flux-2/requests/{handle['request_id']}"
    with server.client.stream("GET", handle["status_url"] + "/stream") as events:
        last = [line for line in events.iter_lines() if line.startswith("data:")][-1]
    assert '"COMPLETED"' in last and '"total":4' in last
    result = server.client.get(f"{server.url}/queue/fal-ai/flux-2/flash/requests/{handle['request_id']}")
    assert result.status_code == 200, result.text
    images = result.json()["images"]
    assert len(images) == 2 and all(server.fetch_image(i)[1].size == (512, 512) for i in images)


def test_health_lists_every_endpoint_with_its_profile(server):
    endpoints = server.client.get(f"{server.url}/health").json()["capabilities"]["endpoints"]
    assert {endpoint_id: {k: v for k, v in e.items() if k != "loras"} for endpoint_id, e in endpoints.items()} == {
        e.endpoint_id: {"profile": e.profile, "category": e.category, "runs_here": True} for e in ENDPOINTS
    }
    assert endpoints["fal-ai/flux-2/turbo"] == {
        "profile": "turbo",
        "category": "text-to-image",
        "runs_here": True,
        "loras": False,  # only the LoRA endpoints take LoRAs
    }


def test_the_playground_lists_every_endpoint(server):
    page = server.client.get(f"{server.url}/").text
    options = re.findall(r'<option value="([^"]+)">', page)
    assert options == [e.endpoint_id for e in ENDPOINTS]
    assert "ENDPOINT OPTIONS" not in page


def test_cli_text_to_image_locally_matches_the_server(server, tiny_weights, tmp_path):
    out = tmp_path / "t2i.png"
    local = cli(
        "edit", "--prompt", "A lighthouse at dusk", "--endpoint", "fal-ai/flux-2/flash", "--seed", "11",
        "--image-size", "square", "--weights", str(tiny_weights), "-o", str(out),
    )  # fmt: skip
    assert local.returncode == 0, local.stderr
    assert "seed 11, 512x512, 4 steps" in local.stdout
    served = server.post("fal-ai/flux-2/flash", body()).json()
    _, expected = server.fetch_image(served["images"][0])
    assert np.array_equal(np.asarray(decode(out.read_bytes())), np.asarray(expected))


def test_cli_text_to_image_against_a_server(server, tmp_path):
    out = tmp_path / "remote.webp"
    remote = cli(
        "edit", "--prompt", "p", "--endpoint", "fal-ai/flux-2", "--steps", "6", "--seed", "3", "--url", server.url,
        "-o", str(out),
    )  # fmt: skip
    assert remote.returncode == 0, remote.stderr
    assert "6/6" in remote.stderr and "seed 3" in remote.stdout
    image = decode(out.read_bytes())
    assert image.format == "WEBP" and image.size == (1024, 768)  # fal's default size for text to image


def test_cli_says_which_endpoints_take_images(tmp_path):
    """An edit endpoint without IMAGE, or a text-to-image one with one: one error line, before anything runs."""
    no_image = cli("edit", "--prompt", "p", "--endpoint", "flash", "--url", "http://127.0.0.1:9")
    assert no_image.returncode != 0
    assert "error: fal-ai/flux-2/flash/edit edits images: give 1-4 IMAGE files, or --endpoint fal-ai/flux-2/flash" in (
        no_image.stderr
    )
    image = tmp_path / "ref.png"
    image.write_bytes(b"not even read")
    with_image = cli("edit", str(image), "--prompt", "p", "--endpoint", "fal-ai/flux-2", "--url", "http://127.0.0.1:9")
    assert with_image.returncode != 0
    assert "error: fal-ai/flux-2 is text to image: it takes no IMAGE" in with_image.stderr
