"""`flux2-server`: serve the API, run a queue worker, edit once, import/verify/build weights, check the machine
(doctor), make TLS files.

argparse (standard library) is enough for a handful of subcommands; each lives in its own module here.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from server.cli import doctor as doctor_command
from server.cli import edit as edit_command
from server.cli import weights as weights_commands
from server.cli.serve import cmd_serve
from server.cli.tiny import ensure_tiny  # noqa: F401 (benchmarks and tests build the tiny model through it)
from server.cli.tls import cmd_tls
from server.cli.weights import cmd_weights_tiny
from server.cli.worker import cmd_worker


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
    from server.cli import supervisor

    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)  # usage errors and --help here, before any child starts
    if supervisor.wanted(argv):
        return supervisor.supervise(argv)  # `serve` and `worker` run in a child that is started again if it dies
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
