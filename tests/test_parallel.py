"""Context parallel (pipelines.parallel) on the CPU: diffusers' Ulysses split of the tiny FLUX.2 across two gloo
rank processes, coordinated as the server runs it (inputs, progress, cancel, a rank dying, restart)."""

import os
import signal

import numpy as np
import PIL.Image
import pytest

from pipelines import Cancelled, EditCall, load_editor
from pipelines.parallel import (
    GroupSpec,
    ProcessGroupEditor,
    RankFailed,
    context_parallel_problem,
    generation_size,
)

STEPS = 4  # the fewest the base profile takes


def reference(size: int = 64, seed: int = 0) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def call(**overrides) -> EditCall:
    fields = {"images": [reference()], "prompt": "a red door", "width": 64, "height": 64, "seed": 7}
    return EditCall(**{"num_inference_steps": STEPS, **fields, **overrides})


multiprocess = pytest.mark.multiprocess  # a two-rank group: ~12 s to start, ~3 s a call on 2 busy cores


@pytest.fixture(scope="module")
def group(tiny_weights):
    editor = ProcessGroupEditor(GroupSpec(str(tiny_weights), ["cpu", "cpu"]), straggler_timeout_s=20)
    yield editor
    editor.stop()


def test_generation_size_splits_the_image_tokens_evenly():
    assert generation_size(64, 64, 16, 2, 16) == (64, 64)  # 16 + 16 tokens: already even
    assert generation_size(1024, 1024, 16, 4, 4096) == (1024, 1024)
    assert generation_size(60, 64, 16, 1, 0) == (64, 64)  # the next multiple, as the editor generates anyway
    width, height = generation_size(80, 48, 16, 2, 16)  # 5 x 3 + 16 = 31 tokens: one more column or row
    assert (width, height) in ((96, 48), (80, 64))
    for degree in (2, 4, 8):
        for references in range(degree):
            w, h = generation_size(528, 528, 16, degree, references)
            assert ((w // 16) * (h // 16) + references) % degree == 0
            assert 528 <= w < 528 + 16 * degree and 528 <= h < 528 + 16 * degree


def test_ulysses_needs_heads_and_prompt_tokens_to_divide():
    assert context_parallel_problem("ulysses", 2, 2) is None
    assert "don't divide 2" in context_parallel_problem("ulysses", 4, 2)
    assert "512 tokens" in context_parallel_problem("ulysses", 3, 48)
    assert "return_lse" in context_parallel_problem("ring", 2, 48)


@multiprocess
def test_two_ranks_give_the_single_process_image_with_progress(group, tiny_weights):
    steps = []
    result = group.edit(call(on_step=lambda step, total: steps.append((step, total))))
    assert steps == [(step, STEPS) for step in range(1, STEPS + 1)]  # rank 0's progress, every step, in order
    single = load_editor(tiny_weights).edit(call())
    split, whole = (np.asarray(image, dtype=np.int16) for image in (result.images[0], single.images[0]))
    assert split.shape == whole.shape == (64, 64, 3)
    assert np.abs(split - whole).max() <= 1
    assert group.capabilities().device == "cpu,cpu"
    assert group.describe() == {"mode": "context", "kind": "ulysses", "devices": ["cpu", "cpu"], "ready": True,
                                "restarts": group.restarts}  # fmt: skip


@multiprocess
def test_cancel_stops_every_rank_at_the_same_step(group):
    steps = []
    with pytest.raises(Cancelled, match="after step"):
        group.edit(
            call(num_inference_steps=12, on_step=lambda s, n: steps.append(s), should_cancel=lambda: bool(steps))
        )
    assert 1 <= len(steps) < 12
    restarts = group.restarts
    assert group.edit(call()).images[0].size == (64, 64)  # both ranks left the loop together: the next call runs
    assert group.restarts == restarts


class TimeLimit(Exception):
    pass


@multiprocess
def test_an_exception_from_should_cancel_stops_every_rank_then_is_raised(group):
    steps = []

    def over_time() -> bool:
        if steps:
            raise TimeLimit("the job exceeded its time limit")  # as the server's runner stops a job running too long
        return False

    restarts = group.restarts
    with pytest.raises(TimeLimit):
        group.edit(call(num_inference_steps=12, on_step=lambda s, n: steps.append(s), should_cancel=over_time))
    assert len(steps) < 12
    assert group.edit(call()).images[0].size == (64, 64)
    assert group.restarts == restarts


@multiprocess
def test_an_error_every_rank_raises_fails_only_that_request(group):
    restarts = group.restarts
    with pytest.raises(ValueError, match="at most 4 reference images"):
        group.edit(call(images=[reference()] * 5))
    assert group.restarts == restarts  # no restart: the ranks raised it together and are in step


@multiprocess
def test_a_size_whose_tokens_do_not_split_is_generated_larger_and_cropped(group):
    result = group.edit(call(width=80, height=48))  # 5 x 3 output tokens + 16 reference tokens: odd
    assert result.images[0].size == (80, 48)
    assert any("centre-cropped to 80x48" in notice for notice in result.notices)


@multiprocess
def test_a_rank_killed_mid_request_fails_it_and_the_group_restarts(group):
    restarts = group.restarts

    def kill_rank_one(step, total):
        if step == 1:
            os.kill(group.pids[1], signal.SIGKILL)

    with pytest.raises(RankFailed, match=r"rank 1 \(cpu\) died"):
        group.edit(call(on_step=kill_rank_one))
    assert group.restarts == restarts + 1
    assert group.edit(call()).images[0].size == (64, 64)


@multiprocess
def test_a_rank_that_died_while_idle_is_restarted_before_the_next_request(group):
    group.wait_ready()
    restarts = group.restarts
    process = group._processes[0]
    os.kill(process.pid, signal.SIGKILL)
    process.join(timeout=30)
    assert group.edit(call()).images[0].size == (64, 64)  # not failed: restarted first
    assert group.restarts == restarts + 1
