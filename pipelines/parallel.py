"""Context parallel: one edit split across N processes (one per GPU) with diffusers' own context parallelism.

Each rank is a process holding a whole `Flux2Editor` (`pipelines.load_editor`) on its own device; diffusers'
`ModelMixin.enable_parallelism(config=ContextParallelConfig(ulysses_degree=N))` applies the transformer's
`_cp_plan`: the image and text tokens are split along the sequence across the ranks, and attention exchanges heads
for tokens with an all-to-all (Ulysses). Every rank runs the same `Flux2Pipeline` call on the same inputs and seed,
so the latents agree on every rank and each step's transformer work is divided by N.

`ProcessGroupEditor` is the coordinator: it starts the N rank processes (torch.multiprocessing spawn; gloo on
the CPU, NCCL for CUDA tensors with gloo beside it for CPU ones), sends each rank the same inputs, forwards rank 0's
per-step progress and messages, and returns rank 0's images. It has the calls of `Flux2Editor` the server uses
(`edit`, `capabilities`, `size_multiple`, `reference_problem`), so it stands in for one. A group of one rank is a
replica: the model alone in its own process on its own device, so a crash (a CUDA fault, the OOM killer) takes that
process only, and the group restarts (see `pipelines.gpu_groups` for how GPUs are grouped).

- Inputs go to every rank over its own pipe rather than through a collective from rank 0: a collective waiting
  for the next request would hit the process group's timeout on an idle server.
- Cancel: a flag shared by the coordinator and the ranks; after every step the ranks all-reduce it (max), so all of
  them see the same answer at the same step and leave the loop together (a rank that left alone would leave the
  others waiting in the next all-to-all).
- Failure: a rank that dies, or that finishes (fails, is cancelled) while another is still running after
  `straggler_timeout_s` (that one is then stuck in a collective), fails the request with `RankFailed`; the whole
  group is stopped and started again (the next call waits for it). An error every rank reports (a bad input: the
  ranks raise it together) fails just that request. A rank found dead between requests is restarted first.
- Sizes: Ulysses splits the image tokens (the output's and the references') evenly across the ranks; a size whose
  tokens don't split is generated a few 16-pixel rows or columns larger and centre-cropped (`generation_size`).

Ring attention (`ring_degree`) is refused: it needs the attention kernel to return its log-sum-exp, which diffusers'
native SDPA backend (the server's default) does not ("Native attention does not support return_lse=True", measured
on the tiny FLUX.2 on two CPU ranks); the kernels that return it need bf16/fp16 on CUDA and have not run here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
import traceback
from contextlib import contextmanager
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import torch

from pipelines.editor import Cancelled, EditCall, EditResult, center_crop, say

log = logging.getLogger(__name__)

KINDS = ("ulysses", "ring")
RING_REFUSED = (
    "ring attention is not supported: diffusers' ring attention needs the attention kernel's log-sum-exp, which "
    "the native SDPA backend does not return ('Native attention does not support return_lse=True', measured on two "
    "CPU ranks); the kernels that do (cuDNN, flash) have not been run here. Use ulysses"
)


class RankFailed(RuntimeError):
    """A rank of a model process group died or failed alone; the request failed and the group restarts."""


TEXT_TOKENS = 512  # Flux2Pipeline pads every prompt to max_sequence_length=512 tokens, split like the image's


def context_parallel_problem(kind: str, degree: int, attention_heads: int) -> str | None:
    """Why a context-parallel group of `degree` ranks can't run this transformer, or None."""
    if kind not in KINDS:
        return f"unknown context-parallel kind {kind!r} (one of {', '.join(KINDS)})"
    if kind == "ring":
        return RING_REFUSED
    if degree < 2:
        return f"a context-parallel group needs at least 2 devices, got {degree}"
    if attention_heads % degree:
        return (
            f"Ulysses gives each device an equal share of the transformer's {attention_heads} attention heads: "
            f"{degree} devices don't divide {attention_heads}"
        )
    if TEXT_TOKENS % degree:
        return f"Ulysses splits the prompt's {TEXT_TOKENS} tokens evenly: {degree} devices don't divide {TEXT_TOKENS}"
    return None


