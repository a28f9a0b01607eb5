"""The safety checker: an image classifier from local disk that says, for each output image, whether it is NSFW.

Any transformers image-classification model directory works (`config.json` with an `id2label` that has an
"nsfw" label, its weights, and `preprocessor_config.json`), loaded with `AutoModelForImageClassification` and
`AutoImageProcessor` from local files only. One suitable, openly licensed model is
Falconsai/nsfw_image_detection (a ViT fine-tuned for NSFW detection, labels `normal`/`nsfw`, Apache-2.0):
https://huggingface.co/Falconsai/nsfw_image_detection; place its files in `<weights>/safety_checker/` (or
point FLUX2_SAFETY_CHECKER at them).

The verdict for an image is P(nsfw) >= threshold, P from the classifier's softmax. The classifier runs on the
editor's device (the GPU when present), in float32 on the CPU and in the pipeline's dtype elsewhere.
"""

from __future__ import annotations

import logging
from pathlib import Path

import PIL.Image
import torch

log = logging.getLogger(__name__)

NSFW_LABEL = "nsfw"
DEFAULT_THRESHOLD = 0.5


class SafetyChecker:
    def __init__(self, directory: Path, device: torch.device, dtype: torch.dtype, threshold: float = DEFAULT_THRESHOLD):
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        self.directory = Path(directory)
        self.threshold = threshold
        self.model = AutoModelForImageClassification.from_pretrained(
            self.directory, dtype=dtype, local_files_only=True
        ).to(device)
        self.model.eval()
        self.processor = AutoImageProcessor.from_pretrained(self.directory, local_files_only=True)
        labels = {str(name).lower(): int(index) for index, name in self.model.config.id2label.items()}
        if NSFW_LABEL not in labels:
            raise ValueError(
                f"{self.directory} is not an NSFW classifier: its labels {sorted(labels)} have no {NSFW_LABEL!r}"
            )
        self.nsfw_index = labels[NSFW_LABEL]
        log.info("safety checker: %s on %s (nsfw if P >= %s)", self.directory, device, threshold)

    @torch.no_grad()
    def nsfw_probabilities(self, images: list[PIL.Image.Image]) -> list[float]:
        inputs = self.processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.model.device, self.model.dtype)
        probabilities = self.model(pixel_values=pixels).logits.float().softmax(dim=-1)
        return probabilities[:, self.nsfw_index].tolist()

    def verdicts(self, images: list[PIL.Image.Image]) -> tuple[list[bool], list[float]]:
        probabilities = self.nsfw_probabilities(images)
        return [p >= self.threshold for p in probabilities], probabilities


def withheld(image: PIL.Image.Image) -> PIL.Image.Image:
    """What a flagged image is replaced with: black, of the same size."""
    return PIL.Image.new("RGB", image.size)
