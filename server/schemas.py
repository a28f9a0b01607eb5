"""The API contract: fal's FLUX.2 [dev] endpoints' input and output, as pydantic models.

These models are the single source of the API: FastAPI validates requests with them and builds
/openapi.json from them. Fields, ranges and defaults follow fal's documentation of fal-ai/flux-2/edit,
fal-ai/flux-2/turbo/edit and fal-ai/flux-2/flash/edit (edit: `image_urls`), and of fal-ai/flux-2,
fal-ai/flux-2/turbo and fal-ai/flux-2/flash (text to image: no images; `image_size` defaults to landscape_4_3),
as fal publishes them (its model API pages, and @fal-ai/client's endpoint types: Flux2Input, Flux2TurboInput, ...).
"""

from __future__ import annotations

from enum import Enum
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

MIN_SIDE, MAX_SIDE = 512, 2048
MAX_REFERENCE_IMAGES = 4


class ImageSizeName(str, Enum):
    square_hd = "square_hd"
    square = "square"
    portrait_4_3 = "portrait_4_3"
    portrait_16_9 = "portrait_16_9"
    landscape_4_3 = "landscape_4_3"
    landscape_16_9 = "landscape_16_9"


# fal's named sizes, as (width, height).
NAMED_SIZES: dict[ImageSizeName, tuple[int, int]] = {
    ImageSizeName.square_hd: (1024, 1024),
    ImageSizeName.square: (512, 512),
    ImageSizeName.portrait_4_3: (768, 1024),
    ImageSizeName.portrait_16_9: (576, 1024),
    ImageSizeName.landscape_4_3: (1024, 768),
    ImageSizeName.landscape_16_9: (1024, 576),
}


# Input scalars are validated as fal's framework validates them: pydantic's default (lax) mode, so "2" or 2.0 for an
# integer, "3.5" for a float and "true" or 1 for a boolean are accepted and converted (what form frontends, Python code
# computing sizes as floats and LLM tool calls send). /openapi.json still states the real types.


class ImageSize(BaseModel):
    width: int = Field(512, ge=MIN_SIDE, le=MAX_SIDE, description="The width of the generated image.")
    height: int = Field(512, ge=MIN_SIDE, le=MAX_SIDE, description="The height of the generated image.")


class Acceleration(str, Enum):
    none = "none"
    regular = "regular"
    high = "high"


OutputFormat = Literal["jpeg", "png", "webp"]


class _InputCommon(BaseModel):
    """The fields every endpoint of the family takes (edit and text to image alike)."""

    prompt: str = Field(
        min_length=1,
        description="The prompt to generate an image from.",
        examples=["A red fox in fresh snow at dawn, soft light, photorealistic"],
    )
    guidance_scale: float = Field(
        2.5,
        ge=0,
        le=20,
        description="Guidance Scale is a measure of how close you want the model to stick to your prompt.",
    )
    seed: int | None = Field(
        None,
        description="The seed to use for the generation. If not provided, a random seed will be used. Any integer "
        "(as on fal): it is mapped onto the generator's range (modulo 2**64), and the output echoes it as given.",
    )
    num_images: int = Field(1, ge=1, le=4, description="The number of images to generate.")
    enable_prompt_expansion: bool = Field(False, description="If set to true, the prompt will be expanded.")
    sync_mode: bool = Field(
        False,
        description="If true, the media will be returned as a data URI and the output won't be stored.",
    )
    enable_safety_checker: bool = Field(True, description="If set to true, the safety checker will be enabled.")
    output_format: OutputFormat = Field("png", description="The format of the generated image.")

    def reference_urls(self) -> list[str]:
        """The reference images' URLs, as given: none for a text-to-image input."""
        return []