def reference_tokens(images, multiple: int, image_processor) -> int:
    """How many tokens Flux2Pipeline makes of these reference images: each is brought within 1024x1024 pixels of
    area, floored to `multiple` (VAE 8x, then 2x2 patches) a side, one token per `multiple`-pixel square."""
    tokens = 0
    for image in images:
        if image.width * image.height > 1024 * 1024:
            image = image_processor._resize_to_target_area(image, 1024 * 1024)
        tokens += (image.width // multiple) * (image.height // multiple)
    return tokens


def generation_size(width: int, height: int, multiple: int, degree: int, references: int) -> tuple[int, int]:
    """The size to generate at so that the image tokens (the output's and the references') split evenly over
    `degree` ranks (diffusers' Ulysses split needs that; its uneven variant fails on gloo). The output is generated
    at the next multiple of `multiple` anyway; where that doesn't split, add the fewest `multiple`-pixel rows and
    columns that make it split (the caller centre-crops back, as for any size)."""
    columns, rows = -(-width // multiple), -(-height // multiple)
    options = (
        (extra_c + extra_r, columns + extra_c, rows + extra_r)
        for extra_c in range(degree)
        for extra_r in range(degree)
        if ((columns + extra_c) * (rows + extra_r) + references) % degree == 0
    )
    _, columns, rows = min(options)
    return columns * multiple, rows * multiple


@contextmanager
def _cpu_counts_as_one_device():
    """diffusers places rank r on `torch.device(accelerator, r % torch.accelerator.device_count())`; on a machine
    without an accelerator the count is 0 (a division by zero) while the device is the CPU. Count it as one."""
    if torch.accelerator.is_available():
        yield
        return
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = original


def enable_context_parallel(transformer, kind: str, degree: int) -> None:
    """Apply diffusers' context parallelism to a loaded `Flux2Transformer2DModel` (the process group must be up)."""
    from diffusers import ContextParallelConfig

    problem = context_parallel_problem(kind, degree, transformer.config.num_attention_heads)
    if problem:
        raise ValueError(problem)
    with _cpu_counts_as_one_device():
        transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree))


@dataclasses.dataclass
class GroupSpec:
    """What every rank of a group loads: the weights, one device per rank ("cuda:3", or "cpu"), `load_editor`'s
    other arguments (dtype, options, safety checker, ...) and the kind of context parallelism."""

    weights_dir: str
    devices: list[str]
    load: dict = dataclasses.field(default_factory=dict)
    kind: str = "ulysses"
    cpu_threads: int | None = None  # torch threads of a CPU rank (default: the cores shared among the CPU ranks)


def _on_device(capabilities, device: str):
    """An editor's capabilities (a dict, or a dataclass with a `device` field) naming the group's devices."""
    if isinstance(capabilities, dict):
        return {**capabilities, "device": device}
    return dataclasses.replace(capabilities, device=device)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_device(device: str) -> str:
    """The device name a rank loads onto. A CUDA rank sees only its own GPU (CUDA_VISIBLE_DEVICES, set before CUDA
    starts), so diffusers' `rank % device_count()` is 0 and lands on it, whichever GPUs the group has."""
    if device.startswith("cuda"):
        index = device.partition(":")[2] or "0"
        os.environ["CUDA_VISIBLE_DEVICES"] = index
        torch.cuda.set_device(0)
        return "cuda:0"
    return device


def _send_error(conn, exc: BaseException) -> None:
    try:
        conn.send(("error", exc, traceback.format_exc()))
    except Exception:  # noqa: BLE001 (an exception that doesn't pickle travels as its text)
        conn.send(("error", RuntimeError(f"{type(exc).__name__}: {exc}"), traceback.format_exc()))


