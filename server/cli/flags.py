"""Command-line flags generated from `server.config.Settings`: each field is a `--flag` (and a `FLUX2_*` variable,
pydantic-settings' side), with the field's description as its help, so the two can't drift apart. Flags win over
the environment. README's configuration table comes from here too: `python -m server.cli.flags` prints it, and
tests/test_settings.py checks README against it.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Iterable
from pathlib import Path

from server.config import Settings

ENV_ONLY = {"api_keys", "operator_keys"}  # secrets: from the environment only, so they stay out of `ps`
SOURCE = ("weights", "tiny")  # one or the other: a mutually exclusive group
# Settings only a process that serves HTTP uses; `flux2-server worker` has no HTTP of its own
HTTP_ONLY = {
    "host",
    "port",
    "public_url",
    "ssl_certfile",
    "ssl_keyfile",
    "api_keys_file",
    "operator_keys_file",
    "allow_open_api",
    "cors_origins",
    "allowed_hosts",
    "trusted_proxies",
    "max_upload_bytes",
    "max_body_bytes",
    "read_timeout_s",
    "max_connections",
    "max_pending_upload_bytes",
    "min_free_disk_bytes",
    "rate_limit",
    "max_pending_per_key",
    "sync_timeout_s",
}


def serve_settings() -> list[str]:
    return [name for name in Settings.model_fields if name not in ENV_ONLY and name not in SOURCE]


def worker_settings() -> list[str]:
    return [name for name in serve_settings() if name not in HTTP_ONLY]


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def env(name: str) -> str:
    return "FLUX2_" + name.upper()


def shown_default(name: str) -> str:
    default = Settings.model_fields[name].default
    if default is None:
        return "none"
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, float) and default.is_integer():
        default = int(default)
    return f"`{default}`"


def _value_type(annotation) -> tuple[type | None, list | None]:
    """(argparse type, choices) for a field's annotation: `X | None` is X; a Literal gives choices."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return None, list(typing.get_args(annotation))
    return annotation, None


def add_setting_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, names: Iterable[str]) -> None:
    """One flag per setting; its default None means "not given" (the environment, then the field's default)."""
    for name in names:
        field = Settings.model_fields[name]
        value_type, choices = _value_type(field.annotation)
        help_text = f"{field.description} [{env(name)}; default {shown_default(name).strip('`')}]"
        options: dict = {"dest": name, "default": None, "help": help_text.replace("%", "%%")}
        if value_type is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif choices:
            options["choices"] = choices
        else:
            options["type"] = value_type
            options["metavar"] = "DIR" if value_type is Path else name.rpartition("_")[2].upper()
        parser.add_argument(flag(name), **options)


def add_source_flags(parser: argparse.ArgumentParser) -> None:
    """--weights DIR or --tiny."""
    add_setting_flags(parser.add_mutually_exclusive_group(), SOURCE)


def settings_table() -> str:
    """README's configuration table: every setting, its flag (where `serve` has one), variable, default, meaning."""
    flagged = set(serve_settings()) | set(SOURCE)
    rows = ["| flag | env | default | meaning |", "| --- | --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        shown_flag = f"`{flag(name)}`" if name in flagged else ""
        worker = " (`serve` only)" if name in HTTP_ONLY else ""
        description = (field.description or "").replace("|", "\\|")
        rows.append(f"| {shown_flag} | `{env(name)}` | {shown_default(name)} | {description}{worker} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(settings_table())
