"""Request LoRAs (pipelines/loras.py, server/service/loras.py): each key format, scales, loading once, switching,
eviction, bad files refused naming the entry with the model left as it was, and the LoRA endpoints through fal's
own Python client (tests/fal_client_lora_script.py) against the real server.

LoRA files are written at test time for the tiny model (tests/lora_files.py)."""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import peft
import pytest
import torch

from pipelines.editor import EditCall, load_editor
from pipelines.loras import LoraError, LoraFile, sha256_of
from pipelines.runtime import RuntimeOptions
from server.cli.tls import make_certificates
from server.errors import InputError
from server.service.loras import library_file
from tests.conftest import data_uri, decode, image_bytes, start_server
from tests.lora_files import write_lora

REF = decode(image_bytes(96, 80, seed=5)).convert("RGB")
# A fixed activation reserve: the memory planner otherwise sizes host RAM for 2048-px requests (about 14 GiB on
# the CPU) and refuses to load on a machine with less free, which says nothing about LoRAs.
RESERVE_GB = 1.0
SCRIPT = Path(__file__).with_name("fal_client_lora_script.py")


@pytest.fixture(scope="module")
def editor(tiny_weights):
    return load_editor(tiny_weights, "cpu", options=RuntimeOptions(max_loaded_loras=3, memory_reserve_gb=RESERVE_GB))


@pytest.fixture(scope="module")
def files(tiny_weights, tmp_path_factory) -> dict[str, LoraFile]:
    """One LoRA file per format (bfl and kohya hold the same weights), and more diffusers ones, at scale 1."""
    root = tmp_path_factory.mktemp("loras")
    written = {
        "diffusers": write_lora(root / "diffusers.safetensors", tiny_weights, "diffusers", seed=1),
        "bfl": write_lora(root / "bfl.safetensors", tiny_weights, "bfl", seed=2),
        "kohya": write_lora(root / "kohya.safetensors", tiny_weights, "kohya", seed=2),
        **{f"other{i}": write_lora(root / f"other{i}.safetensors", tiny_weights, seed=10 + i) for i in range(3)},
    }
    return {name: LoraFile(sha256_of(path), path, 1.0, 0) for name, path in written.items()}


def at(lora: LoraFile, scale: float, index: int = 0) -> LoraFile:
    return LoraFile(lora.digest, lora.path, scale, index)


def run(editor, *loras: LoraFile, profile: str = "edit"):
    steps = 4 if profile == "edit" else None
    call = EditCall([REF], "p", 64, 48, profile=profile, num_inference_steps=steps, seed=3, loras=loras)
    result = editor.edit(call)
    return np.asarray(result.images[0]).astype(int), result


def adapters_of(editor) -> set[str]:
    """Adapter names present in any layer of the transformer, or in its peft config."""
    transformer = editor.pipe.transformer
    names = set(getattr(transformer, "peft_config", {}))
    for module in transformer.modules():
        names |= set(getattr(module, "lora_A", {}))
    return names


@pytest.fixture(scope="module")
def base(editor):
    """The base output of a fresh model, before any LoRA was loaded."""
    return run(editor)[0]


@pytest.fixture(scope="module")
def turbo(editor):
    """The turbo output of a fresh model, before any LoRA was loaded."""
    return run(editor, profile="turbo")[0]


def test_each_format_changes_the_pixels_by_its_scale(editor, files, base, turbo):
    difference = {}
    for scale in (0.0, 0.5, 1.0):
        pixels, _ = run(editor, at(files["diffusers"], scale))
        difference[scale] = np.abs(pixels - base).mean()
    assert difference[0.0] == 0  # scale 0 is the base model, bit for bit
    assert 0 < difference[0.5] < difference[1.0], difference

    bfl, _ = run(editor, files["bfl"])
    kohya, _ = run(editor, files["kohya"])
    assert np.abs(bfl - base).mean() > 0.5
    # BFL's original names (ai-toolkit) and kohya's (lora_down/up with alpha = rank) of the same weights are
    # converted by diffusers' FLUX.2 loader to the same adapter
    assert np.array_equal(bfl, kohya)
    assert files["bfl"].digest != files["kohya"].digest  # two files: loaded as two adapters

    assert np.array_equal(run(editor)[0], base)  # then no LoRA: the fresh model's pixels


