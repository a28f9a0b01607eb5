"""JSON request bodies, read once and checked for what JSON (RFC 8259) can't carry, on every API route.

Python's `json` (which FastAPI and Starlette parse bodies with) accepts more than JSON: `NaN`, `Infinity` and
`-Infinity`, numbers too large for a float (`1e400` becomes infinity), and `\\ud800`-style escapes of lone UTF-16
surrogates, which no UTF-8 text can hold. A body carrying one would pass a lax schema or fail deep inside (the
422's own echo of the input, the queue's JSON, the prompt encoder) as a 500. `json_body` refuses them at once with
a 422 in FastAPI's shape, `loc` naming the field (`["body", "image_size", "width"]`).

`check_json_body` is a dependency of every API router (server/http/app.py), so a route added there gets the check
whether FastAPI validates its body or the route reads it itself (the queue's submit: `json_body`).
"""

from __future__ import annotations

import math
import re
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError

SURROGATE = re.compile("[\ud800-\udfff]")
ECHO_CHARS = 50  # of a refused string, echoed (escaped) in the error


def _non_finite(value: float) -> str:
    return "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"


def _has_surrogate(text: str) -> bool:
    return not text.isascii() and SURROGATE.search(text) is not None  # isascii() is O(1): data URIs pass at once


def _echo(text: str) -> str:
    return text[:ECHO_CHARS].encode("utf-8", "backslashreplace").decode()


def not_json(data: Any) -> list[dict]:
    """The values in parsed `data` that JSON can't carry, as validation errors naming where they are."""
    errors: list[dict] = []
    stack: list[tuple[tuple[str | int, ...], Any]] = [((), data)]  # no recursion: any depth json.loads returns
    while stack:
        loc, value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            errors.append(
                {
                    "type": "finite_number",
                    "loc": ["body", *loc],
                    "msg": "Input should be a finite number (NaN, Infinity and numbers beyond 1.8e308 are not JSON)",
                    "input": _non_finite(value),
                }
            )
        elif isinstance(value, str) and _has_surrogate(value):
            errors.append(
                {
                    "type": "string_unicode",
                    "loc": ["body", *loc],
                    "msg": "Input should be a valid string: it holds a lone UTF-16 surrogate, which UTF-8 can't encode",
                    "input": _echo(value),
                }
            )
        elif isinstance(value, dict):
            for key, item in value.items():
                if _has_surrogate(key):
                    errors.append(
                        {
                            "type": "string_unicode",
                            "loc": ["body", *loc, _echo(key)],
                            "msg": "Field names must be valid strings: this one holds a lone UTF-16 surrogate",
                            "input": _echo(key),
                        }
                    )
                else:
                    stack.append(((*loc, key), item))
        elif isinstance(value, list):
            stack.extend(((*loc, index), item) for index, item in enumerate(value))
    return sorted(errors, key=lambda error: [str(part) for part in error["loc"]])


async def json_body(request: Request) -> Any:
    """The request's body as JSON: 422 if it isn't JSON, or holds a value JSON can't carry (see `not_json`).
    Parsed once per request (Starlette keeps it: FastAPI's own parse of a validated body is reused)."""
    try:
        data = await request.json()
    except ValueError as exc:  # FastAPI's own answer to a body that isn't JSON (UnicodeDecodeError included)
        error = {"type": "json_invalid", "loc": ["body", 0], "msg": "JSON decode error", "input": {}}
        raise RequestValidationError([{**error, "ctx": {"error": str(exc)}}]) from exc
    errors = not_json(data)
    if errors:
        raise RequestValidationError(errors)
    return data


def _is_json(content_type: str | None) -> bool:
    """FastAPI's rule for a body it parses as JSON: no Content-Type, or application/json or */*+json."""
    if not content_type:
        return True
    media = content_type.split(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def check_json_body(request: Request) -> None:
    """FastAPI dependency on every API route: a JSON body is checked before the route (or its schema) sees it."""
    if _is_json(request.headers.get("content-type")) and await request.body():
        await json_body(request)
