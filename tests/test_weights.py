"""weights/: the tiny model is built deterministically in seconds, and `verify` names what is wrong."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time

import pytest

from weights.tiny import build_tiny
from weights.verify import verify


def digest(directory) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_tiny_build_is_deterministic_and_quick(tmp_path, tiny_weights):
    started = time.monotonic()
    again = build_tiny(tmp_path / "again")
    assert time.monotonic() - started < 30
    assert digest(again) == digest(tiny_weights)


def test_tiny_has_the_real_layout(tiny_weights):
    index = json.loads((tiny_weights / "model_index.json").read_text())
    assert index["_class_name"] == "Flux2Pipeline"
    assert index["transformer"] == ["diffusers", "Flux2Transformer2DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKLFlux2"]
    assert index["text_encoder"] == ["transformers", "Mistral3ForConditionalGeneration"]
    assert index["tokenizer"] == ["transformers", "PixtralProcessor"]
    assert (tiny_weights / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tiny_weights / "text_encoder" / "model.safetensors").is_file()
    report = verify(tiny_weights)
    assert report.ok, report.problems
    assert set(report.components) == {"scheduler", "text_encoder", "tokenizer", "transformer", "vae"}


@pytest.fixture
def broken(tmp_path, tiny_weights):
    copy = tmp_path / "weights"
    shutil.copytree(tiny_weights, copy)
    return copy


def test_verify_names_a_missing_component(broken):
    shutil.rmtree(broken / "vae")
    report = verify(broken)
    assert not report.ok
    assert report.components["vae"].startswith("missing directory")
    assert report.components["transformer"] == "ok"


def test_verify_names_a_truncated_safetensors(broken):
    path = broken / "transformer" / "diffusion_pytorch_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    report = verify(broken)
    assert "truncated or corrupt" in report.components["transformer"]
    assert str(path) in report.components["transformer"]


def test_verify_names_a_bad_config_and_a_missing_vocabulary(broken):
    (broken / "scheduler" / "scheduler_config.json").write_text("{not json")
    (broken / "tokenizer" / "tokenizer.json").unlink()
    report = verify(broken)
    assert "not valid JSON" in report.components["scheduler"]
    assert "no vocabulary" in report.components["tokenizer"]


def test_verify_checks_sharded_weights_against_their_index(broken):
    component = broken / "text_encoder"
    single = component / "model.safetensors"
    shard = component / "model-00001-of-00002.safetensors"
    single.rename(shard)
    (component / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a.weight": shard.name, "b.weight": "model-00002-of-00002.safetensors"}})
    )
    report = verify(broken)
    problems = "\n".join(report.problems)
    assert "missing shard" in problems and "model-00002-of-00002" in problems
    assert "lacks 1 tensor(s)" in problems  # a.weight is not in the shard


def test_verify_cli_exit_code_and_table(broken):
    (broken / "model_index.json").unlink()
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "weights", "verify", str(broken)],
        check=False,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "model_index.json" in result.stdout
    assert "NOT USABLE" in result.stdout


def test_serve_refuses_an_unusable_weights_directory(broken):
    shutil.rmtree(broken / "text_encoder")
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--weights", str(broken), "--port", "1"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "text_encoder: missing directory" in result.stderr


@pytest.mark.parametrize(("tokenizer_class", "ok"), [("PreTrainedTokenizerFast", True), ("CLIPTokenizer", False)])
def test_verify_accepts_the_tokenizer_saved_alone(broken, tokenizer_class, ok):
    index_path = broken / "model_index.json"
    index = json.loads(index_path.read_text())
    index["tokenizer"] = ["transformers", tokenizer_class]
    index_path.write_text(json.dumps(index))
    report = verify(broken)
    assert report.ok is ok
    if not ok:
        assert "CLIPTokenizer" in report.components["tokenizer"]


def test_a_failed_import_leaves_nothing_half_made(tiny_weights, tmp_path):
    """An unreadable file midway: the files copied before it are removed with their staging folder."""
    from weights.importer import import_snapshot, plan_import, staging_dir

    files, skipped = plan_import(tiny_weights)
    middle = len(files) // 2
    files[middle].path = tmp_path  # a folder where a file should be: reading it fails (IsADirectoryError)
    dest = tmp_path / "models" / "FLUX.2-dev"
    with pytest.raises(IsADirectoryError):
        import_snapshot(tiny_weights, dest, plan=(files, skipped))
    assert not dest.exists() and not staging_dir(dest).exists()
    assert list((tmp_path / "models").iterdir()) == []
    # the same import, readable, lands whole; one into an existing non-empty folder is refused untouched
    files[middle].path = tiny_weights / files[middle].relative
    result = import_snapshot(tiny_weights, dest, plan=(files, skipped))
    assert len(result.copied) == len(files) and verify(dest).ok
    with pytest.raises(FileExistsError):
        import_snapshot(tiny_weights, dest, plan=(files, skipped))
    assert verify(dest).ok
