"""The streamed memory modes' CUDA path (diffusers group offloading with `use_stream=True`), run on the CPU.

Streams and pinned memory are emulated (tests/emulated_streams.py); everything else is diffusers' own code: pinned
copies, side-stream prefetching traced on the first call, offloading back to the pinned copies. Bit-identical
outputs show the placement changes nothing but where weights live; the stream log shows the stream path ran.
"""

from __future__ import annotations

import itertools

import numpy as np
import PIL.Image
import pytest
import torch

from pipelines import memory
from pipelines.editor import EditCall, load_components, load_editor
from pipelines.memory import MemoryPlan, apply_memory_plan
from pipelines.runtime import RuntimeOptions
from tests.emulated_streams import emulate_streams
from tests.test_memory import run_pipe

PROMPTS = ["a red fox in the snow", "make it night"]


@pytest.fixture
def streams(monkeypatch):
    log = emulate_streams(monkeypatch)
    monkeypatch.setattr(memory, "use_streams", lambda device: True)
    return log


def new_pipe(weights):
    from diffusers import Flux2Pipeline

    pipe = Flux2Pipeline(**load_components(weights, torch.float32))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def group_offloading_hook(module):
    from diffusers.hooks.group_offloading import _GROUP_OFFLOADING

    return module._diffusers_hook.get_hook(_GROUP_OFFLOADING)


def embeds(pipe, prompt: str) -> torch.Tensor:
    with torch.no_grad():
        return pipe.encode_prompt(prompt, device=torch.device("cpu"))[0]


@pytest.fixture(scope="module")
def reference(tiny_weights):
    """Prompt embeddings and an image from the pipeline as loaded (no hooks)."""
    pipe = new_pipe(tiny_weights)
    return {"embeds": [embeds(pipe, p) for p in PROMPTS], "image": run_pipe(pipe)}


def test_diffusers_nested_block_modules_with_streams_fail(tiny_weights, streams):
    """Why the text encoder is not streamed whole: diffusers' nested `block_modules` form stacks two lazy-prefetch
    hooks with streams. (If a diffusers release fixes this, this test says so.)"""
    from diffusers.hooks import apply_group_offloading

    text_encoder = load_components(tiny_weights, torch.float32)["text_encoder"]
    with pytest.raises(ValueError, match="layer_execution_tracker already exists"):
        apply_group_offloading(
            text_encoder,
            onload_device=torch.device("cpu"),
            offload_type="block_level",
            num_blocks_per_group=1,
            use_stream=True,
            block_modules=["model", "language_model"],
        )


def test_offload_text_encoder_streams_the_decoder_layers_bit_identically(tiny_weights, reference, streams):
    pipe = new_pipe(tiny_weights)
    apply_memory_plan(pipe, MemoryPlan("offload-text-encoder", "cpu"))
    language_model = pipe.text_encoder.model.language_model
    assert streams.streams_created == 1  # one side stream for the decoder layers
    assert all(streams.is_pinned(p) for p in language_model.layers.parameters())  # the streamed copies: pinned
    assert not any(streams.is_pinned(p) for p in pipe.text_encoder.model.vision_tower.parameters())  # resident
    for _ in range(2):  # the first call traces the layer order; the second prefetches on the side stream
        for prompt, expected in zip(PROMPTS, reference["embeds"]):
            assert torch.equal(embeds(pipe, prompt), expected)
    # after the traced call each layer prefetches the next one on the side stream
    hooks = [group_offloading_hook(layer) for layer in language_model.layers]
    assert all(hook.next_group is following.group for hook, following in itertools.pairwise(hooks))
    assert not any(hook.group.onload_self for hook in hooks)
    fetched = streams.side_stream_entries
    embeds(pipe, PROMPTS[0])
    # each layer copied in the side stream's context (twice here: with onload and offload both the CPU, diffusers'
    # "still on the offload device?" fallback also fires, which on a GPU it does not)
    assert streams.side_stream_entries - fetched >= len(language_model.layers)
    assert np.array_equal(run_pipe(pipe), reference["image"])


