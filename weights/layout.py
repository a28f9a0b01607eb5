"""The on-disk layout of a FLUX.2 [dev] weights directory, as diffusers saves and loads it.

`black-forest-labs/FLUX.2-dev` and the tiny model built by `weights.tiny` share this layout, so one loader serves both:

    model_index.json                      {"_class_name": "Flux2Pipeline", "<component>": [library, class], ...}
    scheduler/scheduler_config.json
    text_encoder/config.json + model*.safetensors            (transformers, Mistral3ForConditionalGeneration)
    tokenizer/tokenizer_config.json + tokenizer.json, ...    (transformers, PixtralProcessor or its tokenizer)
    transformer/config.json + diffusion_pytorch_model*.safetensors
    vae/config.json + diffusion_pytorch_model*.safetensors
    loras/<adapter>/<file>.safetensors                       (optional distilled LoRAs in diffusers format)
    safety_checker/config.json + model.safetensors, ...      (optional NSFW image classifier, transformers)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PIPELINE_CLASS = "Flux2Pipeline"
TINY_MARKER = "TINY_MODEL.json"  # beside model_index.json in the tiny model only, so a server can say it serves it


@dataclass(frozen=True)
class Component:
    name: str
    library: str
    class_name: str
    config_file: str | None  # the JSON file that describes the component
    weights_prefix: str | None  # stem of its safetensors file(s); None when the component has no weights
    also_accepted: tuple[str, ...] = ()  # other classes model_index.json may name for it

    @property
    def accepted(self) -> tuple[str, ...]:
        return (self.class_name, *self.also_accepted)


COMPONENTS: tuple[Component, ...] = (
    Component("scheduler", "diffusers", "FlowMatchEulerDiscreteScheduler", "scheduler_config.json", None),
    Component("text_encoder", "transformers", "Mistral3ForConditionalGeneration", "config.json", "model"),
    # Saved as the full processor, or (as some diffusers exports do) as its tokenizer alone; both load.
    Component(
        "tokenizer",
        "transformers",
        "PixtralProcessor",
        "tokenizer_config.json",
        None,
        also_accepted=("PreTrainedTokenizerFast", "TokenizersBackend"),
    ),
    Component("transformer", "diffusers", "Flux2Transformer2DModel", "config.json", "diffusion_pytorch_model"),
    Component("vae", "diffusers", "AutoencoderKLFlux2", "config.json", "diffusion_pytorch_model"),
)


@dataclass(frozen=True)
class Adapter:
    name: str  # the directory under loras/, and the adapter's name once loaded
    file: str  # its safetensors file, in diffusers' LoRA format (keys "transformer.<module>.lora_A/B.weight")
    source: str  # where the operator gets it

    def path(self, weights_dir: Path) -> Path:
        return Path(weights_dir) / LORAS_DIR / self.name / self.file


LORAS_DIR = "loras"
SAFETY_CHECKER_DIR = "safety_checker"  # the default place of the checker (pipelines.safety)
ADAPTERS: dict[str, Adapter] = {
    # fal's 8-step distillation LoRA for FLUX.2 [dev]. File name as its model card's "Usage" loads it
    # (huggingface.co/fal/FLUX.2-dev-Turbo, README.md: pipe.load_lora_weights("fal/FLUX.2-dev-Turbo",
    # weight_name="flux.2-turbo-lora.safetensors")); its license is the FLUX [dev] non-commercial license.
    "turbo": Adapter("turbo", "flux.2-turbo-lora.safetensors", "https://huggingface.co/fal/FLUX.2-dev-Turbo"),
}
