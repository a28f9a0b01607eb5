"""OpenAI's images API on the same model: `POST /v1/images/generations` (JSON) and `POST /v1/images/edits`
(multipart: `image` or `image[]`, several allowed), and `GET /v1/models`, so that tools built on OpenAI's clients
can use this server (`base_url=http://host:8000/v1`, the server's API key as the OpenAI key).

An OpenAI request becomes the input of one of fal's endpoints (`model` names the profile: generations run the
text-to-image endpoint, edits the edit endpoint) and runs on the same sync path as fal's sync routes
(`call_endpoint`: queue, dispatcher, limits, metrics); the output is answered in OpenAI's shape. Errors are made
OpenAI-shaped in one place, server/http/openai_errors.py, as is the `Bearer` key.
"""

from __future__ import annotations

import base64
import json
import re
import time
from dataclasses import dataclass
from typing import Literal

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.endpoints import BY_ID, Endpoint
from server.errors import InputError, InvalidBody
from server.http.routes.edit import call_endpoint
from server.schemas import EditOutput

router = APIRouter(prefix="/v1", tags=["openai"])


@dataclass(frozen=True)
class Model:
    """An OpenAI `model` name: the profile it runs, by the fal endpoints that run it."""

    generations: str  # the text-to-image endpoint
    edits: str  # the edit endpoint


MODELS = {
    "flux-2": Model("fal-ai/flux-2", "fal-ai/flux-2/edit"),
    "flux-2-turbo": Model("fal-ai/flux-2/turbo", "fal-ai/flux-2/turbo/edit"),
    "flux-2-flash": Model("fal-ai/flux-2/flash", "fal-ai/flux-2/flash/edit"),
}
DEFAULT_MODEL = "flux-2"
MAX_IMAGES = 4  # reference images an edit takes (fal's endpoints use the first 4; here more is refused)
SIZE = re.compile(r"(\d+)x(\d+)")


class _ImagesRequest(BaseModel):
    """The fields both routes take (OpenAI's names); others OpenAI defines (quality, style, background, user, ...)
    are accepted and ignored: they have no FLUX.2 counterpart."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(min_length=1, description="What to generate, or how to edit the images.")
    model: str | None = Field(
        None, description=f"The profile: {', '.join(MODELS)} (default {DEFAULT_MODEL}).", examples=list(MODELS)
    )
    n: int | None = Field(None, description="How many images (1-4; default 1).")
    size: str | None = Field(
        None,
        description="WIDTHxHEIGHT (512-2048 px a side), or 'auto' (default): the fal endpoint's default "
        "(text to image: 1024x768; edit: the first image's size, or 1024x1024 for turbo and flash).",
        examples=["1024x1024", "auto"],
    )
    response_format: Literal["url", "b64_json"] | None = Field(
        None, description="'url' (default): a URL on this server; 'b64_json': the image in the answer."
    )
    output_format: Literal["png", "jpeg", "webp"] | None = Field(None, description="Default png.")
    stream: bool | None = Field(None, description="Not supported: false or absent.")
    seed: int | None = Field(None, description="Not in OpenAI's API: the seed (any integer), as on fal's endpoints.")


class ImageGeneration(_ImagesRequest):
    """The body of POST /v1/images/generations."""


class ImageEditForm(_ImagesRequest):
    """The fields of POST /v1/images/edits besides the images (multipart form fields)."""


class OpenAIImage(BaseModel):
    url: str | None = Field(None, description="With response_format 'url'.")
    b64_json: str | None = Field(None, description="With response_format 'b64_json': the encoded file, base64.")
    revised_prompt: str | None = Field(None, description="The prompt used, where prompt expansion rewrote it.")


class ImagesResponse(BaseModel):
    """OpenAI's answer: `created` (Unix seconds) and `data`, one entry per image."""

    created: int
    data: list[OpenAIImage]
    output_format: Literal["png", "jpeg", "webp"]
    size: str = Field(description="WIDTHxHEIGHT of the images.")


class ModelEntry(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "flux2-server"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelEntry]


def _refuse(param: str, message: str, code: str, status: int = 400) -> InputError:
    return InputError([param], message, code, status=status)


def endpoint_for(name: str | None, edits: bool) -> Endpoint:
    """The fal endpoint a request for model `name` runs; an unknown model is a 404 naming the served ones."""
    model = MODELS.get(name or DEFAULT_MODEL)
    if model is None:
        served = ", ".join(MODELS)
        raise _refuse(
            "model", f"The model {name!r} does not exist on this server; it serves {served}", "model_not_found", 404
        )
    return BY_ID[model.edits if edits else model.generations]


