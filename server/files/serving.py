"""Output files under /files/: Starlette's StaticFiles (no directory listing, no path leaving the directory, no
symlinks followed), with headers that stop a browser from treating a served file as anything but what it is."""

from __future__ import annotations

from fastapi.staticfiles import StaticFiles

# the only types a stored file is served as; anything else is served as application/octet-stream
SERVED_TYPES = {"image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp", "image/tiff", "image/avif"}
SAFE_HEADERS = {
    "X-Content-Type-Options": "nosniff",  # the declared type (from the extension) is the type
    "Content-Security-Policy": "default-src 'none'; sandbox",  # nothing in a file runs on this origin
}


class OutputFiles(StaticFiles):
    def file_response(self, *args, **kwargs):
        response = super().file_response(*args, **kwargs)
        response.headers.update(SAFE_HEADERS)
        return response
