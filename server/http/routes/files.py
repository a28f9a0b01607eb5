"""GET /files/{name} for files kept in a bucket (S3 storage): streamed through this server, for clients that
reach the API but not the bucket. Files on local disk are served as static files instead (see server/http/app.py)."""

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from server.files.serving import SAFE_HEADERS
from server.http.context import services

router = APIRouter(tags=["files"])


@router.get("/files/{name}", include_in_schema=False)
async def file(request: Request, name: str) -> Response:
    found = await run_in_threadpool(services(request).outputs.storage.get, name)
    if found is None:
        raise HTTPException(404, "Not Found")
    data, content_type = found
    return Response(data, media_type=content_type, headers=SAFE_HEADERS)
