"""The web playground at / (server/http/static/: HTML, an ES module, CSS; no build step, nothing from a CDN).

The page and its assets are open like /health; the API calls it makes carry the key typed into the page."""

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

# no other site may show the page in a frame (clickjacking a page that holds a key)
NOT_FRAMED = {"X-Frame-Options": "DENY", "Content-Security-Policy": "frame-ancestors 'none'"}

router = APIRouter(include_in_schema=False)
static_files = StaticFiles(directory=STATIC_DIR)


@router.get("/")
async def playground() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache", **NOT_FRAMED})


@router.get("/favicon.ico")
async def favicon() -> FileResponse:
    """Where browsers look for an icon unasked (the playground's page names /static/favicon.svg)."""
    return FileResponse(STATIC_DIR / "favicon.ico", media_type="image/x-icon")
