"""Bodies and files, keys and abuse: body and data-URI size limits, file serving that stays in its directory with
honest content types, keys on every API route, per-key rate and concurrency limits (429), CORS closed by default."""

from __future__ import annotations

import socket
import time
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import data_uri, image_bytes, start_server

SMALL = data_uri(image_bytes(96, 96))
GOOD = {"prompt": "p", "image_urls": [SMALL], "image_size": "square", "seed": 1}
SLOW = {**GOOD, "image_size": "square_hd", "num_inference_steps": 40}
FLASH_EDIT = "fal-ai/flux-2/flash/edit"
KEYS = ["key-one", "key-rate", "key-pending", "key-other"]


def auth(key: str) -> dict:
    return {"Authorization": f"Key {key}"}


@pytest.fixture(scope="module")
def limited(tiny_weights, tmp_path_factory):
    root = tmp_path_factory.mktemp("limited")
    env = {
        "FLUX2_API_KEYS": ",".join(KEYS),
        "FLUX2_MAX_BODY_BYTES": "300000",
        "FLUX2_MAX_UPLOAD_BYTES": "600000",
        "FLUX2_MAX_INPUT_IMAGE_BYTES": "100000",
        "FLUX2_RATE_LIMIT": "20/minute",
        "FLUX2_MAX_PENDING_PER_KEY": "2",
    }
    process, url = start_server(tiny_weights, root / "data", root / "log", env=env)
    with httpx.Client(base_url=url, timeout=120) as client:
        yield client
    process.terminate()
    process.wait(timeout=30)


def test_oversized_bodies_are_refused_with_413(limited):
    big = {**GOOD, "prompt": "x" * 400_000}
    declared = limited.post("/fal-ai/flux-2/flash/edit", json=big, headers=auth("key-one"))
    assert declared.status_code == 413 and "detail" in declared.json()

    def chunks():  # no Content-Length: counted as it streams
        for _ in range(40):
            yield b"x" * 10_000

    streamed = limited.post(
        "/queue/fal-ai/flux-2/flash/edit",
        content=chunks(),
        headers={**auth("key-one"), "content-type": "application/json"},
    )
    assert streamed.status_code == 413
    assert limited.get("/health").status_code == 200


def test_uploads_have_their_own_limit(limited):
    target = limited.post(
        "/storage/upload/initiate", json={"content_type": "image/png"}, headers=auth("key-one")
    ).json()
    path = urlsplit(target["upload_url"]).path
    assert limited.put(path, content=b"x" * 500_000).status_code == 200  # over the body limit, under the upload one
    target = limited.post(
        "/storage/upload/initiate", json={"content_type": "image/png"}, headers=auth("key-one")
    ).json()
    assert limited.put(urlsplit(target["upload_url"]).path, content=b"x" * 700_000).status_code == 413


def test_data_uri_over_the_image_limit_is_a_422(limited):
    big = "data:image/bmp;base64," + "A" * 200_000  # 150 KB decoded: under the body limit, over the image limit
    response = limited.post("/fal-ai/flux-2/flash/edit", json={**GOOD, "image_urls": [big]}, headers=auth("key-one"))
    assert response.status_code == 422
    [detail] = response.json()["detail"]
    assert detail["loc"] == ["body", "image_urls", 0] and detail["type"] == "file_too_large"
    assert "100000 bytes" in detail["msg"] and len(detail["input"]) < 200


def test_every_api_route_needs_a_key(limited):
    spec = limited.get("/openapi.json").json()  # the API's description is public, like fal's
    # operational routes stay open (load balancers, Prometheus, the playground page, which asks for a key itself)
    open_paths = {"/health", "/ready", "/metrics", "/", "/.well-known/jwks.json"}  # + the webhook key
    checked = 0
    for path, methods in spec["paths"].items():
        for method in methods:
            concrete = path.replace("{request_id}", "00000000-0000-0000-0000-000000000000")
            concrete = concrete.replace("{token}", "not-a-token").replace("{part_number}", "1")
            response = limited.request(method, concrete, json=GOOD)
            if path in open_paths:
                assert response.status_code == 200
            elif "{token}" in path:  # one-time upload URLs: the unguessable token is the permission (presigned)
                assert response.status_code in (404, 422)  # unknown token, or the completion body refused
            else:
                assert response.status_code == 401, (method, path, response.status_code)
                assert response.headers["www-authenticate"] == "Key"
                checked += 1
    assert checked >= 10
    # the same routes under the endpoint's own path, the queue host form and the proxy
    assert limited.get("/queue/fal-ai/flux-2/edit/requests/x/status").status_code == 401
    assert limited.post("/fal-ai/flux-2/edit", json=GOOD, headers={"host": "queue.localhost"}).status_code == 401
    proxied = limited.post(
        "/api/fal/proxy", json=GOOD, headers={"x-fal-target-url": "https://fal.run/fal-ai/flux-2/flash/edit"}
    )
    assert proxied.status_code == 401
    assert limited.put("/storage/upload/put/not-a-token", content=b"x").status_code == 404  # the token is the key
    assert limited.get("/docs").status_code == 200