def test_group_offload_streams_transformer_and_text_encoder_bit_identically(tiny_weights, reference, streams):
    pipe = new_pipe(tiny_weights)
    apply_memory_plan(pipe, MemoryPlan("group-offload", "cpu"))
    assert streams.streams_created == 2  # the transformer's and the text encoder's
    blocks = [*pipe.transformer.transformer_blocks, *pipe.transformer.single_transformer_blocks]
    assert all(streams.is_pinned(p) for block in blocks for p in block.parameters())
    for _ in range(2):
        assert np.array_equal(run_pipe(pipe), reference["image"])
    assert streams.side_stream_entries > 0


def test_streamed_modes_keep_one_host_copy_of_the_streamed_weights(tiny_weights, streams):
    """diffusers pins a copy of each streamed tensor while the original is still referenced (2x host RAM at the
    peak); `pin_blocks` pins in place first, so the peak stays at the weights once plus one tensor."""
    from diffusers.hooks import apply_group_offloading

    def host_peak(pin_first: bool) -> tuple[int, int]:
        streams.pinned.clear()
        streams.watched.clear()
        streams.peak_host_bytes = 0
        language_model = load_components(tiny_weights, torch.float32)["text_encoder"].model.language_model
        streams.watch(language_model)
        total = streams.live_bytes()
        if pin_first:
            memory.pin_blocks(language_model)
        apply_group_offloading(
            language_model, torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1, use_stream=True
        )
        return streams.peak_host_bytes, total

    text_encoder = load_components(tiny_weights, torch.float32)["text_encoder"]
    largest = max(p.numel() * p.element_size() for p in text_encoder.parameters())
    layers = sum(p.numel() * p.element_size() for p in text_encoder.model.language_model.layers.parameters())
    del text_encoder
    peak, total = host_peak(pin_first=False)
    assert peak >= total + layers  # diffusers alone: every decoder layer twice at the peak
    peak, total = host_peak(pin_first=True)
    assert peak <= total + largest  # pinned in place: once, plus the tensor being copied


# End to end: load_editor with each streamed mode on the CPU standing in for the GPU (check_plan, which refuses
# these modes on a CPU-only server, is let through), the stream path emulated; an edit with the turbo adapter,
# pixel-identical to the same edit in `full` mode.


@pytest.fixture(scope="module")
def full_edit(tiny_weights):
    editor = load_editor(tiny_weights, "cpu", options=RuntimeOptions(memory_mode="full"))
    return np.asarray(editor.edit(edit_call()).images[0])


def edit_call(**kwargs) -> EditCall:
    reference = PIL.Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 80, 3), dtype=np.uint8))
    return EditCall(images=[reference], prompt="make it snow", width=64, height=64, profile="turbo", seed=4, **kwargs)


@pytest.mark.parametrize("mode", ["offload-text-encoder", "group-offload"])
def test_editor_runs_each_streamed_mode_end_to_end(tiny_weights, full_edit, streams, monkeypatch, mode):
    monkeypatch.setattr(memory, "check_plan", lambda plan, hardware=None: None)
    editor = load_editor(tiny_weights, "cpu", options=RuntimeOptions(memory_mode=mode))
    caps = editor.capabilities().as_dict()
    assert caps["memory"]["mode"] == mode
    assert streams.streams_created == (2 if mode == "group-offload" else 1)
    # prompt expansion would re-stream the encoder for every generated token: refused, with the reason
    assert caps["prompt_expansion"] is False
    assert "streamed from CPU memory" in caps["prompt_expansion_unavailable"]
    for _ in range(2):  # traced, then prefetching
        result = editor.edit(edit_call(expand_prompt=True))
        assert result.prompt == "make it snow"
        assert np.array_equal(np.asarray(result.images[0]), full_edit)
