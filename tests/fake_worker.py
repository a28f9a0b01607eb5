"""`flux2-server worker` as a real process with tests/fake_editor.py for its model (no weights read, steps that
sleep as long as asked): for scale-out fault tests, where the queue, Redis, the storage and the processes are real
and only the model is not.

    python -m tests.fake_worker [--step-s S] [--fail MESSAGE] -- worker --queue redis://... --weights DIR ...

`--fail` makes the model fail every job (an InferenceError, as a broken GPU would). Run unsupervised
(FLUX2_SUPERVISE=0): the pid is the worker's own, for signals.
"""

from __future__ import annotations

import argparse
import sys

from server.cli import main, worker
from server.service import model
from tests.fake_editor import FakeEditor


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fake_worker")
    parser.add_argument("--step-s", type=float, default=0.0, help="seconds each denoising step sleeps")
    parser.add_argument("--fail", default=None, help="fail every job with this message")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then flux2-server's arguments")
    args = parser.parse_args(argv)
    editor = FakeEditor(step_s=args.step_s, fail_with=RuntimeError(args.fail) if args.fail else None)
    model.load_model = lambda *_: editor  # type: ignore[assignment]  # what Model.load calls
    worker.runtime_problem = lambda *_: None  # type: ignore[assignment]  # no weights to fit in memory
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    return main(command)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