def test_rate_limit_per_key(limited):
    status = "/queue/fal-ai/flux-2/requests/00000000-0000-0000-0000-000000000000/status"
    codes = [limited.get(status, headers=auth("key-rate")).status_code for _ in range(20)]
    assert codes == [404] * 20
    refused = limited.get(status, headers=auth("key-rate"))
    assert refused.status_code == 429
    assert "20 per 1 minute" in refused.json()["detail"] and int(refused.headers["retry-after"]) >= 1
    assert limited.get(status, headers=auth("key-other")).status_code == 404  # other keys are not affected


def test_concurrency_limit_per_key(limited):
    submit = "/queue/fal-ai/flux-2/edit"
    first, second = (limited.post(submit, json=SLOW, headers=auth("key-pending")).json() for _ in range(2))
    third = limited.post(submit, json=SLOW, headers=auth("key-pending"))
    assert third.status_code == 429 and "at most 2 queued or running" in third.json()["detail"]
    sync = limited.post("/fal-ai/flux-2/flash/edit", json=GOOD, headers=auth("key-pending"))
    assert sync.status_code == 429
    other = limited.post(submit, json=GOOD, headers=auth("key-other"))
    assert other.status_code == 200
    # a completed (here: cancelled) request frees its place
    for handle in (first, second):
        limited.put(urlsplit(handle["cancel_url"]).path, headers=auth("key-pending"))
    for _ in range(12):  # slowly: status polls count against the key's rate limit (20/minute) too
        time.sleep(1)
        polled = limited.get(urlsplit(first["status_url"]).path, headers=auth("key-pending"))
        if polled.json()["status"] == "COMPLETED":
            break
    assert polled.json()["status"] == "COMPLETED"
    again = limited.post(submit, json=GOOD, headers=auth("key-pending"))
    assert again.status_code == 200, again.text


def raw_get(url: str, path: str) -> tuple[int, bytes]:
    """A GET with the path exactly as given (httpx would normalise dot segments away)."""
    host, port = urlsplit(url).hostname, urlsplit(url).port
    with socket.create_connection((host, port), timeout=10) as conn:
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1]), data


@pytest.mark.parametrize(
    "path",
    [
        "/files/../queue.sqlite3",
        "/files/..%2fqueue.sqlite3",
        "/files/%2e%2e/queue.sqlite3",
        "/files/%2e%2e%2fqueue.sqlite3",
        "/files/..%5cqueue.sqlite3",
        "/files//etc/passwd",
        "/files/%2fetc%2fpasswd",
        "/files/../../../../etc/passwd",
        "/files/",
        "/files",
    ],
)
def test_file_serving_stays_in_its_directory_and_lists_nothing(server, path):
    status, data = raw_get(server.url, path)
    assert status in (307, 400, 404), (path, status)
    assert b"SQLite format" not in data and b"root:" not in data


def test_served_files_have_their_type_and_uploads_cannot_be_pages(server):
    out = server.post("fal-ai/flux-2/flash/edit", GOOD).json()["images"][0]
    served = server.client.get(out["url"])
    assert served.headers["content-type"] == "image/png"
    assert served.headers["x-content-type-options"] == "nosniff"
    assert "sandbox" in served.headers["content-security-policy"]
    for content_type in ("text/html", "image/svg+xml", "application/javascript"):
        target = server.client.post(
            f"{server.url}/storage/upload/initiate", json={"content_type": content_type, "file_name": "x"}
        ).json()
        assert target["file_url"].endswith(".bin")
        server.client.put(target["upload_url"], content=b"<script>alert(1)</script>")
        page = server.client.get(target["file_url"])
        assert page.status_code == 200 and page.headers["content-type"] == "application/octet-stream"
        assert page.headers["x-content-type-options"] == "nosniff"


