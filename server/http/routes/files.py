"""GET /files/{name} for files kept in a bucket (S3 storage): streamed through this server, for clients that
reach the API but not the bucket. Files on local disk are served as static files instead (see server/http/app.py).

Whatever type a file was stored with, only the raster image types the server writes or accepts as uploads are
served as such; anything else goes out as inert bytes (`application/octet-stream`, as an attachment), so nothing
uploaded is rendered as a page on this server's origin."""

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from server.files.serving import SAFE_HEADERS, SERVED_TYPES
from server.http.context import services

router = APIRouter(tags=["files"])


@router.get("/files/{name}", include_in_schema=False)
async def file(request: Request, name: str) -> StreamingResponse:
    found = await run_in_threadpool(services(request).outputs.storage.open, name)
    if found is None:
        raise HTTPException(404, "Not Found")
    headers = {**SAFE_HEADERS, "Content-Length": str(found.size)}
    media_type = found.content_type.split(";")[0].strip().lower()
    if media_type not in SERVED_TYPES:
        media_type = "application/octet-stream"
        headers["Content-Disposition"] = "attachment"

    def chunks():  # iterated in the thread pool by StreamingResponse; the object is closed however it ends
        try:
            yield from found.chunks
        finally:
            found.close()

    return StreamingResponse(chunks(), media_type=media_type, headers=headers)
