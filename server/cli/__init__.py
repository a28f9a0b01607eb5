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
from server.cli.flags import add_setting_flags, add_source_flags, serve_settings, worker_settings
from server.cli.serve import cmd_serve
from server.cli.tiny import ensure_tiny  # noqa: F401 (benchmarks and tests build the tiny model through it)
from server.cli.tls import cmd_tls
from server.cli.weights import cmd_weights_tiny
from server.cli.worker import cmd_worker


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flux2-server", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    # Their flags come from server.config.Settings (server/cli/flags.py): one per setting, its description the help.
    serve = commands.add_parser("serve", help="serve fal's FLUX.2 edit API")
    add_source_flags(serve)
    add_setting_flags(serve, serve_settings())
    serve.set_defaults(func=cmd_serve)

    worker = commands.add_parser("worker", help="run one GPU's model on requests from a shared queue (--queue)")
    add_source_flags(worker)
    worker.add_argument("--gpu", type=int, help="CUDA device index (same as --device cuda:N)")
    add_setting_flags(worker, worker_settings())
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
    settings = supervisor.wanted(args)
    if settings is not None:  # `serve` and `worker` run in a child that is started again if it dies
        return supervisor.supervise(argv, settings.log_format)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request is noise on a command line
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
