"""The inference worker: one thread owns the model and runs edits one at a time, in arrival order.

The event loop only awaits the result, so HTTP stays responsive while the GPU works; requests beyond the
one running wait in the executor's FIFO queue.
"""

from __future__ import annotations

import asyncio
import contextvars
from concurrent.futures import ThreadPoolExecutor

from pipelines import EditCall, EditResult, Flux2Editor


class InferenceWorker:
    def __init__(self, editor: Flux2Editor):
        self.editor = editor
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flux2-inference")
        self.waiting = 0  # submitted, not finished (the running one included)

    async def run(self, call: EditCall) -> EditResult:
        self.waiting += 1
        try:
            # the call's context (its request id, for log lines) goes with it into the inference thread
            context = contextvars.copy_context()
            return await asyncio.wrap_future(self._executor.submit(context.run, self.editor.edit, call))
        finally:
            self.waiting -= 1

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
