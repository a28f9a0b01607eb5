"""Keep `serve` and `worker` running: the command runs itself in a child process and starts it again if it dies.

A crash that takes the whole process down (a segfault in a CUDA library, the kernel's OOM killer, a sticky CUDA
error after which the process exits) would otherwise leave the port dead until someone restarts it. The
supervisor notices the child's death, starts a new one, and the queue does the rest: the request that was running
is re-queued once by the new process (its start is counted in the queue; a request that kills the process on
every start is failed after two, see server/queue/dispatcher.py).

The supervisor itself imports no model code and does nothing else: it forwards SIGTERM/SIGINT to the child (a
graceful stop re-queues the running request), exits with the child's status when the child stops on purpose
(status 0, or 2 for a configuration error), and otherwise never gives up: after each death it waits longer before
the next start (RESTART_DELAY_S, doubling with each death in RESTART_WINDOW_S, at most MAX_RESTART_DELAY_S), so a
crash loop costs little while a passing fault (a memory blow-up) is not a permanent outage. The child learns how
often it was restarted (RESTARTS_ENV), and `/health` says so. The child asks the kernel to kill it if the
supervisor dies (PR_SET_PDEATHSIG), so no orphan keeps the GPU. `--no-supervise` (or FLUX2_SUPERVISE=0: the `supervise` setting) runs the
command in this process, for a process manager (systemd, Kubernetes, compose `restart:`) that restarts it itself.

Standard library only (subprocess, signal): this is the job of a process manager, and the small part of one
needed here is clearer written out than configured (supervisord or circus would be a second daemon to run).
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import logging.config
import os
import signal
import subprocess
import sys
import time

import pydantic

from server.cli.startup import settings_of
from server.config import RESTARTS_ENV, Settings

log = logging.getLogger("flux2.supervisor")

CHILD_ENV = "FLUX2_SUPERVISED_CHILD"  # set in the child, so it runs the command instead of supervising again
RESTART_WINDOW_S = 300.0  # deaths within this window make the next start wait longer
RESTART_DELAY_S = 1.0
MAX_RESTART_DELAY_S = 300.0
STOPPED_ON_PURPOSE = (0, 2)  # success, or a usage/configuration error: starting again would not help
PR_SET_PDEATHSIG = 1


def wanted(args: argparse.Namespace) -> Settings | None:
    """The settings of an invocation that should supervise (`serve` or `worker`, not already the child, the
    `supervise` setting on), else None. Settings that don't validate are the child's to refuse, in its own words."""
    if os.environ.get(CHILD_ENV) == "1" or args.command not in ("serve", "worker"):
        return None
    try:
        settings = settings_of(args)
    except pydantic.ValidationError:
        return None  # run in this process, which says what is wrong
    return settings if settings.supervise else None


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: the kernel sends SIGKILL when the supervisor dies."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: the child may outlive a killed supervisor


def restart_delay(recent_deaths: int) -> float:
    """Seconds to wait before the next start, after this many deaths within RESTART_WINDOW_S."""
    return min(RESTART_DELAY_S * 2 ** max(recent_deaths - 1, 0), MAX_RESTART_DELAY_S)


def describe(status: int) -> str:
    return f"signal {signal.Signals(-status).name}" if status < 0 else f"exit status {status}"


def supervise(argv: list[str], log_format: str) -> int:
    from server.logs import LOG_FORMATS, logging_config

    logging.config.dictConfig(logging_config(log_format if log_format in LOG_FORMATS else "text", "info"))
    command = [sys.executable, "-m", "server.cli", *argv]
    env = {**os.environ, CHILD_ENV: "1"}
    stopping: list[int] = []
    child: subprocess.Popen | None = None

    def forward(signum, _frame):
        stopping.append(signum)
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    deaths: list[float] = []
    restarts = 0
    while True:
        # its own process group: a terminal's Ctrl-C reaches the supervisor, which forwards it once
        env[RESTARTS_ENV] = str(restarts)
        child = subprocess.Popen(command, env=env, preexec_fn=_die_with_parent, process_group=0)  # noqa: PLW1509 -- the supervisor starts no threads
        log.info("server process %d started (supervised; --no-supervise to run without)", child.pid)
        while True:
            try:
                status = child.wait()
                break
            except InterruptedError:
                continue
        if stopping or status in STOPPED_ON_PURPOSE:
            return exit_as(status)
        now = time.monotonic()
        deaths = [t for t in deaths if now - t < RESTART_WINDOW_S] + [now]
        delay = restart_delay(len(deaths))
        log.error(
            "server process %d died (%s), %d time(s) in %.0f s: starting it again in %.0f s",
            child.pid,
            describe(status),
            len(deaths),
            RESTART_WINDOW_S,
            delay,
        )
        waited = 0.0
        while waited < delay and not stopping:  # a stop signal ends the wait
            time.sleep(min(0.2, delay - waited))
            waited += 0.2
        if stopping:
            return exit_as(-stopping[0])
        restarts += 1


def exit_as(status: int) -> int:
    """End as the child ended, so whoever started the supervisor sees the same status: a signal (uvicorn re-raises
    SIGTERM/SIGINT after its graceful shutdown) is raised here too, with its default action."""
    if status < 0:
        signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
    return status
