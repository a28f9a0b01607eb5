"""fal's storage upload, emulated locally so `fal.storage.upload` in @fal-ai/client works against this server.

fal's flow: `POST {rest}/storage/upload/initiate` with {content_type, file_name} answers {upload_url, file_url};
the client PUTs the bytes to upload_url and then uses file_url as an input. Files over 90 MB go through
`initiate-multipart`: PUT `{upload_url}/{part}` per 10 MB part, then POST `{upload_url}/complete`.
Here upload_url is a one-time URL on this server (the token in it is the permission, like fal's presigned URLs)
and file_url is the file as served under /files/, which the server reads back as an input image. An upload begun
is kept in the queue backend (with its parts), so with a shared queue any front-end can finish it.
"""

import mimetypes
import secrets

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel

from server.errors import InputError, UploadAlreadyUsed
from server.files.outputs import check_free_space
from server.files.serving import SERVED_TYPES
from server.http.auth import require_key
from server.http.context import services
from server.http.hosts import public_base
from server.http.json_body import check_json_body
from server.http.responses import ALREADY_USED, NOT_FOUND, UNREADABLE_BODY

UPLOAD_TTL_S = 3600

initiate_router = APIRouter(prefix="/storage/upload", tags=["storage"], dependencies=[Depends(require_key)])
upload_router = APIRouter(
    prefix="/storage/upload", tags=["storage"], responses={**UNREADABLE_BODY, **NOT_FOUND, **ALREADY_USED}
)


class InitiateUpload(BaseModel):
    content_type: str = "application/octet-stream"
    file_name: str | None = None


class UploadTarget(BaseModel):
    upload_url: str
    file_url: str


class MultipartPart(BaseModel):
    partNumber: int
    etag: str


class CompleteMultipart(BaseModel):
    parts: list[MultipartPart]


def _initiate(request: Request, body: InitiateUpload, kind: str) -> UploadTarget:
    the = services(request)
    check_free_space(the.settings.data_dir, the.settings.min_free_disk_bytes)  # 507: the queue must stay writable
    token = secrets.token_urlsafe(24)
    content_type = body.content_type.split(";")[0].strip().lower()
    # served back under /files/ on this server's origin: only raster image types keep their type; anything else
    # (HTML, SVG, scripts...) is stored as .bin and served as application/octet-stream, never rendered as a page
    extension = (mimetypes.guess_extension(content_type) if content_type in SERVED_TYPES else None) or ".bin"
    name = f"upload-{secrets.token_hex(16)}{extension}"
    # in the queue backend: with a shared queue, any front-end can take the rest of the upload
    stored_type = content_type if extension != ".bin" else "application/octet-stream"  # what a bucket serves
    the.store.add_upload(token, {"name": name, "content_type": stored_type}, UPLOAD_TTL_S)
    base = public_base(request)  # FLUX2_PUBLIC_URL, or this server's own address (server/http/hosts.py)
    file_url = the.outputs.storage.url(name, base)
    return UploadTarget(upload_url=f"{base}/storage/upload/{kind}/{token}", file_url=file_url)


async def _store(request: Request, upload: dict, data: bytes) -> None:
    await run_in_threadpool(services(request).outputs.storage.put, upload["name"], data, upload["content_type"])


@initiate_router.post("/initiate")
async def initiate(request: Request, body: InitiateUpload) -> UploadTarget:
    return _initiate(request, body, "put")


@initiate_router.post("/initiate-multipart")
async def initiate_multipart(request: Request, body: InitiateUpload) -> UploadTarget:
    return _initiate(request, body, "multipart")


def _claim(request: Request, token: str) -> dict:
    the = services(request)
    check_free_space(the.settings.data_dir, the.settings.min_free_disk_bytes)
    upload = the.store.get_upload(token)
    if upload is None:
        raise HTTPException(404, "Unknown or expired upload URL")
    return upload


async def _read_limited(request: Request, limit: int, too_large: str) -> bytes:
    """The body, refused (413, `too_large`) as soon as it passes `limit` bytes."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(413, too_large)
    return bytes(body)


def _upload_too_large(limit: int) -> str:
    return f"Upload larger than {limit} bytes (FLUX2_MAX_UPLOAD_BYTES)"


@upload_router.put("/put/{token}")
async def put(request: Request, token: str) -> dict:
    upload = _claim(request, token)
    limit = services(request).settings.max_upload_bytes
    data = await _read_limited(request, limit, _upload_too_large(limit))
    if not services(request).store.remove_upload(token):  # another PUT finished it meanwhile: that one stands
        raise UploadAlreadyUsed()
    await _store(request, upload, data)
    return {}


@upload_router.put("/multipart/{token}/{part_number:int}")
async def put_part(request: Request, token: str, part_number: int) -> MultipartPart:
    """One part, kept in the queue until `complete`. It is read only as far as both limits leave room for: the
    upload's own (FLUX2_MAX_UPLOAD_BYTES, with its other parts) and all pending parts' (a part sent again replaces
    the earlier one). A part refused (413) is not kept."""
    _claim(request, token)
    the = services(request)
    sizes = the.store.upload_part_sizes(token)
    replaced = sizes.pop(part_number, 0)
    limit, pending_limit = the.settings.max_upload_bytes, the.settings.max_pending_upload_bytes
    room = limit - sum(sizes.values())
    pending_room = pending_limit - (the.store.pending_upload_bytes() - replaced)
    if pending_room < room:
        too_large = f"Too many upload parts pending on this server ({pending_limit} bytes); try again later"
        data = await _read_limited(request, pending_room, too_large)
    else:
        data = await _read_limited(request, room, _upload_too_large(limit))
    the.store.add_upload_part(token, part_number, data)
    return MultipartPart(partNumber=part_number, etag=secrets.token_hex(8))


# the one JSON body of the upload URLs (the others are the file's bytes), checked as the API routers' are
@upload_router.post("/multipart/{token}/complete", dependencies=[Depends(check_json_body)])
async def complete_multipart(request: Request, token: str, body: CompleteMultipart) -> dict:
    upload = _claim(request, token)
    the = services(request)
    sizes = the.store.upload_part_sizes(token)
    numbers = [p.partNumber for p in body.parts]
    if sorted(numbers) != sorted(sizes) or not numbers:
        message = f"Parts {numbers} do not match the parts uploaded {sorted(sizes)}"
        raise InputError(["parts"], message, "value_error")
    limit = the.settings.max_upload_bytes
    if sum(sizes.values()) > limit:  # parts sent at the same time can pass the limit together
        the.store.remove_upload(token)
        raise HTTPException(413, _upload_too_large(limit))
    parts = the.store.upload_parts(token)
    if not the.store.remove_upload(token):  # another `complete` took it meanwhile
        raise UploadAlreadyUsed()
    await _store(request, upload, b"".join(parts[n] for n in sorted(numbers)))
    return {}