def test_a_lora_is_loaded_once_and_switched_without_reloading_the_base_weights(editor, files, base):
    base_weights = {
        n: p.data_ptr() for n, p in editor.pipe.transformer.named_parameters() if "lora_" not in n
    }  # fmt: skip
    first, result = run(editor, files["other0"])
    assert result.loras_loaded == 1 and "lora_load" in result.timings
    again, result = run(editor, files["other0"])
    assert result.loras_loaded == 0 and "lora_load" not in result.timings
    assert np.array_equal(first, again)
    # several at once, each at its scale: not the same as either alone
    both, _ = run(editor, files["other0"], at(files["diffusers"], 0.5, 1))
    assert not np.array_equal(both, first)
    assert {n: p.data_ptr() for n, p in editor.pipe.transformer.named_parameters() if "lora_" not in n} == base_weights


def test_the_distilled_adapter_is_off_for_loras_and_back_for_turbo(editor, files, base, turbo):
    with_lora, _ = run(editor, files["diffusers"])
    assert np.array_equal(run(editor, profile="turbo")[0], turbo)  # a fresh model's turbo
    assert np.array_equal(run(editor, files["diffusers"])[0], with_lora)  # turbo is not mixed in
    with pytest.raises(ValueError, match="base edit profile only"):
        run(editor, files["diffusers"], profile="turbo")


def test_the_least_recently_used_lora_is_unloaded_beyond_capacity(editor, files):
    cache = editor.loras
    assert cache.capacity == 3
    first, _ = run(editor, files["other1"])
    for name in ("other2", "other0", "diffusers"):  # three more: other1 is the least recently used
        cache.prepare([files[name]])
    assert files["other1"].digest not in cache.loaded and len(cache.loaded) == 3
    assert files["other1"].adapter_name not in adapters_of(editor)  # its layers are gone, not only disabled
    assert files["other1"].adapter_name not in editor.pipe.get_list_adapters().get("transformer", [])
    again, result = run(editor, files["other1"])  # loaded again, the same
    assert result.loras_loaded == 1 and np.array_equal(again, first)


def write_tensors(path: Path, tensors: dict) -> LoraFile:
    from safetensors.torch import save_file

    save_file(tensors, str(path))
    return LoraFile(sha256_of(path), path, 1.0, 1)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, LoraFile]:
    root = tmp_path_factory.mktemp("bad")
    junk = root / "junk.safetensors"
    junk.write_bytes(b"PK\x03\x04 this is a zip file, not safetensors" * 10)
    rank = 4
    return {
        "not safetensors": LoraFile(sha256_of(junk), junk, 1.0, 1),
        # FLUX.1's single-block MLP projection, which FLUX.2 does not have
        "wrong keys": write_tensors(
            root / "flux1.safetensors",
            {
                "transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight": torch.zeros(rank, 32),
                "transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight": torch.zeros(128, rank),
            },
        ),
        "wrong shapes": write_tensors(
            root / "shapes.safetensors",
            {
                "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(rank, 33),
                "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, rank),
            },
        ),
        "no lora tensors": write_tensors(root / "model.safetensors", {"proj_out.weight": torch.zeros(16, 32)}),
    }


@pytest.mark.parametrize(
    "kind, message",
    [
        ("not safetensors", "not a safetensors file"),
        ("wrong keys", "has no linear layer 'single_transformer_blocks.0.proj_mlp'"),
        ("wrong shapes", "has shape [4, 33]; layer 'transformer_blocks.0.attn.to_q' takes 32 inputs"),
        ("no lora tensors", "'proj_out.weight' is not a LoRA tensor of FLUX.2's transformer"),
    ],
)
def test_a_bad_file_names_its_entry_and_leaves_the_model_as_it_was(editor, files, bad_files, kind, message):
    with pytest.raises(LoraError, match=re.escape(message)) as raised:
        editor.loras.prepare([files["diffusers"], bad_files[kind]])
    assert raised.value.index == 1
    # nothing of it was added: every adapter on the transformer is turbo or one the cache holds
    assert adapters_of(editor) == {"turbo", *editor.loras.loaded.values()}
    assert bad_files[kind].adapter_name not in adapters_of(editor)


def test_a_file_that_fails_half_way_through_loading_is_removed(editor, base, tiny_weights, tmp_path, monkeypatch):
    """Past the checks, a failure inside diffusers' load (after peft added the layers) still removes it all."""

    def fail(*args, **kwargs):
        raise RuntimeError("simulated failure while copying the LoRA's tensors")

    monkeypatch.setattr(peft, "set_peft_model_state_dict", fail)
    path = write_lora(tmp_path / "new.safetensors", tiny_weights, "bfl", seed=7)
    fresh = LoraFile(sha256_of(path), path, 1.0, 2)
    with pytest.raises(LoraError, match="simulated failure") as raised:
        run(editor, fresh)
    assert raised.value.index == 2
    assert adapters_of(editor) == {"turbo", *editor.loras.loaded.values()}
    assert fresh.adapter_name not in adapters_of(editor)
    monkeypatch.undo()
    assert np.array_equal(run(editor)[0], base)  # the model is healthy: the next request is the fresh model's