def fal_input(endpoint: Endpoint, request: _ImagesRequest, image_urls: list[str]):
    """The fal endpoint's own input for an OpenAI request: its schema checks ranges (named by OpenAI's fields in
    the error: server/http/openai_errors.py)."""
    if request.stream:
        raise _refuse("stream", "Streaming is not supported by this server: send stream false", "unsupported_value")
    fields: dict = {"prompt": request.prompt, "seed": request.seed}
    if endpoint.takes_images:
        fields["image_urls"] = image_urls
    if request.n is not None:
        fields["num_images"] = request.n
    if request.output_format is not None:
        fields["output_format"] = request.output_format
    if request.size not in (None, "auto"):
        match = SIZE.fullmatch(request.size)
        if match is None:
            raise _refuse(
                "size", f"size must be 'auto' or WIDTHxHEIGHT (e.g. 1024x1024), got {request.size!r}", "invalid_value"
            )
        fields["image_size"] = {"width": int(match[1]), "height": int(match[2])}
    fields["sync_mode"] = request.response_format == "b64_json"  # in the answer, not stored
    try:
        return endpoint.input_model.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        raise InvalidBody(json.loads(exc.json(include_url=False))) from None


async def answer(
    request: Request, response: Response, endpoint: Endpoint, images: _ImagesRequest, image_urls: list[str]
) -> ImagesResponse | JSONResponse:
    output = await call_endpoint(request, endpoint, fal_input(endpoint, images, image_urls), response)
    if isinstance(output, JSONResponse):  # with a shared queue: its recorded answer
        if output.status_code != 200:
            return output  # a fal-shaped error, made OpenAI's by server/http/openai_errors.py
        output = EditOutput.model_validate_json(bytes(output.body))
    b64 = images.response_format == "b64_json"
    revised = output.prompt if output.prompt != images.prompt else None
    data = [
        OpenAIImage(b64_json=image.url.partition(",")[2], revised_prompt=revised)
        if b64
        else OpenAIImage(url=image.url, revised_prompt=revised)
        for image in output.images
    ]
    first = output.images[0]
    return ImagesResponse(
        created=int(time.time()),
        data=data,
        output_format=images.output_format or "png",  # the fal endpoints' default too
        size=f"{first.width}x{first.height}",
    )


@router.post(
    "/images/generations",
    response_model=ImagesResponse,
    response_model_exclude_none=True,
    summary="OpenAI: create images from a prompt (FLUX.2 [dev] text to image)",
)
async def generations(body: ImageGeneration, request: Request, response: Response) -> ImagesResponse | JSONResponse:
    return await answer(request, response, endpoint_for(body.model, edits=False), body, [])


EDIT_FORM_SCHEMA = {
    "type": "object",
    "required": ["image", "prompt"],
    "properties": {
        "image": {
            "type": "array",
            "items": {"type": "string", "format": "binary"},
            "description": f"1-{MAX_IMAGES} images to edit (form field `image`, or `image[]` for each of several).",
        },
        **{
            name: {k: v for k, v in schema.items() if k not in ("title",)}
            for name, schema in ImageEditForm.model_json_schema()["properties"].items()
        },
    },
}


async def _data_uri(upload: UploadFile) -> str:
    data = await upload.read()
    return f"data:{upload.content_type or 'application/octet-stream'};base64,{base64.b64encode(data).decode()}"


@router.post(
    "/images/edits",
    response_model=ImagesResponse,
    response_model_exclude_none=True,
    summary="OpenAI: edit images from a prompt (FLUX.2 [dev] edit, 1-4 images)",
    openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": EDIT_FORM_SCHEMA}}}},
)
async def edits(request: Request, response: Response) -> ImagesResponse | JSONResponse:
    try:
        form = await request.form(max_files=MAX_IMAGES + 1)
    except StarletteHTTPException as exc:  # a malformed multipart body, or too many parts (Starlette's 400)
        raise _refuse(
            "image", f"The body must be multipart/form-data with 1-{MAX_IMAGES} images ({exc.detail})", "invalid_body"
        ) from None
    files = [*form.getlist("image"), *form.getlist("image[]")]
    uploads = [f for f in files if isinstance(f, UploadFile)]
    if "mask" in form:
        raise _refuse(
            "mask", "Masks are not supported: FLUX.2 [dev] edits the whole image from the prompt", "unsupported_value"
        )
    if len(uploads) != len(files) or not 1 <= len(uploads) <= MAX_IMAGES:
        raise _refuse(
            "image", f"Send 1-{MAX_IMAGES} image files as `image` (or `image[]`), got {len(uploads)}", "invalid_value"
        )
    fields = {k: v for k, v in form.multi_items() if k not in ("image", "image[]") and isinstance(v, str)}
    try:
        body = ImageEditForm.model_validate(fields)
    except ValidationError as exc:
        raise InvalidBody(json.loads(exc.json(include_url=False))) from None
    urls = [await _data_uri(upload) for upload in uploads]
    return await answer(request, response, endpoint_for(body.model, edits=True), body, urls)


@router.get("/models", response_model=ModelList, summary="OpenAI: the models (profiles) served")
async def models() -> ModelList:
    return ModelList(data=[ModelEntry(id=name) for name in MODELS])
