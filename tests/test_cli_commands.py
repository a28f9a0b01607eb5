"""`flux2-server edit` (local and --url), `weights import` from a Hugging Face cache, `weights verify`, `doctor`."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import data_uri, decode, free_port, image_bytes
from weights.verify import verify

# the console script pyproject.toml installs (runs this checkout's code: the tests set PYTHONPATH)
FLUX2_SERVER = str(Path(sys.executable).parent / "flux2-server")


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [FLUX2_SERVER, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ref") / "reference.png"
    path.write_bytes(image_bytes(96, 96, seed=21))
    return path


def test_edit_locally_matches_the_server_pixel_for_pixel(server, tiny_weights, reference, tmp_path):
    out = tmp_path / "out.png"
    local = cli(
        "edit", str(reference), "--prompt", "a red hat", "--endpoint", "flash", "--seed", "5",
        "--image-size", "square", "--weights", str(tiny_weights), "-o", str(out),
    )  # fmt: skip
    assert local.returncode == 0, local.stderr
    assert "4/4" in local.stderr  # the step bar reached the last step
    for stage in ("loading: read text_encoder", "loading: read transformer", "loading: place", "loading: done"):
        assert stage in local.stderr  # the load's bar, stage by stage
    assert "seed 5, 512x512, 4 steps" in local.stdout and str(out) in local.stdout
    served = server.post(
        "fal-ai/flux-2/flash/edit",
        {"prompt": "a red hat", "image_urls": [data_uri(reference.read_bytes())], "seed": 5, "image_size": "square"},
    ).json()
    _, expected = server.fetch_image(served["images"][0])
    assert np.array_equal(np.asarray(decode(out.read_bytes())), np.asarray(expected))


def test_edit_against_a_server_follows_its_steps(server, reference, tmp_path):
    out = tmp_path / "remote.jpg"
    remote = cli(
        "edit", str(reference), "--prompt", "p", "--endpoint", "turbo", "--seed", "9", "--image-size", "512x640",
        "--num-images", "2", "--url", server.url, "-o", str(out),
    )  # fmt: skip
    assert remote.returncode == 0, remote.stderr
    assert "8/8" in remote.stderr and "queued at position" in remote.stderr
    assert "seed 9" in remote.stdout
    for path in (tmp_path / "remote-1.jpg", tmp_path / "remote-2.jpg"):
        image = decode(path.read_bytes())
        assert image.format == "JPEG" and image.size == (512, 640)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "3"], "num_inference_steps: Input should be greater than or equal to 4"),
        (["--endpoint", "turbo", "--steps", "10"], "--steps is for the base endpoints only"),
        (["--image-size", "100x100"], "image_size"),
        (["-o", "out.gif"], "-o must end in one of"),
    ],
)
def test_edit_refuses_bad_input_with_the_apis_own_ranges(reference, args, message):
    result = cli("edit", str(reference), "--prompt", "p", "--url", "http://127.0.0.1:9", *args)
    assert result.returncode != 0 and message in result.stderr


@pytest.fixture(scope="module")
def keyed_server(tiny_weights, tmp_path_factory):
    """The tiny server with an API key, for the CLI's answers to a refused key and refused input."""
    from tests.conftest import start_server

    root = tmp_path_factory.mktemp("keyed")
    process, url = start_server(tiny_weights, root / "data", root / "server.log", env={"FLUX2_API_KEYS": "good-key"})
    yield url
    process.terminate()
    process.wait(timeout=30)


