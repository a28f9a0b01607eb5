"""`flux2-server`: serve the API, run a queue worker, edit once, import/verify/build weights, check the machine
(doctor), make TLS files.

argparse (standard library) is enough for a handful of subcommands; the longer ones live in server/commands/.
"""

from __future__ import annotations

import argparse
import logging
import logging.config
import os
import shutil
import sys
import tempfile
from pathlib import Path

from server.commands import doctor as doctor_command
from server.commands import edit as edit_command
from server.commands import weights as weights_commands
from weights.layout import SAFETY_CHECKER_DIR, TINY_MARKER

TINY_CACHE_VERSION = "v3"  # bump when weights.tiny changes what it builds


def tiny_cache_dir() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "flux2-server" / f"tiny-{TINY_CACHE_VERSION}"


def ensure_tiny(directory: Path | None = None) -> Path:
    """The tiny model's directory, built on first use (into a temporary directory, then moved into place)."""
    from weights.tiny import build_tiny
    from weights.verify import verify

    directory = directory or tiny_cache_dir()
    if verify(directory).ok:
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=directory.parent))
    build_tiny(staging)
    shutil.rmtree(directory, ignore_errors=True)
    staging.rename(directory)
    return directory


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


def resolve_weights(settings) -> tuple[Path | None, bool] | int:
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


def settings_from(args: argparse.Namespace):
    from server.config import Settings
    from server.logs import logging_config

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # air-gapped: nothing is ever fetched from a hub
    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    if getattr(args, "gpu", None) is not None:
        overrides["device"] = f"cuda:{args.gpu}"
    settings = Settings(**overrides)
    logging.config.dictConfig(logging_config(settings.log_format, settings.log_level))
    route_library_logs(json_lines=settings.log_format == "json")
    return settings


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.app import create_app
    from server.logs import logging_config

    settings = settings_from(args)
    if (
        settings.queue
        and settings.queue.startswith(("redis", "unix"))
        and settings.weights is None
        and not settings.tiny
    ):
        weights_dir, tiny = None, False  # the API tier alone: `flux2-server worker` processes run the model
    else:
        resolved = resolve_weights(settings)
        if isinstance(resolved, int):
            return resolved
        weights_dir, tiny = resolved
        problem = runtime_problem(settings, weights_dir)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
    app = create_app(settings, weights_dir, tiny=tiny)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_config=logging_config(settings.log_format, settings.log_level),
        log_level=settings.log_level,
        ssl_certfile=settings.ssl_certfile,
        ssl_keyfile=settings.ssl_keyfile,
    )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    import asyncio

    from server.queue_worker import run_worker

    settings = settings_from(args)
    if not settings.queue:
        print("error: a worker needs the shared queue: pass --queue redis://HOST:PORT/DB", file=sys.stderr)
        return 2
    resolved = resolve_weights(settings)
    if isinstance(resolved, int):
        return resolved
    problem = runtime_problem(settings, resolved[0])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    asyncio.run(run_worker(settings, *resolved))
    return 0


def runtime_problem(settings, weights_dir: Path) -> str | None:
    """Why the configured memory mode / fast path / acceleration can't run here, checked before loading."""
    from pipelines.editor import pick_device, pick_dtype
    from pipelines.runtime import plan_runtime

    try:
        dtype = pick_dtype(pick_device(settings.device), settings.dtype)
        plan_runtime(settings.runtime_options(), weights_dir, settings.device, dtype)
    except ValueError as exc:
        return str(exc)
    return None


def cmd_tls(args: argparse.Namespace) -> int:
    from server.tls import make_certificates

    paths = make_certificates(args.hosts, args.out)
    print(f"CA certificate (give it to clients, e.g. SSL_CERT_FILE): {paths['ca']}")
    print(f"serve with: flux2-server serve --ssl-certfile {paths['cert']} --ssl-keyfile {paths['key']}")
    return 0


def cmd_weights_tiny(args: argparse.Namespace) -> int:
    from weights.tiny import build_tiny

    print(build_tiny(args.directory))
    return 0


