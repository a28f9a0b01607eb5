"""What `serve` and `worker` share before they start: settings from flags and the environment, logging, and the
weights to load (checked before loading)."""

from __future__ import annotations

import argparse
import logging
import logging.config
import os
import sys
from pathlib import Path

from server.cli.tiny import ensure_tiny
from server.config import Settings
from weights.layout import TINY_MARKER


def route_library_logs(json_lines: bool) -> None:
    """torch's, diffusers' and transformers' messages and Python warnings go through our handler (one format, with
    request ids) instead of their own stderr handlers; with JSON lines, their progress bars are off too."""
    import diffusers
    import transformers

    logging.captureWarnings(True)
    torch_logger = logging.getLogger("torch")  # torch._logging puts its own handler there (e.g. torchao's warnings)
    for handler in list(torch_logger.handlers):
        torch_logger.removeHandler(handler)
    torch_logger.propagate = True
    for library in (diffusers.utils.logging, transformers.utils.logging):
        library.disable_default_handler()
        library.enable_propagation()
        if json_lines:
            library.disable_progress_bar()


def resolve_weights(settings) -> tuple[Path, bool] | int:
    """(weights directory, tiny) from --weights / --tiny; an exit status where they are unusable."""
    import torch

    from weights.verify import verify

    if settings.weights is not None:
        report = verify(settings.weights)
        if not report.ok:
            print(f"error: {settings.weights} is not a usable FLUX.2 weights directory:", file=sys.stderr)
            for problem in report.problems:
                print(f"  - {problem}", file=sys.stderr)
            return 2
        return settings.weights, (settings.weights / TINY_MARKER).is_file()
    if settings.tiny or not torch.cuda.is_available():
        weights_dir = ensure_tiny()
        logging.getLogger("flux2").warning(
            "serving the TINY random-weight model from %s: outputs are noise. Pass --weights DIR for FLUX.2 [dev].",
            weights_dir,
        )
        return weights_dir, True
    print("error: a GPU is present but no weights were given: pass --weights DIR (or --tiny)", file=sys.stderr)
    return 2


def settings_of(args: argparse.Namespace) -> Settings:
    """The flags given (server/cli/flags.py), over the FLUX2_* environment, over the defaults."""
    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    if getattr(args, "gpu", None) is not None:
        overrides["device"] = f"cuda:{args.gpu}"
    return Settings(**overrides)


def settings_from(args: argparse.Namespace) -> Settings:
    """`settings_of`, and this process's logging configured from them."""
    from server.logs import logging_config

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # air-gapped: nothing is ever fetched from a hub
    settings = settings_of(args)
    logging.config.dictConfig(logging_config(settings.log_format, settings.log_level))
    route_library_logs(json_lines=settings.log_format == "json")
    return settings


def runtime_problem(settings, weights_dir: Path) -> str | None:
    """Why the configured memory mode / fast path / acceleration, or the --gpus/--parallel grouping, can't run here,
    checked before loading."""
    from pipelines.editor import pick_device, pick_dtype
    from pipelines.runtime import plan_runtime

    try:
        dtype = pick_dtype(pick_device(settings.device), settings.dtype)
        plan_runtime(settings.runtime_options(), weights_dir, settings.device, dtype)
        if settings.gpus is not None:
            from server.service.replicas import plan

            plan(settings, weights_dir)  # GpuPlanError (a ValueError) says why not
    except ValueError as exc:
        return str(exc)
    return None