def plain_error(result: subprocess.CompletedProcess) -> str:
    """The one line an ordinary mistake gets: no traceback, non-zero exit, no httpx request log."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "HTTP Request:" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_edit_checks_its_inputs_before_loading_anything(tiny_weights, reference, tmp_path):
    missing = tmp_path / "missing.png"
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    for image, message in ((missing, f"{missing}: no such file"), (not_an_image, "is not an image PIL can read")):
        result = cli("edit", str(reference), str(image), "--prompt", "p", "--weights", str(tiny_weights))
        assert message in plain_error(result)
        assert "loading" not in result.stderr  # refused before the model load
    broken = cli("edit", str(reference), "--prompt", "p", "--weights", str(tmp_path / "nowhere"))
    assert "nowhere can't be loaded" in plain_error(broken) and "loading" not in broken.stderr


def test_edit_against_a_server_answers_ordinary_mistakes_in_one_line(keyed_server, reference, tmp_path):
    down = cli("edit", str(reference), "--prompt", "p", "--url", f"http://127.0.0.1:{free_port()}")
    assert "no server answers at http://127.0.0.1:" in plain_error(down)
    bad_key = cli("edit", str(reference), "--prompt", "p", "--url", keyed_server, "--key", "wrong")
    assert "the server answered 401" in plain_error(bad_key) and "--key" in plain_error(bad_key)
    tiny = tmp_path / "tiny.png"
    tiny.write_bytes(image_bytes(4, 4))  # decodes, but the model refuses a reference this small
    refused = cli("edit", str(tiny), "--prompt", "p", "--url", keyed_server, "--key", "good-key")
    assert re.search(r"the server answered 4\d\d: .*Reference image refused", plain_error(refused))


def fake_hf_cache(source: Path, root: Path) -> Path:
    """`source` laid out as the Hugging Face cache does: files in blobs/ named by checksum, symlinked from
    snapshots/<revision>/ (sha256 for LFS files, git blob sha1 for the rest); plus files outside the layout."""
    repo = root / "models--black-forest-labs--FLUX.2-dev"
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    extra = {"README.md": b"# FLUX.2 [dev]\n", "flux2-dev.safetensors": b"single-file checkpoint, not copied"}
    files = {p.relative_to(source): p.read_bytes() for p in source.rglob("*") if p.is_file()}
    for relative, data in [*files.items(), *((Path(k), v) for k, v in extra.items())]:
        if relative.suffix == ".safetensors":  # stored in LFS
            name = hashlib.sha256(data).hexdigest()
        else:
            name = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        blob = repo / "blobs" / name
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / relative
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return repo


def test_weights_import_from_a_hugging_face_cache(tiny_weights, tmp_path):
    repo = fake_hf_cache(tiny_weights, tmp_path / "usb")
    dest = tmp_path / "models" / "FLUX.2-dev"
    result = cli("weights", "import", str(repo), str(dest))
    assert result.returncode == 0, result.stdout + result.stderr
    assert verify(dest).ok
    assert not (dest / "flux2-dev.safetensors").exists() and not (dest / "README.md").exists()
    assert "left out (not part of the diffusers layout): README.md, flux2-dev.safetensors" in result.stdout
    copied = [p for p in dest.rglob("*") if p.is_file() and p.name != "SHA256SUMS"]
    assert all(not p.is_symlink() for p in copied)
    assert f"copied {len(copied)} files; {len(copied)} matched the snapshot's checksums" in result.stdout
    sums = dict(line.split("  ")[::-1] for line in (dest / "SHA256SUMS").read_text().splitlines())
    assert set(sums) == {str(p.relative_to(dest)) for p in copied}
    for relative, digest in sums.items():
        assert hashlib.sha256((dest / relative).read_bytes()).hexdigest() == digest
    assert "transformer" in result.stdout and "profile turbo" in result.stdout
    assert result.stdout.splitlines()[-1] == "OK"


def test_weights_import_stops_at_a_corrupt_blob(tiny_weights, tmp_path):
    repo = fake_hf_cache(tiny_weights, tmp_path / "usb")
    weights = (repo / "snapshots" / "0123abcd" / "vae" / "diffusion_pytorch_model.safetensors").resolve()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit at the end: same size, different bytes
    weights.write_bytes(bytes(data))
    dest = tmp_path / "dest"
    result = cli("weights", "import", str(repo / "snapshots" / "0123abcd"), str(dest))
    assert result.returncode == 1
    assert "checksum mismatch: vae/diffusion_pytorch_model.safetensors: sha256 is" in result.stdout
    # the files copied before it went into a staging folder, removed: nothing half-made is left
    assert not dest.exists() and list(tmp_path.iterdir()) == [tmp_path / "usb"]
    assert f"nothing was written at {dest}" in result.stdout


@pytest.mark.parametrize("kind", ["missing", "file", "empty", "broken"])
def test_weights_verify_names_what_is_missing(kind, tiny_weights, tmp_path):
    target = tmp_path / "weights"
    if kind == "file":
        target.write_text("not a folder")
    elif kind == "empty":
        target.mkdir()
    elif kind == "broken":
        shutil.copytree(tiny_weights, target)
        (target / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    result = cli("weights", "verify", str(target))
    assert result.returncode == 1, result.stdout
    assert "Traceback" not in result.stderr and result.stderr == "", result.stderr
    assert "can run" not in result.stdout
    assert result.stdout.splitlines()[-1].startswith("NOT USABLE")
    expected = {
        "missing": f"{target} is not a directory",
        "file": f"{target} is not a directory",
        "empty": f"missing {target / 'model_index.json'}",
        "broken": "transformer: no weights: neither diffusion_pytorch_model.safetensors",
    }[kind]
    assert expected in result.stdout
    doctor = cli("doctor", "--weights", str(target))
    assert doctor.returncode == 1 and "Traceback" not in doctor.stderr
    assert expected in doctor.stdout


def test_doctor_reports_the_machine(tiny_weights):
    result = cli("doctor", "--weights", str(tiny_weights))
    assert result.returncode == 0, result.stderr
    rows = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in result.stdout.splitlines() if line.strip())
    for name in ("python", "torch", "diffusers", "transformers", "NVIDIA driver", "system memory", "memory mode"):
        assert name in rows, result.stdout
    assert rows["torch"].startswith("2.13.0")
    assert rows["weights"].endswith(": ok")
    import torch

    if not torch.cuda.is_available():
        assert "none visible to torch" in rows["GPU"]


def doctor_json(*args: str) -> subprocess.CompletedProcess:
    """`flux2-server doctor --json ...` through the installed console script, without FLUX2_* settings."""
    entry = Path(sys.executable).with_name("flux2-server")
    assert entry.is_file(), f"{entry}: the console script `pip install -e .` installs next to python"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUX2_")}
    return subprocess.run(
        [str(entry), "doctor", "--json", *args], capture_output=True, text=True, timeout=120, check=False, env=env
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (  # one H100 80 GB: fp8 transformer, text encoder cut to 31 layers, all resident
            ["--gpu-memory", "80", "--host-memory", "128"],
            {"mode": "full", "quantization": "fp8", "text_encoder_quantization": "none", "text_encoder_layers": 31,
             "prompt_expansion": False, "peak_gpu_gib": 75.1, "peak_host_gib": 4.0},
        ),
        (  # two 48 GB cards without fp8 (A6000): int8 transformer on one, the whole bf16 encoder on the other
            ["--gpu-memory", "48", "--gpus", "2", "--host-memory", "256", "--compute-capability", "8.6"],
            {"mode": "multi-gpu", "quantization": "int8", "text_encoder_device": "cuda:1", "text_encoder_layers": None,
             "prompt_expansion": True, "peak_gpu_gib": 40.9, "peak_text_encoder_gpu_gib": 45.7},
        ),
        (  # one 24 GB card, 128 GB of host RAM: 4-bit transformer resident, the cut encoder streamed
            ["--gpu-memory", "24", "--host-memory", "128", "--no-fp8"],
            {"mode": "offload-text-encoder", "quantization": "int4", "text_encoder_layers": 31,
             "sized_for": "1024x1024 output, 1 reference", "peak_gpu_gib": 22.0, "peak_host_gib": 37.3},
        ),
    ],
)  # fmt: skip
def test_doctor_json_prints_the_plan_for_simulated_hardware(args, expected):
    result = doctor_json(*args)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["refused"] is None and report["hardware"]["simulated"] is True
    assert report["weights"]["dtype"] == "bfloat16" and report["weights"]["source"].startswith("FLUX.2 [dev]")
    assert report["weights"]["gib"]["transformer"] == 60.021 and report["weights"]["gib"]["text_encoder"] == 44.725
    assert {k: report["plan"][k] for k in expected} == expected
    assert report["plan"]["reason"]


def test_doctor_json_says_why_serve_would_refuse(tiny_weights):
    refused = doctor_json("--gpu-memory", "16", "--host-memory", "64")
    assert refused.returncode == 0, refused.stderr
    report = json.loads(refused.stdout)
    assert report["plan"] is None and report["refused"].startswith("not enough host RAM")
    assert "95.8 GiB of host RAM even pinned on the fly; 64.0 GiB available" in report["refused"]
    configured = json.loads(doctor_json("--gpu-memory", "80", "--memory-mode", "multi-gpu").stdout)
    assert configured["refused"] == "memory mode 'multi-gpu' needs FLUX2_TEXT_ENCODER_DEVICE, e.g. cuda:1"
    tiny = json.loads(doctor_json("--gpu-memory", "24", "--host-memory", "64", "--weights", str(tiny_weights)).stdout)
    assert (tiny["plan"]["mode"], tiny["plan"]["quantization"], tiny["weights"]["source"]) == (
        "full",
        "none",
        str(tiny_weights),
    )
    bad = doctor_json("--compute-capability", "8.0", "--fp8", "--gpu-memory", "80")
    assert bad.returncode == 2 and "--compute-capability 8.0 and --fp8 disagree" in bad.stderr


def test_serve_refuses_to_listen_beyond_loopback_without_keys(tmp_path):
    """Checked before anything loads: exit 2 with the reason (keys, or FLUX2_ALLOW_OPEN_API, let it start)."""
    from server.cli.serve import is_loopback

    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUX2_")}
    command = [sys.executable, "-m", "server.cli", "serve", "--tiny", "--no-supervise", "--data-dir", str(tmp_path)]
    refused = subprocess.run(
        [*command, "--host", "0.0.0.0"], check=False, env=env, capture_output=True, text=True, timeout=120
    )
    assert refused.returncode == 2 and "without API keys" in refused.stderr
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.5") and not is_loopback("flux2.lan")


def test_a_second_server_on_a_taken_data_dir_or_port_exits_with_the_reason(tmp_path):
    """Exit 2 (not restarted by the supervisor) before the queue is opened or the model loaded."""
    import socket

    from server.config import Settings
    from server.queue.connect import lock_local_queue
    from tests.conftest import free_port

    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUX2_")}

    def serve(data_dir: Path, port: int) -> subprocess.CompletedProcess:
        command = ["serve", "--tiny", "--data-dir", str(data_dir), "--port", str(port)]  # supervised, the default
        return subprocess.run(
            [sys.executable, "-m", "server.cli", *command],
            check=False,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    first = lock_local_queue(Settings(data_dir=tmp_path / "a"))  # as the first server holds it
    second = serve(tmp_path / "a", free_port())
    assert second.returncode == 2 and "another flux2-server (pid" in second.stderr, second.stderr
    assert not (tmp_path / "a" / "queue.sqlite3").exists()  # the queue was never opened
    first.close()

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        refused = serve(tmp_path / "b", taken.getsockname()[1])
    assert refused.returncode == 2 and "cannot listen on 127.0.0.1" in refused.stderr, refused.stderr
    assert not (tmp_path / "b" / "queue.sqlite3").exists()  # nor here: no model was loaded either

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "queue.sqlite3").write_bytes(b"not a database" * 100)
    corrupt = serve(tmp_path / "c", free_port())
    assert corrupt.returncode == 2 and "queue database" in corrupt.stderr, corrupt.stderr