def _rank_main(rank: int, world: int, init_method: str, spec: GroupSpec, conn, cancel_flag) -> None:
    """One rank: join the group, load the editor, then run every call the coordinator sends until told to stop."""
    import torch.distributed as dist

    from pipelines.editor import load_editor

    try:
        device = _rank_device(spec.devices[rank])
        if device == "cpu":  # ranks sharing the CPU share its cores, rather than each starting a thread per core
            torch.set_num_threads(spec.cpu_threads or max(1, (os.cpu_count() or 1) // spec.devices.count("cpu")))
        if world > 1:
            backend = "cpu:gloo,cuda:nccl" if device.startswith("cuda") else "gloo"
            dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world)
        editor = load_editor(spec.weights_dir, device=device, **spec.load)
        if world > 1:
            enable_context_parallel(editor.pipe.transformer, spec.kind, world)
    except BaseException as exc:  # noqa: BLE001 (whatever stops a rank's start goes to the coordinator)
        _send_error(conn, exc)
        return

    def agreed_cancel() -> bool:
        if world == 1:
            return bool(cancel_flag.value)
        flag = torch.tensor([int(cancel_flag.value)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    conn.send(("ready", editor.capabilities(), editor.size_multiple, editor.pipe.image_processor))
    while True:
        try:
            call = conn.recv()
        except EOFError:
            break
        if call is None:
            break
        call.should_cancel = agreed_cancel
        if rank == 0:
            call.on_step = lambda step, steps: conn.send(("step", step, steps))
            call.on_message = lambda message: conn.send(("message", message))
        else:
            call.check_safety = False  # after the collectives: rank 0's images are the ones returned
        try:
            result = editor.edit(call)
            conn.send(("result", result if rank == 0 else None))
        except Cancelled as exc:
            conn.send(("cancelled", str(exc)))
        except Exception as exc:  # noqa: BLE001 (the coordinator decides: the request's error or a restart)
            _send_error(conn, exc)
    if world > 1:
        dist.destroy_process_group()


class ProcessGroupEditor:
    """Runs each edit in a group of rank processes: one (a replica) or several (context parallel; see the module
    docstring). One call at a time."""

    def __init__(self, spec: GroupSpec, straggler_timeout_s: float = 30.0, start_timeout_s: float = 1800.0):
        if not spec.devices:
            raise ValueError("a group needs at least one device")
        self.spec = spec
        self.world = len(spec.devices)
        self.straggler_timeout_s = straggler_timeout_s  # how long ranks may lag one that failed before a restart
        self.start_timeout_s = start_timeout_s
        self.restarts = 0
        self._lock = threading.Lock()
        self._context = torch.multiprocessing.get_context("spawn")
        self._cancel = self._context.Value("b", 0)
        self._processes: list = []
        self._conns: list = []
        self._ready = None  # rank 0's capabilities once every rank of the current start is loaded
        self._capabilities = None  # the same, kept across restarts
        self._image_processor: Any = None  # rank 0's pipeline's, for `reference_problem`
        self.size_multiple = 0  # rank 0's editor's, once loaded
        self.load_seconds = 0.0
        self.weights_dir = Path(spec.weights_dir)
        self.start()

    # ---- the group's lifetime

    def start(self) -> None:
        """Spawn the ranks (they load in the background; the next call waits for them)."""
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        self._started = time.perf_counter()
        self._processes, self._conns, self._ready = [], [], None
        for rank in range(self.world):
            ours, theirs = self._context.Pipe()
            process = self._context.Process(
                target=_rank_main,
                args=(rank, self.world, init_method, self.spec, theirs, self._cancel),
                name=f"flux2-cp-rank{rank}",
                daemon=True,
            )
            process.start()
            theirs.close()
            self._processes.append(process)
            self._conns.append(ours)

    def stop(self) -> None:
        for conn in self._conns:
            try:
                conn.send(None)
            except (OSError, ValueError):
                pass
        for process in self._processes:
            process.join(timeout=5)
        self._kill()

    close = stop

    def _kill(self) -> None:
        for process in self._processes:
            if process.is_alive():
                process.kill()
        for process in self._processes:
            process.join(timeout=30)
        for conn in self._conns:
            conn.close()
        self._processes, self._conns = [], []

    def restart(self) -> None:
        self._kill()
        self.restarts += 1
        log.warning("restarting the model process group on %s (restart %d)", self.spec.devices, self.restarts)
        self.start()

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self._processes]

    def wait_ready(self):
        """Wait until every rank has loaded; raises RankFailed (and restarts the group) if one could not."""
        if self._ready is not None:
            return self._ready
        if not self._processes:
            self.start()
        answers: dict[int, tuple] = {}
        deadline = time.monotonic() + self.start_timeout_s
        while len(answers) < self.world:
            message, rank = self._next_message(answers, deadline - time.monotonic())
            if message is None:
                self._fail(f"rank {rank} ({self.spec.devices[rank]}) did not start")
            if message[0] == "error":
                self._fail(f"rank {rank} ({self.spec.devices[rank]}) failed to load: {message[1]!r}", message[1])
            answers[rank] = message
        _, capabilities, self.size_multiple, self._image_processor = answers[0]
        self.load_seconds = time.perf_counter() - self._started
        self._capabilities = _on_device(capabilities, self.device)
        self._ready = self._capabilities
        return self._capabilities

    def _next_message(self, finished: dict, timeout: float):
        """(message, rank) from the first rank that has one; (None, rank) when a rank died or time ran out."""
        pending = {conn: rank for rank, conn in enumerate(self._conns) if rank not in finished}
        sentinels = {self._processes[rank].sentinel: rank for rank in pending.values()}
        ready = wait([*pending, *sentinels], timeout=max(timeout, 0))
        if not ready:
            return None, min(pending.values())
        for conn, rank in pending.items():  # messages first: a rank that answered and exited has its answer read
            if conn in ready:
                try:
                    return conn.recv(), rank
                except EOFError:
                    return None, rank
        return None, sentinels[ready[0]]

    def _fail(self, why: str, cause: BaseException | None = None):
        self.restart()
        raise RankFailed(f"model process group: {why}; the request failed and the group is restarting") from cause

    # ---- what the server calls

    def capabilities(self):
        """Rank 0's editor's capabilities, with the group's devices. Known from the first start on (they don't
        change with a restart), so asking never waits for a group that is restarting."""
        if self._capabilities is None:
            return self.wait_ready()
        return self._capabilities

    def describe(self) -> dict:
        """For /health: how this group runs, its devices, whether it is ready, and how often it was restarted."""
        mode = {"mode": "context", "kind": self.spec.kind} if self.world > 1 else {"mode": "replica"}
        return {**mode, "devices": list(self.spec.devices), "ready": self._ready is not None, "restarts": self.restarts}

    @property
    def device(self) -> str:
        return ",".join(self.spec.devices)

    def reference_problem(self, image) -> str | None:
        if self._image_processor is None:
            self.wait_ready()
        try:
            self._image_processor.check_image_input(image)
        except ValueError as exc:
            return f"Reference image refused: {exc}"
        return None

    def edit(self, call: EditCall) -> EditResult:
        with self._lock:
            dead = [rank for rank, process in enumerate(self._processes) if not process.is_alive()]
            if dead:  # died while idle (the OOM killer, an operator): start again before taking this request
                log.warning("rank %d of the group on %s died while idle", dead[0], self.spec.devices)
                self.restart()
            self.wait_ready()
            self._cancel.value = 0
            references = reference_tokens(call.images, self.size_multiple, self._image_processor)
            width, height = generation_size(call.width, call.height, self.size_multiple, self.world, references)
            wire = dataclasses.replace(
                call, width=width, height=height, on_step=None, should_cancel=None, on_message=None
            )
            for rank, conn in enumerate(self._conns):
                try:
                    conn.send(wire)
                except OSError as exc:  # it died just now
                    self._fail(f"rank {rank} ({self.spec.devices[rank]}) could not be reached: {exc}", exc)
            outcomes: dict[int, tuple] = {}
            first_done: float | None = None  # when the first rank finished: the others must follow soon
            stopped_by: Exception | None = None  # what `should_cancel` raised, raised once every rank has stopped
            while len(outcomes) < self.world:
                if call.should_cancel is not None and not self._cancel.value:
                    try:
                        if call.should_cancel():
                            self._cancel.value = 1
                    except Exception as exc:  # noqa: BLE001 (e.g. a time limit: stop the ranks, then raise it)
                        self._cancel.value, stopped_by = 1, exc
                waited = 0.05 if first_done is None else first_done + self.straggler_timeout_s - time.monotonic()
                message, rank = self._next_message(outcomes, waited)
                if message is None:
                    if rank is not None and not self._processes[rank].is_alive():
                        code = self._processes[rank].exitcode
                        self._fail(f"rank {rank} ({self.spec.devices[rank]}) died (exit code {code})")
                    if first_done is not None and time.monotonic() >= first_done + self.straggler_timeout_s:
                        done = min(outcomes)
                        what, detail = outcomes[done][0], outcomes[done][1]
                        self._fail(
                            f"rank {done} ({self.spec.devices[done]}) ended ({what}: {detail!r}) while rank {rank} "
                            f"was still running {self.straggler_timeout_s:.0f} s later",
                            detail if isinstance(detail, BaseException) else None,
                        )
                    continue
                kind = message[0]
                if kind == "step":
                    if call.on_step is not None:
                        call.on_step(message[1], message[2])
                elif kind == "message":
                    say(call, message[1])
                else:
                    outcomes[rank] = message
                    first_done = first_done or time.monotonic()
            # every rank finished: the group is in step again, whatever the outcome
            if stopped_by is not None:
                raise stopped_by
            errors = [outcomes[r][1] for r in sorted(outcomes) if outcomes[r][0] == "error"]
            if errors:
                raise errors[0]
            if any(outcome[0] == "cancelled" for outcome in outcomes.values()):
                raise Cancelled(next(o[1] for o in outcomes.values() if o[0] == "cancelled"))
            result = outcomes[0][1]
            if (width, height) != generation_size(call.width, call.height, self.size_multiple, 1, 0):
                result.images = [center_crop(image, call.width, call.height) for image in result.images]
                result.notices.append(
                    f"Generated at {width}x{height} and centre-cropped to {call.width}x{call.height}: the "
                    f"image's tokens are split evenly across the {self.world} GPUs of a context-parallel group."
                )
            return result
