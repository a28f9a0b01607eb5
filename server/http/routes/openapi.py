"""GET /openapi.json: the whole API, or with `?endpoint_id=fal-ai/flux-2/edit` one endpoint's queue API as fal
serves it (fal.ai/api/openapi/queue/openapi.json?endpoint_id=...); and GET /docs, Swagger UI on it
(its assets from the swagger-ui-bundle package under /docs-assets: no CDN).

Both documents come from the same FastAPI-generated schema (itself built from the pydantic models): the
per-endpoint one takes that endpoint's queue operations, puts them at fal's paths (`/{endpoint_id}`,
`/{endpoint_id}/requests/{request_id}[/status|/status/stream|/cancel]`) under a server URL ending in `/queue`, and
keeps only the components they use. fal's shape: `info.x-fal-metadata` (endpointId, category, playgroundUrl,
documentationUrl), `servers`, and an `apiKeyAuth` scheme on the `Authorization` header.
"""

from __future__ import annotations

import copy

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

from server.endpoints import APP_PATH, BY_ID, ENDPOINTS
from server.http.context import services
from server.schemas import EditOutput

router = APIRouter(include_in_schema=False)
SCHEMAS = "#/components/schemas/"

REQUEST = f"/queue/{APP_PATH}/requests/{{request_id}}"
# fal's path (below the queue server URL) <- (this app's path, method)
QUEUE_OPERATIONS = {
    "/{id}/requests/{request_id}/status": (REQUEST + "/status", "get"),
    "/{id}/requests/{request_id}/status/stream": (REQUEST + "/status/stream", "get"),
    "/{id}/requests/{request_id}/cancel": (REQUEST + "/cancel", "put"),
    "/{id}": ("/queue/{id}", "post"),
    "/{id}/requests/{request_id}": (REQUEST, "get"),
}
API_KEY_SCHEME = {
    "type": "apiKey",
    "in": "header",
    "name": "Authorization",
    "description": "'Key <key>' (fal's header); needed only when the server has API keys configured.",
}


def _refs(value, found: set[str]) -> None:
    if isinstance(value, dict):
        ref = value.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
            found.add(ref.rsplit("/", 1)[1])
        for item in value.values():
            _refs(item, found)
    elif isinstance(value, list):
        for item in value:
            _refs(item, found)


def used_schemas(paths: dict, schemas: dict) -> dict:
    """The component schemas `paths` refer to, directly or through other schemas."""
    names: set[str] = set()
    _refs(paths, names)
    pending = list(names)
    while pending:
        found: set[str] = set()
        _refs(schemas[pending.pop()], found)
        pending += sorted(found - names)
        names |= found
    return {name: schemas[name] for name in sorted(names)}


def _renamed(value, names: dict[str, str]):
    """`value` with its schema references renamed as `names` says."""
    if isinstance(value, dict):
        ref = value.get("$ref")
        if isinstance(ref, str) and ref.startswith(SCHEMAS):
            return {**value, "$ref": SCHEMAS + names.get(ref.removeprefix(SCHEMAS), ref.removeprefix(SCHEMAS))}
        return {key: _renamed(item, names) for key, item in value.items()}
    if isinstance(value, list):
        return [_renamed(item, names) for item in value]
    return value


def endpoint_openapi(full: dict, endpoint_id: str, base_url: str) -> dict:
    """fal's per-endpoint queue OpenAPI document for `endpoint_id`, cut from this app's full document; its input
    and output schemas are named as fal names them for this endpoint (`Flux2TurboEditInput`, ...)."""
    endpoint = BY_ID[endpoint_id]
    names = {
        endpoint.input_model.__name__: endpoint.schema_name + "Input",
        EditOutput.__name__: endpoint.schema_name + "Output",
    }
    paths = {}
    for fal_path, (path, method) in QUEUE_OPERATIONS.items():
        operation = copy.deepcopy(full["paths"][path.replace("{id}", endpoint_id)][method])
        operation["security"] = [{"apiKeyAuth": []}]
        paths[fal_path.replace("{id}", endpoint_id)] = {method: _renamed(operation, names)}
    schemas = {names.get(name, name): _renamed(schema, names) for name, schema in full["components"]["schemas"].items()}
    base_url = base_url.rstrip("/")
    return {
        "openapi": full["openapi"],
        "info": {
            "title": f"Queue OpenAPI for {endpoint_id}",
            "version": full["info"]["version"],
            "description": endpoint.summary,
            "x-fal-metadata": {
                "endpointId": endpoint_id,
                "category": endpoint.category,
                "playgroundUrl": f"{base_url}/?endpoint_id={endpoint_id}",
                "documentationUrl": f"{base_url}/docs",
            },
        },
        "servers": [{"url": f"{base_url}/queue"}],
        "paths": paths,
        "components": {
            "schemas": used_schemas(paths, schemas),
            "securitySchemes": {"apiKeyAuth": API_KEY_SCHEME},
        },
    }


@router.get("/openapi.json")
async def openapi(
    request: Request,
    endpoint_id: str | None = Query(None, description="one endpoint's queue API, as fal serves it"),
) -> JSONResponse:
    full = request.app.openapi()
    if endpoint_id is None:
        return JSONResponse(full)
    if endpoint_id not in BY_ID:
        known = ", ".join(e.endpoint_id for e in ENDPOINTS)
        raise HTTPException(404, f"Unknown endpoint_id {endpoint_id!r}; this server serves {known}")
    base_url = services(request).settings.public_url or str(request.base_url)
    return JSONResponse(endpoint_openapi(full, endpoint_id, base_url))


# Swagger UI's script, style and icon, from the swagger-ui-bundle package (FastAPI's documented self-hosting of
# the docs assets): /docs works without internet, like the playground at /.
DOCS_ASSETS = "/docs-assets"
docs_assets = StaticFiles(directory=swagger_ui_path)


@router.get("/docs")
async def docs() -> HTMLResponse:
    """Swagger UI on /openapi.json, every asset served by this server."""
    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title="flux2-server API",
        swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
        swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
        swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png",
    )