def test_cors_is_closed_by_default(server):
    origin = {"Origin": "https://evil.example"}
    preflight = server.client.options(
        f"{server.url}/fal-ai/flux-2/flash/edit",
        headers={**origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"},
    )
    assert "access-control-allow-origin" not in preflight.headers
    assert preflight.status_code in (403, 404, 405)  # 403: without keys, another site's page is refused outright
    answer = server.client.get(f"{server.url}/health", headers=origin)
    assert "access-control-allow-origin" not in answer.headers


def test_multipart_uploads_stay_within_the_upload_limit(fake_server):
    """A part over the upload's limit (with its other parts) or over the pending parts' limit is refused (413) and
    not kept; `complete` never writes more than FLUX2_MAX_UPLOAD_BYTES."""
    from tests.fake_editor import FakeEditor

    client, app = fake_server(FakeEditor(), max_upload_bytes=600_000, max_pending_upload_bytes=700_000)
    store = app.state.services.store

    def begin() -> str:
        target = client.post("/storage/upload/initiate-multipart", json={"content_type": "image/png"}).json()
        return urlsplit(target["upload_url"]).path

    def complete(path: str, numbers: list[int]) -> httpx.Response:
        parts = [{"partNumber": n, "etag": "e"} for n in numbers]
        return client.post(f"{path}/complete", json={"parts": parts})

    first, second = begin(), begin()
    assert client.put(f"{first}/1", content=b"x" * 400_000).status_code == 200
    refused = client.put(f"{first}/2", content=b"x" * 400_000)  # 800 000 in all: over the upload's limit
    assert refused.status_code == 413 and "FLUX2_MAX_UPLOAD_BYTES" in refused.json()["detail"]
    assert store.upload_part_sizes(first.rsplit("/", 1)[1]) == {1: 400_000}  # the refused part was not kept
    assert client.put(f"{first}/1", content=b"x" * 500_000).status_code == 200  # sent again: replaces part 1
    pending = client.put(f"{second}/1", content=b"x" * 300_000)  # 800 000 pending in all: over that limit
    assert pending.status_code == 413 and "pending" in pending.json()["detail"]
    assert store.pending_upload_bytes() == 500_000
    assert complete(first, [1, 2]).status_code == 422  # part 2 was never kept
    assert complete(first, [1]).status_code == 200

    # parts sent at the same time can pass the limit together: `complete` refuses them and forgets the upload
    third = begin()
    token = third.rsplit("/", 1)[1]
    store.add_upload_part(token, 1, b"x" * 400_000)
    store.add_upload_part(token, 2, b"x" * 400_000)
    assert complete(third, [1, 2]).status_code == 413
    assert store.get_upload(token) is None
    written = [p for p in (app.state.services.settings.data_dir / "files").iterdir() if p.name.startswith("upload-")]
    assert [p.stat().st_size for p in written] == [500_000]


def test_own_files_used_as_inputs_are_sized_before_they_are_read(fake_server, monkeypatch):
    from server.files.storage import LocalStorage
    from tests.fake_editor import FakeEditor

    client, app = fake_server(FakeEditor(), max_input_image_bytes=100_000)
    files = app.state.services.settings.data_dir / "files"
    (files / "big.png").write_bytes(image_bytes(400, 400, fmt="BMP"))  # ~480 KB
    monkeypatch.setattr(LocalStorage, "get", lambda *args: pytest.fail("the whole file was read"))
    body = {**GOOD, "image_urls": [f"{client.base_url}/files/big.png"]}
    refused = client.post("/fal-ai/flux-2/flash/edit", json=body)
    assert refused.status_code == 422, refused.text
    assert refused.json()["detail"][0]["type"] == "file_too_large"
    (files / "small.png").write_bytes(image_bytes(64, 64))
    body = {**GOOD, "image_urls": [f"{client.base_url}/files/small.png"]}
    assert client.post("/fal-ai/flux-2/flash/edit", json=body).status_code == 200


@pytest.fixture
def uvicorn_server(tmp_path, monkeypatch):
    """The app over the fake editor, served by uvicorn as `serve` configures it (server.cli.serve.uvicorn_config),
    in a thread: call it with settings, get the port."""
    import threading

    import uvicorn

    from server.cli.serve import uvicorn_config
    from server.config import Settings
    from server.http.app import create_app
    from server.service import model as service_model
    from tests.conftest import free_port
    from tests.fake_editor import FakeEditor

    monkeypatch.setattr(service_model, "load_model", lambda *args: FakeEditor())
    running = []

    def start(**options) -> int:
        port = free_port()
        settings = Settings(data_dir=tmp_path / "data", port=port, **options)
        server = uvicorn.Server(uvicorn_config(create_app(settings, tmp_path / "weights"), settings))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        running.append((server, thread))
        for _ in range(600):  # bounded: the server starts
            if server.started:
                return port
            time.sleep(0.05)
        raise AssertionError("the server did not start")

    yield start
    for server, thread in running:
        server.should_exit = True
        thread.join(timeout=30)


def test_idle_and_slow_clients_are_closed_and_connections_capped(uvicorn_server):
    """A connection that sends nothing, or stops halfway through its body, is closed after FLUX2_READ_TIMEOUT_S;
    beyond FLUX2_MAX_CONNECTIONS, requests are answered 503; once the idle ones are gone, the server serves."""
    port = uvicorn_server(read_timeout_s=0.5, max_connections=5)
    slow = socket.create_connection(("127.0.0.1", port))
    slow.sendall(b"POST /queue/fal-ai/flux-2/flash/edit HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n{")
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        assert client.get("/health").status_code == 503  # 5 connections open: at the cap
        for sock in [slow, *idle]:  # each is closed by the server (end of stream, no answer), not kept
            sock.settimeout(30)
            assert sock.recv(1024) == b""
            sock.close()
        assert client.get("/health").status_code == 200


def test_forwarded_for_is_believed_only_from_configured_proxies(uvicorn_server):
    """Without keys the rate limit counts client addresses: an X-Forwarded-For from loopback must not make each
    request a new client."""
    port = uvicorn_server(rate_limit="2/minute")
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        answers = [
            client.post(
                "/storage/upload/initiate",
                json={"content_type": "image/png"},
                headers={"X-Forwarded-For": f"10.0.0.{n}"},
            ).status_code
            for n in range(3)
        ]
    assert answers == [200, 200, 429]


def test_without_keys_only_the_servers_own_names_are_served(fake_server):
    """DNS rebinding: a page on evil.example whose name resolves to 127.0.0.1 calls the open API as Host
    evil.example; refused (400), as is a request from such a page's Origin (403). With keys, keys decide."""
    from tests.fake_editor import FakeEditor

    client, _ = fake_server(FakeEditor(), public_url="https://flux.studio.lan")
    rebound = client.get("/health", headers={"host": "evil.example:8000"})
    assert rebound.status_code == 400 and rebound.json()["detail"].startswith("Host 'evil.example:8000'")
    for host in ("127.0.0.1:8000", "[::1]:8000", "localhost", "queue.localhost:8000", "flux.studio.lan", "testserver"):
        assert client.get("/health", headers={"host": host}).status_code == 200, host
    framed = client.post(f"/queue/{FLASH_EDIT}", json=GOOD, headers={"origin": "http://evil.example"})
    assert framed.status_code == 403 and "evil.example" in framed.json()["detail"]
    assert client.get("/health", headers={"origin": "http://localhost:5173"}).status_code == 200

    keyed, _ = fake_server(FakeEditor(), api_keys="k")
    assert keyed.get("/health", headers={"host": "evil.example"}).status_code == 200


def test_the_playground_cannot_be_framed(fake_server):
    from tests.fake_editor import FakeEditor

    client, _ = fake_server(FakeEditor())
    page = client.get("/")
    assert page.status_code == 200 and page.headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]


