"""Settings are declared once (server/config.py): the flags of `serve` and `worker` and README's configuration
table are generated from them, so none can be missing or stale."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from server.cli import build_parser
from server.cli.flags import ENV_ONLY, HTTP_ONLY, flag, settings_table
from server.cli.startup import settings_of
from server.config import Settings

README = Path(__file__).resolve().parent.parent / "README.md"


def subcommand(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return commands.choices[name]


def flags_of(name: str) -> set[str]:
    return {option for action in subcommand(name)._actions for option in action.option_strings}


def test_every_setting_has_a_described_flag_on_serve_and_the_non_http_ones_on_worker():
    serve, worker = flags_of("serve"), flags_of("worker")
    for name, field in Settings.model_fields.items():
        assert field.description, f"Settings.{name} has no description"
        if name in ENV_ONLY:
            assert flag(name) not in serve and flag(name) not in worker
            continue
        assert flag(name) in serve
        assert (flag(name) in worker) == (name not in HTTP_ONLY), name
    # the drift this replaced: `serve` lacked the memory flags, `worker` the safety checker's
    assert {"--memory-mode", "--quantization"} <= serve
    assert {"--safety-checker", "--disable-safety-checker", "--no-fuse-adapter"} <= worker


def test_flags_become_settings_and_win_over_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FLUX2_QUANTIZATION", "int8")
    monkeypatch.setenv("FLUX2_MAX_BODY_BYTES", "5")
    args = build_parser().parse_args(
        ["serve", "--quantization", "fp8", "--no-fuse-adapter", "--data-dir", str(tmp_path), "--log-format", "json"]
    )
    settings = settings_of(args)
    assert settings.quantization == "fp8" and settings.fuse_adapter is False  # flags win
    assert settings.max_body_bytes == 5 and settings.data_dir == tmp_path  # the environment where no flag
    assert settings.log_format == "json"


def test_the_readme_configuration_table_is_the_generated_one():
    text = README.read_text()
    found = re.search(r"<!-- settings table: [^\n]*-->\n(.*?)\n<!-- end of settings table -->", text, re.DOTALL)
    assert found, "README.md has lost its settings table markers"
    assert found[1] == settings_table(), "README's table is stale: paste `python -m server.cli.flags` into it"


def test_the_api_keys_file_ignores_comments_and_blank_lines(tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text("# studio keys\nkey-one\n\n  # old: key-two\nkey-three  \n")
    assert Settings(api_keys="env-key", api_keys_file=keys_file).keys() == ["env-key", "key-one", "key-three"]
