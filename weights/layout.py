"""The on-disk layout of a FLUX.2 [dev] weights directory, as diffusers saves and loads it.

`black-forest-labs/FLUX.2-dev` and the tiny model built by `weights.tiny` share this layout, so one loader serves both:

    model_index.json                      {"_class_name": "Flux2Pipeline", "<component>": [library, class], ...}
    scheduler/scheduler_config.json
    text_encoder/config.json + model*.safetensors            (transformers, Mistral3ForConditionalGeneration)
    tokenizer/tokenizer_config.json + tokenizer.json, ...    (transformers, PixtralProcessor or its tokenizer)
    transformer/config.json + diffusion_pytorch_model*.safetensors
    vae/config.json + diffusion_pytorch_model*.safetensors
"""

from __future__ import annotations

from dataclasses import dataclass

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
