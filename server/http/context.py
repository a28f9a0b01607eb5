"""The process's services, as a route reaches them: `services(request)` (set by the app's lifespan)."""

from __future__ import annotations

from fastapi import Request

from server.process import Services


def services(request: Request) -> Services:
    return request.app.state.services
