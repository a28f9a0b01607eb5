"""CUDA path: the default device and dtype on a GPU (bf16), on the tiny model. Skipped without CUDA."""

from __future__ import annotations

import PIL.Image
import pytest
import torch

from pipelines import EditCall, load_editor

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_tiny_model_runs_on_cuda_in_bf16(tiny_weights):
    editor = load_editor(tiny_weights)
    assert editor.device.type == "cuda" and editor.dtype == torch.bfloat16
    reference = PIL.Image.new("RGB", (128, 96), (120, 40, 200))
    result = editor.edit(EditCall(images=[reference], prompt="p", width=512, height=512, profile="flash", seed=1))
    assert result.steps == 4 and [i.size for i in result.images] == [(512, 512)]
    again = editor.edit(EditCall(images=[reference], prompt="p", width=512, height=512, profile="flash", seed=1))
    assert list(result.images[0].getdata()) == list(again.images[0].getdata())