def test_an_upload_url_is_used_once_even_by_concurrent_puts(fake_server, monkeypatch):
    """Two PUTs to one upload URL at once: the first to finish it stands; the other is told 409, not 200, and
    does not overwrite it."""
    from server.http.routes import storage as storage_routes
    from tests.fake_editor import FakeEditor

    client, app = fake_server(FakeEditor())
    services = app.state.services
    target = client.post("/storage/upload/initiate", json={"content_type": "image/png"}).json()
    path, name = urlsplit(target["upload_url"]).path, target["file_url"].rsplit("/", 1)[1]
    real_read = storage_routes._read_limited

    async def read_while_another_put_finishes(request, limit, too_large):
        data = await real_read(request, limit, too_large)
        # meanwhile the other PUT (on this front-end or another) read its body and finished the upload
        assert services.store.remove_upload(path.rsplit("/", 1)[1])
        services.outputs.storage.put(name, b"second", "image/png")
        return data

    monkeypatch.setattr(storage_routes, "_read_limited", read_while_another_put_finishes)
    first = client.put(path, content=b"first")
    assert first.status_code == 409 and first.json()["detail"].startswith("This upload URL was already used")
    assert (services.settings.data_dir / "files" / name).read_bytes() == b"second"


def test_with_keys_urls_come_from_configuration_not_the_host_header(fake_server):
    """A request with a valid key and `Host: evil.example` gets URLs (status, result, cancel, output files,
    uploads) naming this server: FLUX2_PUBLIC_URL when set, else the address it was reached on; a Host the operator
    listed (FLUX2_ALLOWED_HOSTS, e.g. a proxy's name) is used as sent."""
    import time

    from tests.fake_editor import FakeEditor

    key = {"Authorization": "Key k"}

    def urls_for(client, host: str) -> list[str]:
        headers = {**key, "host": host}
        submit = f"/{FLASH_EDIT}" if host.startswith("queue.") else f"/queue/{FLASH_EDIT}"  # fal's queue-host form
        handle = client.post(submit, json=GOOD, headers=headers).json()
        request_path = f"/queue/fal-ai/flux-2/requests/{handle['request_id']}"
        for _ in range(1000):  # bounded
            status = client.get(request_path + "/status", headers=headers).json()
            if status["status"] == "COMPLETED":
                break
            time.sleep(0.01)
        result = client.get(request_path, headers=headers).json()
        upload = client.post("/storage/upload/initiate", json={"content_type": "image/png"}, headers=headers).json()
        spec = client.get("/openapi.json", params={"endpoint_id": FLASH_EDIT}, headers={"host": host}).json()
        return [
            *(handle[name] for name in ("status_url", "response_url", "cancel_url")),
            *(status[name] for name in ("status_url", "response_url", "cancel_url")),
            result["images"][0]["url"],
            upload["upload_url"],
            upload["file_url"],
            spec["servers"][0]["url"],
        ]

    client, _ = fake_server(FakeEditor(), api_keys="k")  # reached as http://testserver
    for url in urls_for(client, "evil.example"):
        assert url.startswith("http://testserver/") and "evil.example" not in url, url
    # fal's JS client, through the proxy path, follows those URLs whatever name it reached the server under
    handle = client.post(f"/queue/{FLASH_EDIT}", json=GOOD, headers={**key, "host": "gpu-box:8000"}).json()
    proxied_status = {**key, "host": "gpu-box:8000", "x-fal-target-url": handle["status_url"]}
    assert client.get("/api/fal/proxy", headers=proxied_status).json()["request_id"] == handle["request_id"]
    for url in urls_for(client, "queue.evil.example"):  # a made-up queue host: this server's /queue/ form
        assert url.startswith("http://testserver/") and "evil" not in url, url
    assert urls_for(client, "queue.evil.example")[0].startswith("http://testserver/queue/fal-ai/flux-2/requests/")

    proxied, _ = fake_server(FakeEditor(), api_keys="k", public_url="https://flux.studio.lan/api")
    for url in urls_for(proxied, "evil.example"):
        assert url.startswith("https://flux.studio.lan/api/"), url

    named, _ = fake_server(FakeEditor(), api_keys="k", allowed_hosts="flux.studio.lan,queue.flux.studio.lan")
    assert all(url.startswith("http://flux.studio.lan/") for url in urls_for(named, "flux.studio.lan"))
    queue_host = urls_for(named, "queue.flux.studio.lan")  # a listed queue host: fal's form under it
    assert queue_host[0].startswith("http://queue.flux.studio.lan/fal-ai/flux-2/requests/")
    for url in urls_for(named, "evil.example"):
        assert url.startswith("http://testserver/"), url