def test_library_names_stay_inside_the_library(tmp_path):
    library = tmp_path / "library"
    (library / "studio").mkdir(parents=True)
    (library / "style.safetensors").write_bytes(b"x")
    (library / "studio" / "ink.safetensors").write_bytes(b"x")
    (library / "owner" / "repo").mkdir(parents=True)
    (library / "owner" / "repo" / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    (library / "two").mkdir()
    for name in ("a", "b"):
        (library / "two" / f"{name}.safetensors").write_bytes(b"x")
    (tmp_path / "secret.safetensors").write_bytes(b"x")
    assert library_file(library, "style", 0, 10) == library / "style.safetensors"
    assert library_file(library, "style.safetensors", 0, 10) == library / "style.safetensors"
    assert library_file(library, "studio/ink", 0, 10) == library / "studio" / "ink.safetensors"
    assert library_file(library, "owner/repo", 0, 10).name == "pytorch_lora_weights.safetensors"  # a repo id
    for name, why in [
        ("../secret", "relative name inside the LoRA library"),
        (str(tmp_path / "secret.safetensors"), "relative name inside the LoRA library"),
        ("missing", "No LoRA named 'missing'"),
        ("two", "holds 2 .safetensors files (a.safetensors, b.safetensors): name one"),
    ]:
        with pytest.raises(InputError, match=re.escape(why)) as raised:
            library_file(library, name, 2, 10)
        assert raised.value.detail["loc"] == ["body", "loras", 2, "path"]
    with pytest.raises(InputError, match="larger than 0 bytes"):
        library_file(library, "style", 0, 0)
    with pytest.raises(InputError, match="no LoRA library"):
        library_file(None, "style", 0, 10)


# ---- the LoRA endpoints through fal's own Python client, against the real server -----------------------------


@pytest.fixture(scope="module")
def file_server(tmp_path_factory):
    """A plain HTTP server on loopback serving LoRA files by URL (the server is allowed to fetch from it)."""
    root = tmp_path_factory.mktemp("served")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def lora_server(tiny_weights, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-server")
    library = root / "library"
    write_lora(library / "studio" / "kohya.safetensors", tiny_weights, "kohya", seed=4)
    paths = make_certificates(["127.0.0.1", "localhost"], root / "tls")
    env = {
        "FLUX2_LORA_DIR": str(library),
        "FLUX2_FETCH_ALLOW": "127.0.0.1/32",  # the test's file server is on loopback
        "FLUX2_DISABLE_SAFETY_CHECKER": "1",
        "FLUX2_MEMORY_RESERVE_GB": str(RESERVE_GB),
    }
    process, url = start_server(
        tiny_weights,
        root / "data",
        root / "server.log",
        "--ssl-certfile",
        str(paths["cert"]),
        "--ssl-keyfile",
        str(paths["key"]),
        scheme="https",
        verify=str(paths["ca"]),
        env=env,
    )
    yield url, paths["ca"], root
    process.terminate()
    process.wait(timeout=30)


def test_lora_edit_through_fal_client(lora_server, file_server, tiny_weights):
    url, ca, root = lora_server
    served, served_url = file_server
    lora = write_lora(served / "style.safetensors", tiny_weights, "diffusers", seed=3)
    (served / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with httpx.Client(verify=str(ca)) as client:  # the same bytes uploaded through the storage emulation
        target = client.post(f"{url}/storage/upload/initiate", json={"file_name": "style.safetensors"}).json()
        assert client.put(target["upload_url"], content=lora.read_bytes()).status_code == 200
    reference = root / "reference.png"
    reference.write_bytes(image_bytes(96, 96))
    image = data_uri(reference.read_bytes())
    args = {"prompt": "p", "image_urls": [image], "image_size": "square", "seed": 5, "num_inference_steps": 4}
    edit = "fal-ai/flux-2/lora/edit"
    text = {"prompt": "a fox", "image_size": "square", "seed": 6, "num_inference_steps": 4}
    calls = [
        ("base", edit, args),
        ("url", edit, {**args, "loras": [{"path": f"{served_url}/style.safetensors"}]}),
        ("upload", edit, {**args, "loras": [{"path": target["file_url"], "scale": 1}]}),
        ("library", edit, {**args, "loras": [{"path": "studio/kohya", "scale": 1.5}]}),
        ("scale_0", edit, {**args, "loras": [{"path": "studio/kohya.safetensors", "scale": 0}]}),
        ("bad", edit, {**args, "loras": [{"path": "studio/kohya"}, {"path": f"{served_url}/junk.safetensors"}]}),
        ("base_after", edit, args),
        ("t2i", "fal-ai/flux-2", text),
        ("t2i_lora", "fal-ai/flux-2/lora", {**text, "loras": [{"path": "studio/kohya", "scale": 1.5}]}),
        ("t2i_none", "fal-ai/flux-2/lora", text),
    ]
    out = run_fal_client(url, ca, calls)

    def pixels(name):
        return np.asarray(decode(httpx.get(out[name]["images"][0]["url"], verify=str(ca)).content)).astype(int)

    base = pixels("base")
    assert np.abs(pixels("url") - base).mean() > 0.5
    assert np.array_equal(pixels("upload"), pixels("url"))  # same bytes, same adapter
    assert np.abs(pixels("library") - base).mean() > 0.5
    assert np.array_equal(pixels("scale_0"), base)
    assert np.array_equal(pixels("base_after"), base)  # after LoRAs and a failed one: the fresh server's pixels
    assert out["bad"]["status_code"] == 422
    (problem,) = out["bad"]["detail"]
    assert problem["loc"] == ["body", "loras", 1, "path"] and "not a safetensors file" in problem["msg"]
    assert problem["type"] == "invalid_lora"
    # text to image with LoRAs: without any, fal-ai/flux-2/lora is fal-ai/flux-2, pixel for pixel
    assert np.abs(pixels("t2i_lora") - pixels("t2i")).mean() > 0.5
    assert np.array_equal(pixels("t2i_none"), pixels("t2i"))

    health = httpx.get(f"{url}/health", verify=str(ca)).json()["capabilities"]
    assert health["endpoints"]["fal-ai/flux-2/lora/edit"] == {
        "profile": "edit",
        "category": "image-to-image",
        "runs_here": True,
        "loras": True,
    }
    assert health["endpoints"]["fal-ai/flux-2/lora"]["category"] == "text-to-image"
    assert not health["endpoints"]["fal-ai/flux-2/edit"]["loras"]
    assert health["loras"] == {
        "max_per_request": 3,
        "max_loaded": 4,
        "library": str(root / "library"),  # a path: with API keys, shown only to a caller with one
        "max_file_bytes": 1024**3,
    }

    metrics = httpx.get(f"{url}/metrics", verify=str(ca)).text
    # loaded once each (the URL's file, the library's); the upload, scale 0 and text to image reused them
    assert 'flux2_loras_total{cache="miss"} 2.0' in metrics
    assert 'flux2_loras_total{cache="hit"} 3.0' in metrics
    log = (root / "server.log").read_text()
    assert len(re.findall(r"LoRA \S+ \(sha256 [0-9a-f]{64}\) loaded as adapter", log)) == 2
    assert not list((root / "data" / "lora-downloads").glob("*"))  # downloaded files are removed when done

    # `flux2-server edit --lora FILE:SCALE --url`: the local file is uploaded, and runs as the URL's did
    written = root / "cli.png"
    ran = cli(
        "edit", str(reference), "--prompt", "p", "--endpoint", "lora-edit", "--lora", f"{lora}:1", "--seed", "5",
        "--steps", "4", "--image-size", "square", "--url", url, "-o", str(written), env={"SSL_CERT_FILE": str(ca)},
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert np.array_equal(np.asarray(decode(written.read_bytes())).astype(int), pixels("url"))


def test_the_cli_takes_loras_for_the_lora_endpoints_only(tmp_path):
    (tmp_path / "ref.png").write_bytes(image_bytes(96, 96))
    ran = cli("edit", str(tmp_path / "ref.png"), "-p", "p", "--lora", "style:0.5", "--url", "http://127.0.0.1:9")
    assert ran.returncode != 0 and "--lora is for the LoRA endpoints only (lora-edit, fal-ai/flux-2/lora)" in ran.stderr


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).parent / "flux2-server"), *args]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=300, check=False, env={**os.environ, **(env or {})}
    )


def run_fal_client(url: str, ca: Path, calls: list) -> dict:
    host = url.removeprefix("https://")
    env = {**os.environ, "FAL_RUN_HOST": host, "FAL_QUEUE_RUN_HOST": f"{host}/queue", "FAL_KEY": "any"}
    env["SSL_CERT_FILE"] = str(ca)
    ran = subprocess.run(
        [sys.executable, str(SCRIPT)],
        input=json.dumps(calls),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    return json.loads(ran.stdout)
