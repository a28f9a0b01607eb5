"""`flux2-server serve`: the HTTP API, and (with weights) the model behind it, in this process."""

from __future__ import annotations

import argparse
import sys

from server.cli.startup import resolve_weights, runtime_problem, settings_from
from server.config import Settings


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.http.app import create_app

    settings = settings_from(args)
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
    app = create_app(settings, weights_dir, tiny=tiny)
    server = uvicorn.Server(uvicorn_config(app, settings))
    server.run()
    return 0 if server.started else 3  # 3: uvicorn's own status when it could not start (the port taken, say)


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
    )
