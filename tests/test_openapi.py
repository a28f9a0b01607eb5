"""/openapi.json documents every route with its schemas; `?endpoint_id=` answers fal's per-endpoint queue document."""

from __future__ import annotations

import pytest

from server.config import Settings
from server.endpoints import ENDPOINTS
from server.http.app import create_app


def _resolve_all(value, schemas: dict) -> None:
    """Every $ref in `value` names a schema the document has."""
    if isinstance(value, dict):
        ref = value.get("$ref")
        if ref is not None:
            assert ref.removeprefix("#/components/schemas/") in schemas, ref
        for item in value.values():
            _resolve_all(item, schemas)
    elif isinstance(value, list):
        for item in value:
            _resolve_all(item, schemas)


def test_every_route_is_documented_with_its_schemas(tiny_weights, tmp_path):
    spec = create_app(Settings(data_dir=tmp_path), tiny_weights, tiny=True).openapi()
    expected = {
        "/health",
        "/ready",
        "/metrics",
        *(f"/{e.endpoint_id}" for e in ENDPOINTS),
        *(f"/queue/{e.endpoint_id}" for e in ENDPOINTS),
        "/queue/fal-ai/flux-2/requests/{request_id}",
        "/queue/fal-ai/flux-2/requests/{request_id}/status",
        "/queue/fal-ai/flux-2/requests/{request_id}/status/stream",
        "/queue/fal-ai/flux-2/requests/{request_id}/cancel",
        "/storage/upload/initiate",
        "/storage/upload/initiate-multipart",
    }
    assert expected <= set(spec["paths"])
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            success = {code: r for code, r in operation["responses"].items() if code.startswith("2")}
            assert success, f"{method} {path} has no success response"
            for code, response in success.items():
                content = response.get("content")
                assert content, f"{method} {path} {code} documents no body"
                assert all(media.get("schema") for media in content.values()), (method, path, code)
            if method == "post" and path.endswith("/edit"):
                body = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
                assert body.endswith(("Flux2EditInput", "Flux2FastEditInput", "Flux2LoraEditInput"))
            if method == "post" and path.endswith(("/fal-ai/flux-2", "/turbo", "/flash", "/lora")):
                body = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
                assert body.endswith(("Flux2TextToImageInput", "Flux2FastTextToImageInput", "Flux2LoraInput"))
    _resolve_all(spec["paths"], spec["components"]["schemas"])
    assert spec["components"]["securitySchemes"]["apiKeyAuth"] == {
        "type": "apiKey",
        "in": "header",
        "name": "Authorization",
        "description": "'Key <key>' (fal's header); needed only when the server has API keys configured.",
    }
    result = spec["paths"]["/queue/fal-ai/flux-2/requests/{request_id}"]["get"]["responses"]["200"]
    assert result["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/EditOutput"}


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=lambda e: e.endpoint_id)
def test_per_endpoint_document_like_fals(server, endpoint):
    eid = endpoint.endpoint_id
    response = server.client.get(f"{server.url}/openapi.json", params={"endpoint_id": eid})
    assert response.status_code == 200
    spec = response.json()
    assert spec["info"]["title"] == f"Queue OpenAPI for {eid}"
    assert spec["info"]["x-fal-metadata"]["endpointId"] == eid
    assert spec["info"]["x-fal-metadata"]["category"] == (
        "image-to-image" if endpoint.takes_images else "text-to-image"
    )
    assert spec["servers"] == [{"url": f"{server.url}/queue"}]
    request = f"/{eid}/requests/{{request_id}}"
    assert set(spec["paths"]) == {
        f"/{eid}",
        request,
        request + "/status",
        request + "/status/stream",
        request + "/cancel",
    }
    schemas = spec["components"]["schemas"]
    _resolve_all(spec["paths"], schemas)
    body = spec["paths"][f"/{eid}"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    model = schemas[body.rsplit("/", 1)[1]]
    # fal's schema names for this endpoint (as in fal-js's types): Flux2EditInput, Flux2TurboEditInput, Flux2Input, ...
    assert body == f"#/components/schemas/{endpoint.schema_name}Input"
    assert model["required"] == (["prompt", "image_urls"] if endpoint.takes_images else ["prompt"])
    assert model["properties"]["guidance_scale"]["maximum"] == 20
    # fal's image_size defaults: the input image's size (base edit), square_hd (turbo/flash edit), landscape_4_3
    # (text to image)
    default_size = {"edit": None, "turbo": "square_hd", "flash": "square_hd"}[endpoint.profile]
    assert model["properties"]["image_size"].get("default") == (
        default_size if endpoint.takes_images else "landscape_4_3"
    )
    if endpoint.profile == "edit":
        assert model["properties"]["num_inference_steps"] == {
            "type": "integer",
            "maximum": 50,
            "minimum": 4,
            "default": 28,
            "title": "Num Inference Steps",
            "description": "The number of inference steps to perform.",
        }
    else:
        assert "num_inference_steps" not in model["properties"]
    assert "Flux2FastEditInput" not in schemas and "EditOutput" not in schemas
    named = {"Flux2EditInput", "Flux2TurboEditInput", "Flux2FlashEditInput", "Flux2Input", "Flux2TurboInput"}
    named |= {"Flux2FlashInput", "Flux2LoraEditInput", "Flux2LoraInput"}
    assert named & set(schemas) == {body.rsplit("/")[-1]}
    assert not {"Flux2TextToImageInput", "Flux2FastTextToImageInput"} & set(schemas)
    if "loras" in model["properties"]:  # the LoRA endpoints: fal's `loras: [LoRAInput]`, at most 3
        loras = model["properties"]["loras"]
        assert loras["maxItems"] == 3 and loras["items"] == {"$ref": "#/components/schemas/LoRAInput"}
        lora = schemas["LoRAInput"]
        assert lora["required"] == ["path"]
        assert lora["properties"]["scale"] | {"title": None, "description": None} == {
            "type": "number",
            "minimum": 0,
            "maximum": 4,
            "default": 1.0,
            "title": None,
            "description": None,
        }
    result = spec["paths"][request]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert result == {"$ref": f"#/components/schemas/{endpoint.schema_name}Output"}
    assert spec["paths"][request + "/status"]["get"]["security"] == [{"apiKeyAuth": []}]
    assert spec["components"]["securitySchemes"]["apiKeyAuth"]["name"] == "Authorization"
    assert "Health" not in schemas  # only what this endpoint's operations use


def test_unknown_endpoint_id_is_a_404_naming_the_served_ones(server):
    response = server.client.get(f"{server.url}/openapi.json", params={"endpoint_id": "fal-ai/flux/dev"})
    assert response.status_code == 404
    assert "fal-ai/flux-2/turbo/edit" in response.json()["detail"]


def test_docs_page_is_served_without_internet(fake_server):
    """/docs loads Swagger UI from this server (swagger-ui-bundle), never from a CDN: air-gapped browsers see it."""
    import re

    from tests.fake_editor import FakeEditor

    client, _ = fake_server(FakeEditor())
    page = client.get("/docs")
    assert page.status_code == 200
    urls = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", page.text)
    assert any(u.endswith("swagger-ui-bundle.js") for u in urls) and any(u.endswith(".css") for u in urls)
    for url in urls:
        assert url.startswith("/"), f"/docs refers to {url}: not served by this server"
        assert client.get(url).status_code == 200, url
