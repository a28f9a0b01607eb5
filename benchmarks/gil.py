"""Whether a native call holds Python's GIL: how fast a pure-Python loop runs beside it (benchmarks/decoders.py,
benchmarks/encoders.py). A call that holds the GIL stops the server's other threads while it runs: the event loop
(every other HTTP request) and the model's thread (a GPU model launches its kernels from Python)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


def python_speed_kept(call: Callable[[], object], seconds: float = 0.3) -> float:
    """How fast a pure-Python loop runs while another thread makes calls for `seconds`, relative to the same loop
    alone: ~1 when the calls release the GIL (and a core is free), near 0 when they hold it."""

    def calls() -> None:
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            call()
        calls_done.set()

    def loops_per_second(until: threading.Event, start: Callable[[], None]) -> float:
        count, started = 0, time.perf_counter()
        start()
        while not until.is_set():
            count += 1
        return count / (time.perf_counter() - started)

    alone_done, calls_done = threading.Event(), threading.Event()
    alone = loops_per_second(alone_done, threading.Timer(seconds, alone_done.set).start)
    worker = threading.Thread(target=calls)
    beside_calls = loops_per_second(calls_done, worker.start)
    worker.join()
    return beside_calls / alone
