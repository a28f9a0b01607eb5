"""Prometheus metrics at GET /metrics (open, like /health; see server/service/metrics.py for what is measured)."""

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

from server.http.context import services

router = APIRouter(tags=["health"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_PLAIN_0_0_4: {"schema": {"type": "string"}}}}},
)
async def metrics(request: Request) -> Response:
    """The Prometheus text exposition format."""
    return Response(generate_latest(services(request).metrics.registry), media_type=CONTENT_TYPE_PLAIN_0_0_4)