class _EditInputCommon(_InputCommon):
    """An edit endpoint's input: the common fields and 1-4 reference images."""

    model_config = ConfigDict(json_schema_extra={"x-fal-order-properties": ["prompt", "image_urls"]})

    prompt: str = Field(
        min_length=1,
        description="The prompt to edit the image.",
        examples=["Change his clothes to casual suit and tie"],
    )
    image_urls: list[str] = Field(
        min_length=1,
        description="The URLs of the images for editing (http, https or data URIs). A maximum of 4 images are "
        "allowed; if more are provided, only the first 4 will be used.",
    )

    def reference_urls(self) -> list[str]:
        return self.image_urls


class _TextToImageCommon(_InputCommon):
    """A text-to-image endpoint's input: the common fields, no images, and fal's text-to-image default size."""

    model_config = ConfigDict(json_schema_extra={"x-fal-order-properties": ["prompt"]})

    image_size: ImageSize | ImageSizeName = Field(
        ImageSizeName.landscape_4_3,
        description="The size of the generated image (512-2048 px a side).",
        examples=["landscape_4_3", {"height": 1152, "width": 2016}],
    )


class ChosenSchedule(BaseModel):
    """The base endpoints' schedule (fal-ai/flux-2/edit, fal-ai/flux-2): steps and acceleration chosen by the
    caller. Listed first among an input's bases, so that its fields come after the common ones."""

    num_inference_steps: int = Field(28, ge=4, le=50, description="The number of inference steps to perform.")
    acceleration: Acceleration = Field(Acceleration.regular, description="The acceleration level to use.")


class FixedSchedule(BaseModel):
    """Turbo and flash: a fixed, optimised schedule. The base endpoint's fields, accepted as fal accepts them and
    ignored by the fixed schedule; kept (not in the schema, as fal's lists neither) so that the answer can say they
    were ignored, even after a trip through the queue."""

    num_inference_steps: SkipJsonSchema[Any] = None
    acceleration: SkipJsonSchema[Any] = None
    IGNORED: ClassVar[tuple[str, ...]] = ("num_inference_steps", "acceleration")


class Flux2EditInput(ChosenSchedule, _EditInputCommon):
    """Input of fal-ai/flux-2/edit (full quality)."""

    image_size: ImageSize | ImageSizeName | None = Field(
        None,
        description="The size of the generated image (512-2048 px a side). Not set: the first input image's size.",
        examples=[{"height": 1152, "width": 2016}, "square_hd"],
    )


class Flux2FastEditInput(FixedSchedule, _EditInputCommon):
    """Input of fal-ai/flux-2/turbo/edit and fal-ai/flux-2/flash/edit (fixed, optimised steps)."""

    image_size: ImageSize | ImageSizeName = Field(
        ImageSizeName.square_hd,
        description="The size of the generated image (512-2048 px a side).",
        examples=["square_hd", {"height": 1152, "width": 2016}],
    )


class Flux2TextToImageInput(ChosenSchedule, _TextToImageCommon):
    """Input of fal-ai/flux-2 (text to image, full quality)."""


class Flux2FastTextToImageInput(FixedSchedule, _TextToImageCommon):
    """Input of fal-ai/flux-2/turbo and fal-ai/flux-2/flash (text to image, fixed, optimised steps)."""


MAX_LORAS = 3  # per request (fal's "maximum 3"); pipelines.loras.MAX_LORAS is the model's side of it


class LoRAInput(BaseModel):
    """One LoRA of fal-ai/flux-2/lora and /lora/edit (fal's schema name `LoRAInput`)."""

    path: str = Field(
        min_length=1,
        description="URL of the LoRA weights (.safetensors): http(s), or this server's own file URL (an upload "
        "through the storage emulation); or the name of a LoRA in this server's LoRA library (FLUX2_LORA_DIR), e.g. "
        "a Hugging Face repo id (owner/repo) the operator copied in. Model hubs are never contacted.",
    )
    scale: float = Field(1.0, ge=0, le=4, description="Scale factor for LoRA application (0.0 to 4.0).")