def test_an_output_larger_than_the_configured_limit_is_a_422_naming_image_size(fake_server):
    """FLUX2_MAX_OUTPUT_PIXELS: sync and queued, the default size of text to image (1024x768) over a 512² limit is
    refused before the model runs; a size within it runs."""
    from tests.fake_editor import FakeEditor

    editor = FakeEditor()
    client, _ = fake_server(editor, max_output_pixels=512 * 512)
    sync = client.post("/fal-ai/flux-2/flash", json={"prompt": "p"})
    assert sync.status_code == 422, sync.text
    [detail] = sync.json()["detail"]
    assert detail["loc"] == ["body", "image_size"] and detail["type"] == "image_too_large"
    assert "FLUX2_MAX_OUTPUT_PIXELS" in detail["msg"]
    queued = client.post("/queue/fal-ai/flux-2/flash", json={"prompt": "p"}).json()
    deadline = time.monotonic() + 10
    while client.get(queued["status_url"].replace("http://testserver", "")).json()["status"] != "COMPLETED":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    result = client.get(queued["response_url"].replace("http://testserver", ""))
    assert result.status_code == 422 and result.json()["detail"][0]["loc"] == ["body", "image_size"]
    assert editor.calls == []
    fits = client.post("/fal-ai/flux-2/flash", json={"prompt": "p", "image_size": "square"})
    assert fits.status_code == 200, fits.text
