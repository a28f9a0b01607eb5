"""The model runner: one thread owns the model and runs edits one at a time, in arrival order.

The event loop only awaits the result, so HTTP stays responsive while the GPU works; requests beyond the
one running wait in the executor's FIFO queue.

Faults stay with the request that caused them: a CUDA out-of-memory error fails that request (`OutOfMemory`)
after the memory it held is released, so the next request runs; a job running past `job_timeout_s` (counted from
when the model starts on it, not from when it was queued) is stopped at its next denoising step (`JobTimedOut`).
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import gc
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from pipelines import EditCall, EditResult, Flux2Editor
from server.errors import JobTimedOut, OutOfMemory


def release_device_memory() -> None:
    """Free what a failed job left: Python references first, then the CUDA caching allocator's cached blocks
    (torch.cuda.empty_cache does nothing where CUDA was never initialised, e.g. on the CPU)."""
    gc.collect()
    torch.cuda.empty_cache()


class ModelRunner:
    def __init__(self, editor: Flux2Editor, job_timeout_s: float | None = None):
        self.editor = editor
        self.job_timeout_s = job_timeout_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flux2-inference")
        self.waiting = 0  # submitted, not finished (the running one included)

    async def run(self, call: EditCall) -> EditResult:
        self.waiting += 1
        try:
            # the call's context (its request id, for log lines) goes with it into the inference thread
            context = contextvars.copy_context()
            return await asyncio.wrap_future(self._executor.submit(context.run, self._execute, call))
        finally:
            self.waiting -= 1

    def _execute(self, call: EditCall) -> EditResult:
        """Runs on the inference thread."""
        deadline = time.monotonic() + self.job_timeout_s if self.job_timeout_s else None
        done_steps = [0, 0]  # (step, total) last reported

        def on_step(step: int, total: int) -> None:
            done_steps[:] = [step, total]
            if call.on_step is not None:
                call.on_step(step, total)

        def should_cancel() -> bool:
            if deadline is not None and time.monotonic() > deadline:
                step, total = done_steps
                raise JobTimedOut(
                    f"the job exceeded its time limit of {self.job_timeout_s:g} s and was stopped after step "
                    f"{step}/{total}"
                )
            return call.should_cancel is not None and call.should_cancel()

        out_of_memory = None
        try:
            return self.editor.edit(dataclasses.replace(call, on_step=on_step, should_cancel=should_cancel))
        except torch.cuda.OutOfMemoryError as exc:
            out_of_memory = str(exc).splitlines()[0] if str(exc) else "CUDA out of memory"
        # Outside the except block the error and its traceback, which hold the failed job's tensors, are gone.
        release_device_memory()
        raise OutOfMemory(
            f"{out_of_memory}. The memory this request held was released; a smaller image_size, fewer num_images "
            "or fewer image_urls need less."
        )

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
