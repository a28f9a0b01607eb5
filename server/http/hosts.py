"""Without API keys, only requests addressed to this server's own names are served (DNS rebinding).

A web page on `evil.example` can make its name resolve to 127.0.0.1 (DNS rebinding) and then call the open API
on this machine as its own origin: the browser sends `Host: evil.example`. So when no keys are configured, the
Host header must be an IP address (a rebinding needs a name), `localhost` or a name under it (browsers resolve
those to loopback themselves), PUBLIC_URL's host, or a name in FLUX2_ALLOWED_HOSTS; and a request that carries
an `Origin` must come from a page on such a name (or a configured CORS origin). Anything else is refused in
fal's error shape before routing: 400 for the Host, 403 for the Origin.

The URLs the server hands out (`status_url`, `response_url`, `cancel_url`, output and upload file URLs) are built by
`public_base`: from FLUX2_PUBLIC_URL when set; else, with keys, from the Host only when it is one of the names in
FLUX2_ALLOWED_HOSTS, and otherwise from the address the connection arrived on; a made-up Host is never echoed.
"""

from __future__ import annotations

import ipaddress
import json
from urllib.parse import urlsplit

from fastapi import Request

from server.config import Settings, parse_keys
from server.errors import HostNotAllowed, OriginNotAllowed, ServerError
from server.http.context import services


class HostNames:
    def __init__(self, settings: Settings):
        self.names = {name.lower() for name in parse_keys(settings.allowed_hosts)}
        if settings.public_url:
            self.names.add((urlsplit(settings.public_url).hostname or "").lower())
        self.origins = set(parse_keys(settings.cors_origins))

    def allows(self, host: str) -> bool:
        """`host`: a name or address without its port."""
        host = host.lower().strip("[]").rstrip(".")
        try:
            ipaddress.ip_address(host)
            return True
        except ValueError:
            pass
        return host == "localhost" or host.endswith(".localhost") or host in self.names

    @staticmethod
    def host_of(origin: str) -> str:
        return urlsplit(origin).hostname or ""

    def problem(self, host_header: str, origin: str | None) -> ServerError | None:
        if not self.allows(urlsplit(f"//{host_header}").hostname or ""):
            return HostNotAllowed(
                f"Host {host_header!r} is not a name this server is served under (FLUX2_ALLOWED_HOSTS)"
            )
        if origin and origin != "null" and origin not in self.origins and not self.allows(self.host_of(origin)):
            return OriginNotAllowed(f"Requests from pages on {origin!r} are not allowed (FLUX2_CORS_ORIGINS)")
        return None


def host_guard(app, names: HostNames):
    """ASGI middleware: refuse a request whose Host or Origin is not one of `names`."""

    async def middleware(scope, receive, send):
        if scope["type"] == "http":
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            problem = names.problem(headers.get("host", ""), headers.get("origin"))
            if problem is not None:
                answer = problem.answer()
                body = json.dumps(answer.body).encode()
                await send(
                    {
                        "type": "http.response.start",
                        "status": answer.status,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await app(scope, receive, send)

    return middleware


def echoes_host(request: Request) -> bool:
    """Whether the URLs handed out for `request` may name its Host: no FLUX2_PUBLIC_URL, and either no keys (the
    Host passed `host_guard`) or a Host named in FLUX2_ALLOWED_HOSTS (an operator's own name, e.g. a proxy's)."""
    the = services(request)
    if the.settings.public_url:
        return False
    if not the.api_keys:
        return True
    name = (urlsplit("//" + request.headers.get("host", "")).hostname or "").lower().rstrip(".")
    return name in HostNames(the.settings).names


def public_base(request: Request) -> str:
    """The base (no trailing /) of the URLs handed out for `request` (see the module's docstring). The scheme is
    the request's: https behind TLS, or a trusted proxy's X-Forwarded-Proto (FLUX2_TRUSTED_PROXIES)."""
    settings = services(request).settings
    if settings.public_url:
        return settings.public_url.rstrip("/")
    if echoes_host(request):
        return str(request.base_url).rstrip("/")
    scheme = request.url.scheme
    arrived = arrival_netloc(request.scope, scheme) or netloc(scheme, settings.host, settings.port)
    return f"{scheme}://{arrived}{request.scope.get('root_path', '')}".rstrip("/")


def netloc(scheme: str, host: str, port: int | None) -> str:
    """`host[:port]` as a URL names it: an IPv6 address in brackets, the scheme's default port left out."""
    host = f"[{host}]" if ":" in host else host
    return host if port is None or port == {"http": 80, "https": 443}.get(scheme) else f"{host}:{port}"


def arrival_netloc(scope, scheme: str) -> str | None:
    """The address (`host[:port]`) the request's connection arrived on, from the ASGI scope's `server`."""
    server = scope.get("server")
    return netloc(scheme, server[0], server[1]) if server else None
