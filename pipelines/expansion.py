"""Prompt expansion: FLUX.2's own text encoder rewrites the prompt, looking at the reference images.

This is diffusers' caption upsampling (`Flux2Pipeline.upsample_prompt`, from Black Forest Labs' reference
code): Mistral 3 is a vision-language model; it gets the image-editing system message
(`SYSTEM_MESSAGE_UPSAMPLING_I2I`), the reference images (several are concatenated into one, capped at 768² px)
and the prompt, and samples a rewritten instruction. Without reference images (text to image) it gets the
text-to-image system message (`SYSTEM_MESSAGE_UPSAMPLING_T2I`) and the prompt alone. The pipeline's own `caption_upsample_temperature` path
does the same inside `__call__`; calling it here instead lets the server return and log the prompt it used.

Sampling draws from torch's global generator of the text encoder's device. It runs inside `fork_rng`, seeded
with the request's seed, so an expansion is a function of (prompt, images, seed) and leaves the process's
global random state untouched.
"""

from __future__ import annotations

import PIL.Image
import torch

# Flux2Pipeline.upsample_prompt's default temperature (BFL's flux2 reference uses the same).
TEMPERATURE = 0.15


def expand_prompt(pipe, prompt: str, images: list[PIL.Image.Image], seed: int) -> str:
    """The rewritten prompt ('' if the model produced no text)."""
    device = pipe._execution_device
    accelerator = {"devices": [device], "device_type": device.type} if device.type != "cpu" else {"devices": []}
    with torch.random.fork_rng(**accelerator):
        torch.manual_seed(seed)
        # One prompt with all its references: a list holding one list of images; None: text to image.
        references = [images] if images else None
        expanded = pipe.upsample_prompt(prompt, images=references, temperature=TEMPERATURE, device=device)
    return expanded[0].strip()
