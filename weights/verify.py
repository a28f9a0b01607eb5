"""Check a FLUX.2 weights directory before loading it, and name precisely what is missing or corrupt.

Cheap enough for start-up and for `flux2-server weights verify`: it reads JSON files and safetensors headers,
never tensor data. A safetensors file is checked for a readable header whose tensors end exactly where the file
ends (a truncated download fails that), and sharded weights for an index whose every shard and tensor exists.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from weights.layout import ADAPTERS, COMPONENTS, PIPELINE_CLASS, Component

TOKENIZER_FILES = ("tokenizer.json", "tekken.json")  # one of them holds the vocabulary
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass
class Report:
    directory: Path
    problems: list[str] = field(default_factory=list)
    components: dict[str, str] = field(default_factory=dict)  # component -> "ok" or its first problem
    # optional parts: adapter -> "ok", or "missing <path>" (not a problem: the profiles it serves can't run)
    adapters: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def fail(self, component: str | None, message: str) -> None:
        self.problems.append(f"{component}: {message}" if component else message)
        if component and self.components.get(component, "ok") == "ok":
            self.components[component] = message


def _read_json(path: Path, report: Report, component: str | None) -> dict | None:
    if not path.is_file():
        report.fail(component, f"missing {path}")
        return None
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        report.fail(component, f"{path} is not valid JSON: {exc}")
        return None
    if not isinstance(value, dict):
        report.fail(component, f"{path} is not a JSON object")
        return None
    return value


def safetensors_tensor_names(path: Path) -> set[str]:
    """Names of the tensors in a safetensors file, after checking its header against the file's size.

    Raises ValueError naming what is wrong.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path} is too short to be a safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"{path} has an impossible header length {header_len} (file is {size} bytes)")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path} has an unreadable header: {exc}") from exc
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    end = max((v["data_offsets"][1] for v in tensors.values()), default=0)
    data_size = size - 8 - header_len
    if end != data_size:
        raise ValueError(
            f"{path} is truncated or corrupt: its header describes {end} bytes of tensors, the file holds {data_size}"
        )
    return set(tensors)


def _check_weights(component: Component, directory: Path, report: Report) -> None:
    index_path = directory / f"{component.weights_prefix}.safetensors.index.json"
    single_path = directory / f"{component.weights_prefix}.safetensors"
    if index_path.is_file():
        index = _read_json(index_path, report, component.name)
        if index is None:
            return
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            report.fail(component.name, f"{index_path} has no weight_map")
            return
        for shard in sorted(set(weight_map.values())):
            shard_path = directory / shard
            if not shard_path.is_file():
                report.fail(component.name, f"missing shard {shard_path}")
                continue
            try:
                names = safetensors_tensor_names(shard_path)
            except (OSError, ValueError) as exc:
                report.fail(component.name, str(exc))
                continue
            missing = [k for k, s in weight_map.items() if s == shard and k not in names]
            if missing:
                report.fail(
                    component.name, f"{shard_path} lacks {len(missing)} tensor(s) its index lists, e.g. {missing[0]}"
                )
    elif single_path.is_file():
        try:
            safetensors_tensor_names(single_path)
        except (OSError, ValueError) as exc:
            report.fail(component.name, str(exc))
    else:
        report.fail(component.name, f"no weights: neither {single_path.name} nor {index_path.name} in {directory}")


def verify(directory: str | Path) -> Report:
    directory = Path(directory)
    report = Report(directory)
    if not directory.is_dir():
        report.fail(None, f"{directory} is not a directory")
        return report
    index = _read_json(directory / "model_index.json", report, None)
    if index is not None and index.get("_class_name") != PIPELINE_CLASS:
        report.fail(None, f"model_index.json names {index.get('_class_name')!r}, not {PIPELINE_CLASS!r}")

    for component in COMPONENTS:
        report.components[component.name] = "ok"
        listed = (index or {}).get(component.name)
        if index is not None and (not isinstance(listed, list) or len(listed) != 2):
            report.fail(component.name, "not listed in model_index.json as [library, class]")
        elif index is not None and listed[1] not in component.accepted:
            report.fail(
                component.name, f"model_index.json names class {listed[1]!r}, expected one of {component.accepted}"
            )
        component_dir = directory / component.name
        if not component_dir.is_dir():
            report.fail(component.name, f"missing directory {component_dir}")
            continue
        config = _read_json(component_dir / component.config_file, report, component.name)
        if (
            config is not None
            and component.library == "diffusers"
            and config.get("_class_name") != component.class_name
        ):
            report.fail(component.name, f"{component.config_file} names class {config.get('_class_name')!r}")
        if (
            config is not None
            and component.name == "text_encoder"
            and component.class_name not in config.get("architectures", [])
        ):
            report.fail(
                component.name, f"config.json architectures {config.get('architectures')} lack {component.class_name}"
            )
        if component.name == "tokenizer" and not any((component_dir / f).is_file() for f in TOKENIZER_FILES):
            report.fail(component.name, f"no vocabulary: none of {', '.join(TOKENIZER_FILES)} in {component_dir}")
        if component.weights_prefix:
            _check_weights(component, component_dir, report)
    for adapter in ADAPTERS.values():
        report.adapters[adapter.name] = _check_adapter(adapter.path(directory), report)
    return report


def _check_adapter(path: Path, report: Report) -> str:
    """An adapter may be absent; one that is present must be readable, else loading it would fail."""
    if not path.is_file():
        return f"missing {path}"
    try:
        names = safetensors_tensor_names(path)
    except (OSError, ValueError) as exc:
        report.fail(None, f"adapter {exc}")
        return str(exc)
    if not any(".lora_A." in name for name in names):
        report.fail(None, f"adapter {path} holds no LoRA tensors (no '*.lora_A.*' keys)")
        return "no LoRA tensors"
    return "ok"
