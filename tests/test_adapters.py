"""Turbo and flash on the distilled adapter: switching on one loaded model, missing adapters, the operator's flag.

The tiny build carries a random turbo LoRA at loras/turbo/flux.2-turbo-lora.safetensors, loaded by the same
code as fal's FLUX.2-dev-Turbo file. (Bit parity of turbo/flash against plain diffusers with that LoRA loaded:
tests/test_parity.py.)
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import uvicorn

from pipelines.editor import EditCall, load_editor
from server.config import Settings
from server.http.app import create_app
from tests.conftest import data_uri, decode, free_port, image_bytes, start_server

REF = image_bytes(96, 80, seed=5)
BODY = {"prompt": "p", "image_urls": [data_uri(REF)], "image_size": "square", "seed": 3, "enable_safety_checker": False}
LORA = "loras/turbo/flux.2-turbo-lora.safetensors"


def call(profile: str) -> EditCall:
    steps = 4 if profile == "edit" else None
    return EditCall([decode(REF).convert("RGB")], "p", 64, 48, profile=profile, num_inference_steps=steps, seed=3)


@pytest.fixture(scope="module")
def undistilled_weights(tiny_weights, tmp_path_factory):
    """The tiny model without its adapter."""
    copy = shutil.copytree(tiny_weights, tmp_path_factory.mktemp("undistilled") / "weights")
    shutil.rmtree(copy / "loras")
    return copy


def test_switching_profiles_back_and_forth_equals_fresh_loads(tiny_weights, undistilled_weights):
    fresh = {
        p: np.asarray(load_editor(tiny_weights, "cpu").edit(call(p)).images[0]) for p in ("edit", "turbo", "flash")
    }
    base_on_turbo_schedule = np.asarray(load_editor(undistilled_weights, "cpu").edit(call("turbo")).images[0])
    assert not np.array_equal(fresh["turbo"], base_on_turbo_schedule)  # the adapter is really applied

    editor = load_editor(tiny_weights, "cpu")
    transformer = editor.pipe.transformer
    pointers = {name: p.data_ptr() for name, p in transformer.named_parameters()}
    for profile in ("edit", "turbo", "edit", "flash", "turbo", "edit", "flash", "flash", "edit"):
        got = np.asarray(editor.edit(call(profile)).images[0])
        assert np.array_equal(got, fresh[profile]), f"{profile} after switching differs from a fresh load"
    # one transformer, its weights neither reloaded nor copied nor rewritten in place (no fusing)
    assert editor.pipe.transformer is transformer
    assert {name: p.data_ptr() for name, p in transformer.named_parameters()} == pointers


def test_capabilities_name_the_adapter_file(tiny_weights):
    caps = load_editor(tiny_weights, "cpu").capabilities().profiles
    assert caps["turbo"].distilled_adapter_loaded and caps["flash"].distilled_adapter_loaded
    assert caps["turbo"].distilled_adapter_file.endswith(LORA)
    assert caps["edit"].distilled_adapter is None


def serve_in_process(weights, settings: Settings):
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(create_app(settings, weights), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    url = f"http://127.0.0.1:{port}"
    while time.monotonic() < deadline:  # the model loads in the background: wait until it serves
        if uv.started and httpx.get(f"{url}/ready", timeout=5).status_code == 200:
            break
        time.sleep(0.05)
    return uv, thread, url


def test_a_missing_adapter_is_a_503_naming_the_file(undistilled_weights, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="server.http.app")
    uv, thread, url = serve_in_process(undistilled_weights, Settings(data_dir=tmp_path / "data"))
    try:
        with httpx.Client(timeout=120) as client:
            for endpoint in ("fal-ai/flux-2/turbo/edit", "fal-ai/flux-2/flash/edit"):
                for path in (endpoint, f"queue/{endpoint}"):
                    answer = client.post(f"{url}/{path}", json=BODY)
                    assert answer.status_code == 503, answer.text
                    detail = answer.json()["detail"]
                    assert str(undistilled_weights / LORA) in detail and "--allow-undistilled" in detail
            assert client.post(f"{url}/fal-ai/flux-2/edit", json={**BODY, "num_inference_steps": 4}).status_code == 200
            health = client.get(f"{url}/health").json()
            assert health["allow_undistilled"] is False
            assert health["capabilities"]["profiles"]["turbo"]["distilled_adapter_loaded"] is False
    finally:
        uv.should_exit = True
        thread.join(timeout=30)
    assert f"turbo: answers 503: missing {undistilled_weights / LORA}" in caplog.text


def test_the_operator_may_allow_undistilled_profiles(undistilled_weights, tmp_path):
    process, url = start_server(undistilled_weights, tmp_path / "data", tmp_path / "server.log", "--allow-undistilled")
    try:
        with httpx.Client(timeout=120) as client:
            out = client.post(f"{url}/fal-ai/flux-2/flash/edit", json=BODY)
            assert out.status_code == 200, out.text
            assert out.json()["notices"] == [
                (
                    "No distilled 'turbo' adapter is loaded: the flash profile ran the base FLUX.2 [dev] weights on its "
                    "4-step schedule (allowed by FLUX2_ALLOW_UNDISTILLED)."
                )
            ]
            assert client.get(f"{url}/health").json()["allow_undistilled"] is True
    finally:
        process.terminate()
        process.wait(timeout=30)
    log = (tmp_path / "server.log").read_text()
    assert "turbo: distilled adapter missing" in log and "running it on the BASE weights at 8 steps" in log


def verify_cli(directory) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "server.cli", "weights", "verify", str(directory)]
    return subprocess.run(command, capture_output=True, text=True, check=False)


def test_weights_verify_reports_which_profiles_can_run(tiny_weights, undistilled_weights, tmp_path):
    full = verify_cli(tiny_weights)
    assert full.returncode == 0
    assert "loras/turbo    ok" in full.stdout
    assert "profile turbo  can run (distilled adapter 'turbo')" in full.stdout
    assert "profile flash  can run (distilled adapter 'turbo')" in full.stdout

    partial = verify_cli(undistilled_weights)
    assert partial.returncode == 0  # the base model is usable
    assert "profile edit   can run" in partial.stdout
    assert f"profile turbo  can't run: missing {undistilled_weights / LORA}" in partial.stdout

    corrupt = shutil.copytree(tiny_weights, tmp_path / "corrupt")
    lora = corrupt / LORA
    lora.write_bytes(lora.read_bytes()[:-10])
    broken = verify_cli(corrupt)
    assert broken.returncode == 1 and "truncated" in broken.stdout


def test_a_fused_adapter_gives_the_unfused_images_and_leaves_no_lora_layers(tiny_weights):
    unfused = load_editor(tiny_weights, "cpu")
    fused = load_editor(tiny_weights, "cpu", fuse="turbo")
    assert not any(hasattr(m, "lora_A") for m in fused.pipe.transformer.modules())  # plain Linear layers again
    for profile in ("turbo", "flash"):
        a = np.asarray(unfused.edit(call(profile)).images[0]).astype(int)
        b = np.asarray(fused.edit(call(profile)).images[0]).astype(int)
        assert np.abs(a - b).max() <= 2, profile  # W + BA summed once instead of per step: rounding only
    with pytest.raises(ValueError, match="fused"):
        fused.edit(call("edit"))
    assert fused.capabilities().fused_adapter == "turbo"
    assert fused.capabilities().profiles["edit"].runs_here is False


def test_a_server_for_the_distilled_profiles_alone_fuses_and_refuses_edit_plainly(tiny_weights, tmp_path):
    settings = Settings(data_dir=tmp_path / "data", profiles="turbo,flash")
    uv, thread, url = serve_in_process(tiny_weights, settings)
    try:
        with httpx.Client(timeout=120) as client:
            assert client.get(f"{url}/health").json()["capabilities"]["fused_adapter"] == "turbo"
            assert client.post(f"{url}/fal-ai/flux-2/turbo/edit", json=BODY).status_code == 200
            for path in ("fal-ai/flux-2/edit", "queue/fal-ai/flux-2/edit"):
                refused = client.post(f"{url}/{path}", json=BODY)
                assert refused.status_code == 503 and "fused" in refused.json()["detail"], refused.text
    finally:
        uv.should_exit = True
        thread.join(timeout=30)
    # and with FLUX2_FUSE_ADAPTER off, the same profiles run unfused
    unfused = Settings(data_dir=tmp_path / "data2", profiles="turbo,flash", fuse_adapter=False)
    from server.service.model import adapter_to_fuse

    assert adapter_to_fuse(unfused, tiny_weights) is None and adapter_to_fuse(settings, tiny_weights) == "turbo"
    assert adapter_to_fuse(Settings(data_dir=tmp_path / "d3"), tiny_weights) is None  # all profiles: base needed