def cmd_weights_verify(args: argparse.Namespace) -> int:
    from pipelines.profiles import PROFILES
    from weights.verify import verify

    report = verify(args.directory)
    for component, state in report.components.items():
        print(f"{component:14} {state}")
    for adapter, state in report.adapters.items():
        print(f"{'loras/' + adapter:14} {state}")
    for name, profile in PROFILES.items():
        if profile.adapter is None or report.adapters.get(profile.adapter) == "ok":
            can = "can run" + (f" (distilled adapter {profile.adapter!r})" if profile.adapter else "")
        else:
            can = f"can't run: {report.adapters[profile.adapter]} (or serve with --allow-undistilled)"
        print(f"profile {name:6} {can}")
    checker = Path(args.directory) / SAFETY_CHECKER_DIR
    if (checker / "config.json").is_file():
        print(f"safety checker {checker}")
    else:
        print(
            f"safety checker none at {checker}: enable_safety_checker requests answer 503 unless FLUX2_SAFETY_CHECKER"
        )
        print("               points at one or the checker is turned off (--disable-safety-checker)")
    for problem in report.problems:
        print(f"problem: {problem}")
    print("OK" if report.ok else f"NOT USABLE: {len(report.problems)} problem(s)")
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flux2-server", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve fal's FLUX.2 edit API")
    source = serve.add_mutually_exclusive_group()
    source.add_argument("--weights", type=Path, help="FLUX.2 [dev] directory in diffusers layout")
    source.add_argument("--tiny", action="store_true", default=None, help="serve the tiny random-weight model")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--data-dir", type=Path, help="where output files are written (default ./data)")
    serve.add_argument("--public-url", help="base URL of output files (default: the URL requests came in on)")
    serve.add_argument("--device", help="torch device, e.g. cuda:1 (default: CUDA when present, else CPU)")
    serve.add_argument("--dtype", help="torch dtype, e.g. bfloat16 (default: bf16 on CUDA, fp32 on CPU)")
    serve.add_argument("--ssl-certfile", type=Path, help="serve https with this certificate (see `tls`)")
    serve.add_argument("--ssl-keyfile", type=Path, help="the certificate's private key")
    serve.add_argument("--api-keys-file", type=Path, help="require one of these keys (one per line) on API routes")
    serve.add_argument("--log-level")
    serve.add_argument("--log-format", choices=["text", "json"], help="log lines as text (default) or JSON")
    serve.add_argument(
        "--queue",
        help="redis://HOST:PORT/DB: share this queue with other front-ends and `worker` processes; without "
        "--weights/--tiny, serve the API alone (default: the embedded SQLite queue, running the model here)",
    )
    serve.add_argument("--profiles", help="comma-separated profiles the local model serves (default: all)")
    serve.add_argument(
        "--allow-undistilled",
        action="store_true",
        default=None,
        help="run turbo/flash on the base weights when their distilled adapter is missing (else they answer 503)",
    )
    serve.add_argument(
        "--safety-checker", type=Path, help="NSFW image classifier directory (default WEIGHTS/safety_checker)"
    )
    serve.add_argument("--safety-threshold", type=float, help="flag an image when P(nsfw) >= this (default 0.5)")
    serve.add_argument(
        "--disable-safety-checker",
        action="store_true",
        default=None,
        help="turn the checker off: outputs unchecked, has_nsfw_concepts false, a notice says so",
    )
    serve.add_argument(
        "--no-supervise",
        action="store_true",
        help="run in this process; by default a supervisor process starts it again if it dies (FLUX2_SUPERVISE=0)",
    )
    serve.set_defaults(func=cmd_serve)

    worker = commands.add_parser("worker", help="run one GPU's model on requests from a shared queue")
    worker.add_argument("--queue", required=True, help="redis://HOST:PORT/DB, as given to the front-ends")
    source = worker.add_mutually_exclusive_group()
    source.add_argument("--weights", type=Path, help="FLUX.2 [dev] directory in diffusers layout")
    source.add_argument("--tiny", action="store_true", default=None, help="run the tiny random-weight model")
    worker.add_argument("--gpu", type=int, help="CUDA device index (same as --device cuda:N)")
    worker.add_argument("--device", help="torch device (default: CUDA when present, else CPU)")
    worker.add_argument("--dtype", help="torch dtype, e.g. bfloat16 (default: bf16 on CUDA, fp32 on CPU)")
    worker.add_argument("--profiles", help="comma-separated profiles to take requests for (default: all)")
    worker.add_argument("--data-dir", type=Path, help="where output files are written, as the front-ends serve it")
    worker.add_argument("--log-level")
    worker.add_argument("--log-format", choices=["text", "json"], help="log lines as text (default) or JSON")
    worker.add_argument(
        "--no-supervise",
        action="store_true",
        help="run in this process; by default a supervisor process starts it again if it dies (FLUX2_SUPERVISE=0)",
    )
    worker.set_defaults(func=cmd_worker)

    tls = commands.add_parser("tls", help="make a local CA and a server certificate for HOST(s) and queue.HOST")
    tls.add_argument("hosts", nargs="+", metavar="HOST", help="names or IP addresses clients will use")
    tls.add_argument("--out", type=Path, default=Path("tls"), help="directory for ca.pem, server.pem, server-key.pem")
    tls.set_defaults(func=cmd_tls)

    weights = commands.add_parser("weights", help="weights on disk").add_subparsers(
        dest="weights_command", required=True
    )
    tiny = weights.add_parser("tiny", help="build the tiny random-weight FLUX.2 into DIR")
    tiny.add_argument("directory", type=Path)
    tiny.set_defaults(func=cmd_weights_tiny)
    weights_commands.add_parsers(weights)
    edit_command.add_parser(commands)
    doctor_command.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    from server import supervisor

    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)  # usage errors and --help here, before any child starts
    if supervisor.wanted(argv):
        return supervisor.supervise(argv)  # `serve` and `worker` run in a child that is started again if it dies
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
