"""`flux2-server serve`: the HTTP API, and (with weights) the model behind it, in this process."""

from __future__ import annotations

import argparse
import ipaddress
import sys

from server.cli.startup import resolve_weights, runtime_problem, settings_from
from server.config import Settings
from server.queue.connect import QueueInUse, local_queue_problem, lock_local_queue


def cmd_serve(args: argparse.Namespace) -> int:
    from server.http.app import create_app
    from server.http.connections import StoppingServer

    settings = settings_from(args)
    if not settings.keys() and not settings.allow_open_api and not is_loopback(settings.host):
        print(
            f"error: refusing to listen on {settings.host} without API keys: anyone who can reach the port could "
            "use the API. Set FLUX2_API_KEYS (or --api-keys-file), or FLUX2_ALLOW_OPEN_API=1 to serve it open "
            "on purpose (SECURITY.md)",
            file=sys.stderr,
        )
        return 2
    if (
        settings.queue
        and settings.queue.startswith(("redis", "unix"))
        and settings.weights is None
        and not settings.tiny
    ):
        weights_dir, tiny = None, False  # the API tier alone: `flux2-server worker` processes run the model
    else:
        resolved = resolve_weights(settings)
        if isinstance(resolved, int):
            return resolved
        weights_dir, tiny = resolved
        problem = runtime_problem(settings, weights_dir)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
    # Before the queue is touched or the model loaded: the queue's lock, the queue's file, then the port (exit 2,
    # which the supervisor does not retry, with the reason)
    try:
        queue_lock = lock_local_queue(settings)
    except QueueInUse as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    problem = local_queue_problem(settings)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    app = create_app(settings, weights_dir, tiny=tiny)
    config = uvicorn_config(app, settings)
    try:
        listening = config.bind_socket()
    except SystemExit:  # uvicorn has logged why (e.g. "[Errno 98] Address already in use")
        print(f"error: cannot listen on {settings.host}:{settings.port}: see the line above", file=sys.stderr)
        return 2
    server = StoppingServer(config, app)
    server.run(sockets=[listening])
    del queue_lock  # held until here
    return 0 if server.started else 3  # 3: uvicorn's own status when it could not start


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or name to listen on) is this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: assume it reaches beyond this machine


def uvicorn_config(app, settings: Settings):
    """How uvicorn serves the app: address, TLS, logging, and the limits on slow and idle clients
    (server/http/connections.py)."""
    import uvicorn

    from server.http.connections import timed_protocol
    from server.logs import logging_config

    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=logging_config(settings.log_format, settings.log_level),
        log_level=settings.log_level,
        ssl_certfile=settings.ssl_certfile,
        ssl_keyfile=settings.ssl_keyfile,
        http=timed_protocol(settings.read_timeout_s),
        limit_concurrency=settings.max_connections,
        # X-Forwarded-For only from configured proxies (uvicorn's default believes any from 127.0.0.1)
        proxy_headers=bool(settings.trusted_proxies),
        forwarded_allow_ips=settings.trusted_proxies or None,
    )
