"""The safety checker: a real image classifier from local disk, its verdict forced both ways by the threshold.

The tiny build has a random ViT classifier (labels normal/nsfw) in <weights>/safety_checker, loaded by the same
code as a real one (pipelines.safety).
"""

from __future__ import annotations

import json
import logging
import shutil
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
import torch

from pipelines.safety import SafetyChecker
from server.config import Settings
from tests.conftest import data_uri, decode, image_bytes
from tests.test_adapters import serve_in_process
from tests.test_queue import submit, wait_done

BODY = {"prompt": "p", "image_urls": [data_uri(image_bytes(96, 96, seed=9))], "image_size": "square", "seed": 4}


@contextmanager
def serving(weights, settings: Settings):
    uv, thread, url = serve_in_process(weights, settings)
    try:
        with httpx.Client(timeout=120) as client:
            yield client, url
    finally:
        uv.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def unchecked_weights(tiny_weights, tmp_path_factory):
    """The tiny model without a safety checker on disk."""
    copy = shutil.copytree(tiny_weights, tmp_path_factory.mktemp("unchecked") / "weights")
    shutil.rmtree(copy / "safety_checker")
    return copy


def test_the_threshold_decides_the_verdict_from_the_classifiers_probability(tiny_weights):
    image = decode(image_bytes(64, 64, seed=1)).convert("RGB")
    directory = tiny_weights / "safety_checker"
    p = SafetyChecker(directory, torch.device("cpu"), torch.float32).nsfw_probabilities([image])[0]
    assert 0 < p < 1
    assert SafetyChecker(directory, torch.device("cpu"), torch.float32, threshold=p).verdicts([image])[0] == [True]
    above = SafetyChecker(directory, torch.device("cpu"), torch.float32, threshold=p + 1e-6)
    assert above.verdicts([image])[0] == [False]


def test_a_classifier_without_an_nsfw_label_is_refused(tiny_weights, tmp_path):
    directory = shutil.copytree(tiny_weights / "safety_checker", tmp_path / "cats")
    config = json.loads((directory / "config.json").read_text())
    config.update(id2label={"0": "cat", "1": "dog"}, label2id={"cat": 0, "dog": 1})
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no 'nsfw'"):
        SafetyChecker(directory, torch.device("cpu"), torch.float32)


def test_default_server_checks_every_output(server):
    out = server.post("fal-ai/flux-2/flash/edit", {**BODY, "num_images": 2}).json()
    assert out["has_nsfw_concepts"] == [False, False] and "safety_checker" in out["timings"]
    pixels = np.asarray(server.fetch_image(out["images"][0])[1])
    assert pixels.any()  # shown, not withheld
    assert "safety checker: image 1: P(nsfw) = " in server.log()
    unchecked = server.post("fal-ai/flux-2/flash/edit", {**BODY, "enable_safety_checker": False}).json()
    assert unchecked["has_nsfw_concepts"] == [False] and "safety_checker" not in unchecked["timings"]
    health = server.client.get(f"{server.url}/health").json()
    assert health["capabilities"]["safety_checker"] is True and health["safety_checker_disabled"] is False


def test_a_flagged_image_is_withheld_and_logged(tiny_weights, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="pipelines.editor")
    with serving(tiny_weights, Settings(data_dir=tmp_path / "data", safety_threshold=0.0)) as (client, url):
        out = client.post(f"{url}/fal-ai/flux-2/turbo/edit", json={**BODY, "num_images": 2})
        assert out.status_code == 200, out.text
        out = out.json()
        assert out["has_nsfw_concepts"] == [True, True]
        for image in out["images"]:
            pixels = np.asarray(decode(client.get(image["url"]).content))
            assert pixels.shape == (512, 512, 3) and not pixels.any()  # black, same size
        assert "Image 1 was flagged by the safety checker and withheld: it is a black image." in out["notices"]
        done = wait_done(client, submit(client, url, "fal-ai/flux-2/turbo/edit", BODY))
        messages = [log["message"] for log in done["logs"]]
        assert any(m.startswith("safety checker: image 0: P(nsfw) = ") and m.endswith("withheld") for m in messages)
    assert "flagged NSFW" in caplog.text


def test_no_checker_on_disk_is_a_503_unless_the_request_or_operator_turns_it_off(unchecked_weights, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="server.http.app")
    with serving(unchecked_weights, Settings(data_dir=tmp_path / "a")) as (client, url):
        assert client.get(f"{url}/health").json()["capabilities"]["safety_checker"] is False
        for path in ("fal-ai/flux-2/flash/edit", "queue/fal-ai/flux-2/flash/edit"):
            refused = client.post(f"{url}/{path}", json=BODY)
            assert refused.status_code == 503 and "no safety checker" in refused.json()["detail"]
        asked_off = client.post(f"{url}/fal-ai/flux-2/flash/edit", json={**BODY, "enable_safety_checker": False})
        assert asked_off.status_code == 200 and asked_off.json()["has_nsfw_concepts"] == [False]
    assert "NO SAFETY CHECKER" in caplog.text

    with serving(unchecked_weights, Settings(data_dir=tmp_path / "b", disable_safety_checker=True)) as (client, url):
        assert client.get(f"{url}/health").json()["safety_checker_disabled"] is True
        served = client.post(f"{url}/fal-ai/flux-2/flash/edit", json=BODY).json()
        assert served["has_nsfw_concepts"] == [False]
        assert any("turned off on this server by its operator" in n for n in served["notices"])
    assert "TURNED OFF by configuration" in caplog.text


def test_the_checker_path_is_configurable(tiny_weights, unchecked_weights, tmp_path):
    settings = Settings(data_dir=tmp_path / "data", safety_checker=tiny_weights / "safety_checker")
    with serving(unchecked_weights, settings) as (client, url):
        caps = client.get(f"{url}/health").json()["capabilities"]
        assert caps["safety_checker"] is True and caps["safety_checker_model"] == str(tiny_weights / "safety_checker")
        assert client.post(f"{url}/fal-ai/flux-2/flash/edit", json=BODY).json()["has_nsfw_concepts"] == [False]