class _LorasInput(BaseModel):
    """The LoRA endpoints' addition to the base endpoints' fields. Listed first among an input's bases, so that
    `loras` comes last."""

    loras: list[LoRAInput] = Field(
        default_factory=list,
        max_length=MAX_LORAS,
        description="List of LoRA weights to apply (maximum 3), each with its scale.",
    )


class Flux2LoraEditInput(_LorasInput, Flux2EditInput):
    """Input of fal-ai/flux-2/lora/edit: the base edit's fields and up to 3 LoRAs."""

    model_config = ConfigDict(json_schema_extra={"x-fal-order-properties": ["prompt", "image_urls", "loras"]})

    prompt: str = Field(
        min_length=1, description="The prompt to generate an image from.", examples=["Make this donut realistic"]
    )


class Flux2LoraInput(_LorasInput, Flux2TextToImageInput):
    """Input of fal-ai/flux-2/lora: the base text to image's fields and up to 3 LoRAs."""

    model_config = ConfigDict(json_schema_extra={"x-fal-order-properties": ["prompt", "loras"]})


# The body of any endpoint, edit or text to image (the service takes them all; `reference_urls()` tells them apart).
# The LoRA endpoints' inputs are subclasses of the base ones, with `loras`.
EditInput = Flux2EditInput | Flux2FastEditInput | Flux2TextToImageInput | Flux2FastTextToImageInput


class ImageFile(BaseModel):
    url: str = Field(description="The URL where the file can be downloaded from (a data URI with sync_mode).")
    content_type: str | None = Field(None, description="The mime type of the file.")
    file_name: str | None = Field(None, description="The name of the file.")
    file_size: int | None = Field(None, description="The size of the file in bytes.")
    width: int | None = Field(None, description="The width of the image in pixels.")
    height: int | None = Field(None, description="The height of the image in pixels.")


class EditOutput(BaseModel):
    images: list[ImageFile] = Field(description="The generated (or edited) images.")
    timings: dict[str, float] = Field(description="Seconds spent per stage.")
    seed: int = Field(description="The seed used: the one in the input, or the random one drawn for it.")
    has_nsfw_concepts: list[bool] = Field(
        description="Whether each image contains NSFW concepts (a flagged image is withheld: black). False where "
        "the checker did not run: enable_safety_checker false, or the operator turned it off (see notices)."
    )
    prompt: str = Field(description="The prompt used for generating the image.")
    notices: list[str] = Field(
        default_factory=list,
        description="Not in fal's schema: what this server did differently from what was asked, and why "
        "(features not available on this server). Empty when everything asked for was done.",
    )


class QueueSubmitted(BaseModel):
    """fal's answer to a queue submit (fal-js types it as an IN_QUEUE status)."""

    status: Literal["IN_QUEUE"] = "IN_QUEUE"
    request_id: str
    gateway_request_id: str = Field(description="fal's gateway id of the request; here the same as request_id.")
    response_url: str
    status_url: str
    cancel_url: str
    queue_position: int


class LogEntry(BaseModel):
    message: str
    level: str
    source: str
    timestamp: str


class Progress(BaseModel):
    step: int = Field(description="Denoising steps done.")
    total: int = Field(description="Denoising steps this request runs.")


class QueueStatus(BaseModel):
    """fal's request status. `logs` is null unless asked for with `?logs=1`. `progress` is this server's own
    addition (fal's clients ignore it): the denoising steps done, once the model runs, beside the log lines."""

    status: Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
    request_id: str
    response_url: str
    status_url: str
    cancel_url: str
    queue_position: int | None = None
    logs: list[LogEntry] | None = None
    metrics: dict[str, float] | None = None
    error: str | None = None
    error_type: str | None = None
    progress: Progress | None = Field(None, description="Denoising steps done, of how many (not in fal's API).")


class Message(BaseModel):
    """fal's error shape for errors that are not about one input field."""

    detail: str


class CancelAnswer(BaseModel):
    status: Literal["CANCELLATION_REQUESTED", "ALREADY_COMPLETED", "NOT_FOUND"]
