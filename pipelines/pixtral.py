"""transformers' PixtralProcessor, importable with or without torchvision.

FLUX.2's `tokenizer` component is a PixtralProcessor: Mistral's tokenizer plus the Pixtral image processor that
turns reference images into `[IMG]` patch tokens for the text encoder (needed by prompt expansion, which lets
the text encoder see the references). transformers 5 has two Pixtral image processors: `PixtralImageProcessor`
(torchvision backend) and `PixtralImageProcessorPil` (PIL backend), and `PixtralProcessor.from_pretrained`
picks the PIL one when torchvision is not installed. But `processing_pixtral.py` itself imports one helper,
`get_resize_output_image_size`, from the torchvision module at import time (it is used only by
`_get_num_multimodal_tokens`, a serving-engine hook, never by `apply_chat_template`), so without torchvision the
class can't even be imported.

The PIL module defines the same function (identical source, "Adapted from" the torchvision one). Where the
torchvision module can't be imported (the CPU test environment: PyPI has no torchvision for the CPU torch
wheel), `pixtral_processor_class` registers a module of that name exposing that one function, then imports the
real class. Everything that runs is transformers' own code; with torchvision installed (the CUDA image) nothing
is registered.
"""

from __future__ import annotations

import importlib
import logging
import sys
import types

log = logging.getLogger(__name__)

_TORCHVISION_MODULE = "transformers.models.pixtral.image_processing_pixtral"


def pixtral_processor_class() -> type:
    """transformers' `PixtralProcessor` class."""
    try:
        importlib.import_module(_TORCHVISION_MODULE)
    except (ImportError, RuntimeError) as exc:  # not installed, or installed for another torch build
        from transformers.models.pixtral import image_processing_pil_pixtral

        log.info("torchvision is not usable (%s): PixtralProcessor runs with its PIL image processor", exc)
        module = types.ModuleType(_TORCHVISION_MODULE)
        module.__doc__ = "Stand-in registered by pipelines.pixtral: torchvision is not usable here."
        module.get_resize_output_image_size = image_processing_pil_pixtral.get_resize_output_image_size
        sys.modules[_TORCHVISION_MODULE] = module
    from transformers.models.pixtral.processing_pixtral import PixtralProcessor

    return PixtralProcessor
