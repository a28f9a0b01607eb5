"""The web playground at / (server/http/static/: HTML, an ES module, CSS; no build step, nothing from a CDN).

The page and its assets are open like /health; the API calls it makes carry the key typed into the page. Its
endpoint list is written into the page from server/endpoints.py, so it names every endpoint served."""

from html import escape
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

from server.endpoints import ENDPOINTS

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
OPTIONS_MARK = (
    "<!-- ENDPOINT OPTIONS: one per endpoint in server/endpoints.py, written in by server/http/routes/playground.py -->"
)


def page() -> str:
    """index.html with an <option> per endpoint (its id, and what it is) in the endpoint list."""
    options = "\n".join(
        f'          <option value="{escape(e.endpoint_id)}">{escape(e.endpoint_id)} ({escape(e.summary)})</option>'
        for e in ENDPOINTS
    )
    html = (STATIC_DIR / "index.html").read_text()
    assert OPTIONS_MARK in html, "index.html lost its endpoint list's mark"
    return html.replace(" " * 10 + OPTIONS_MARK, options)


# no other site may show the page in a frame (clickjacking a page that holds a key)
NOT_FRAMED = {"X-Frame-Options": "DENY", "Content-Security-Policy": "frame-ancestors 'none'"}

router = APIRouter(include_in_schema=False)
static_files = StaticFiles(directory=STATIC_DIR)


PAGE = page()


@router.get("/")
async def playground() -> HTMLResponse:
    return HTMLResponse(PAGE, headers={"Cache-Control": "no-cache", **NOT_FRAMED})


@router.get("/favicon.ico")
async def favicon() -> FileResponse:
    """Where browsers look for an icon unasked (the playground's page names /static/favicon.svg)."""
    return FileResponse(STATIC_DIR / "favicon.ico", media_type="image/x-icon")
