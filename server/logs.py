"""Logging: one line per event, as text or as JSON (FLUX2_LOG_FORMAT=json|text), each with its request id.

The request id is a context variable: set for every HTTP request by `request_ids` (from an `X-Request-Id` header
or a fresh one), replaced by the fal request id once a route or the dispatcher knows it, and carried into the
inference thread by the worker, so a request's step lines, errors and webhooks can be found by one id.

Standard-library logging with a 20-line JSON formatter rather than structlog or python-json-logger: uvicorn's
loggers and every library's are stdlib loggers already, a formatter is all that JSON output needs, and the
air-gapped install keeps one dependency fewer.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import MutableMapping
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

request_id_var: ContextVar[str | None] = ContextVar("flux2_request_id", default=None)
_ACCEPTED_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
LOG_FORMATS = ("text", "json")


def redacted(url: str) -> str:
    """A URL fit for logs (the queue's `redis://:PASSWORD@host`): its password replaced by `***`."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + parts.netloc.rpartition("@")[2]))


class RequestIdFilter(logging.Filter):
    """Puts the current request id on every record (None outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id, and the traceback if any.

    uvicorn's access lines also get their parts as fields (client, method, path, status)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            entry["request_id"] = request_id
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
            client, method, path, _, status = record.args
            entry |= {"client": client, "method": method, "path": path, "status": status}
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


def logging_config(log_format: str = "text", level: str = "info") -> dict:
    """A `logging.config.dictConfig` for this process, uvicorn's loggers included (pass it as uvicorn's
    `log_config`): everything goes through one handler on the root logger, in the chosen format."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {LOG_FORMATS}, got {log_format!r}")
    formatter = {"()": JsonFormatter} if log_format == "json" else {"format": TEXT_FORMAT}
    propagate = {"handlers": [], "propagate": True}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": RequestIdFilter}},
        "formatters": {"default": formatter},
        "handlers": {
            "default": {"class": "logging.StreamHandler", "formatter": "default", "filters": ["request_id"]},
        },
        "root": {"handlers": ["default"], "level": level.upper()},
        "loggers": {name: propagate for name in ("uvicorn", "uvicorn.error", "uvicorn.access")},
    }


FAL_REQUEST_ID = "flux2.fal_request_id"  # the scope key of a response's fal request id (a one-entry dict)


def set_fal_request_id(scope: MutableMapping[str, Any], request_id: str) -> None:
    """This HTTP request concerns the fal request `request_id`: log with it, and answer with `x-fal-request-id`."""
    if not _ACCEPTED_ID.match(request_id):  # a path segment that can't be an id of ours: not echoed in a header
        return
    request_id_var.set(request_id)
    if FAL_REQUEST_ID in scope:
        scope[FAL_REQUEST_ID]["id"] = request_id


def request_ids(app):
    """ASGI middleware: every HTTP request runs with a request id (the client's `X-Request-Id` when it is a
    plausible id, else a fresh one). A response about a fal request (set_fal_request_id: submit, status, cancel,
    result, a sync call, a 422 for its body) carries its id in `x-fal-request-id`, as fal's do."""

    async def middleware(scope, receive, send):
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id_var.set(given if _ACCEPTED_ID.match(given) else uuid.uuid4().hex)
        fal_id: dict[str, str | None] = {"id": None}  # shared by the copies of the scope further in

        async def send_with_id(message):
            if message["type"] == "http.response.start" and fal_id["id"]:
                headers = list(message.get("headers", []))
                if not any(name.lower() == b"x-fal-request-id" for name, _ in headers):
                    headers.append((b"x-fal-request-id", fal_id["id"].encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        await app({**scope, FAL_REQUEST_ID: fal_id}, receive, send_with_id)

    return middleware
