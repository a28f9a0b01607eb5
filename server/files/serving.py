"""Output files under /files/: Starlette's StaticFiles (no directory listing, no path leaving the directory, no
symlinks followed), with headers that stop a browser from treating a served file as anything but what it is."""

from __future__ import annotations

from fastapi.staticfiles import StaticFiles

SAFE_HEADERS = {
    "X-Content-Type-Options": "nosniff",  # the declared type (from the extension) is the type
    "Content-Security-Policy": "default-src 'none'; sandbox",  # nothing in a file runs on this origin
}


class OutputFiles(StaticFiles):
    def file_response(self, *args, **kwargs):
        response = super().file_response(*args, **kwargs)
        response.headers.update(SAFE_HEADERS)
        return response
