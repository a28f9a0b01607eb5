"""The SSRF guard on image URLs and webhooks: refused addresses, every redirect checked, no DNS-rebinding window,
an allow-list, limits on redirects, time and bytes; clear 422s through the real server."""

from __future__ import annotations

import asyncio
import gzip
import ipaddress
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from server.errors import InputError
from server.net import guard as net_guard
from server.net.guard import AddressPolicy, guarded_client, refusal_reason
from server.service.inputs import InputLimits, fetch
from tests.conftest import data_uri, image_bytes, start_server

PNG = image_bytes(96, 96)
LIMITS = InputLimits(max_bytes=1_000_000, max_pixels=10_000_000, timeout_s=3.0)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        self.server.hosts.append(self.headers["host"])
        if url.path == "/img.png":
            self._send(200, PNG)
        elif url.path == "/redirect":
            self._redirect(query["to"][0])
        elif url.path == "/loop":
            self._redirect("/loop")
        elif url.path == "/big":  # declares its size
            self._send(200, b"x" * 2_000_000)
        elif url.path == "/big-chunked":  # doesn't: counted as it streams
            self.send_response(200)
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            chunk = b"x" * 100_000
            for _ in range(30):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.write(b"0\r\n\r\n")
        elif url.path == "/gzip-bomb":  # 30 KB on the wire, 30 MB decompressed
            self._send(200, gzip.compress(b"\0" * 30_000_000), {"content-encoding": "gzip"})
        elif url.path == "/slow":  # a byte every 0.5 s: no single read times out, the whole does
            self.send_response(200)
            self.send_header("content-length", "100")
            self.end_headers()
            for _ in range(100):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.5)
        else:
            self._send(404, b"")

    def _send(self, status: int, body: bytes, headers: dict | None = None):
        self.send_response(status)
        for key, value in {"content-length": str(len(body)), **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str):
        self.send_response(302)
        self.send_header("location", location)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


class Site:
    """A loopback HTTP(S) server with the paths above."""

    def __init__(self, tls: ssl.SSLContext | None = None):
        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True
        self.http.hosts = []
        if tls is not None:
            self.http.socket = tls.wrap_socket(self.http.socket, server_side=True)
        self.port = self.http.server_port
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self):
        self.http.shutdown()


@pytest.fixture(scope="module")
def site():
    s = Site()
    yield s
    s.close()


def get(url: str, policy: AddressPolicy, limits: InputLimits = LIMITS, max_redirects: int = 5) -> bytes:
    async def run():
        async with guarded_client(policy, limits.timeout_s, max_redirects) as client:
            return await fetch(client, url, 0, limits)

    return asyncio.run(run())


def refused(url: str, policy: AddressPolicy, **kwargs) -> dict:
    with pytest.raises(InputError) as info:
        get(url, policy, **kwargs)
    return info.value.detail


LOOPBACK = AddressPolicy.parse("127.0.0.1/32")


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("169.254.169.254", "link-local"),  # cloud metadata
        ("fe80::1", "link-local"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fc00::1", "private"),
        ("100.64.0.1", "not globally routable"),  # shared address space (CGNAT)
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("240.0.0.1", "reserved"),
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped
        ("::ffff:169.254.169.254", "link-local"),
        ("2002:7f00:1::", "loopback"),  # 6to4 around 127.0.0.1
        ("64:ff9b::a00:1", "private"),  # NAT64 around 10.0.0.1
        ("8.8.8.8", None),
        ("2001:4860:4860::8888", None),
        ("::ffff:8.8.8.8", None),
    ],
)
def test_refused_address_classes(address, reason):
    found = refusal_reason(ipaddress.ip_address(address))
    assert (found is None) if reason is None else (reason in found)


def test_allow_list_parsing():
    policy = AddressPolicy.parse(" assets.studio.lan, *.render.lan ,10.20.0.0/16, ::1 ,")
    assert policy.host_allowed("ASSETS.studio.lan.") and policy.host_allowed("a.b.render.lan")
    assert not policy.host_allowed("render.lan.evil.com") and not policy.host_allowed("studio.lan")
    assert policy.address_allowed(ipaddress.ip_address("10.20.3.4"))
    assert policy.address_allowed(ipaddress.ip_address("::1"))
    assert not policy.address_allowed(ipaddress.ip_address("10.21.0.1"))


def test_loopback_refused_by_default_and_allowed_by_the_allow_list(site):
    detail = refused(f"{site.url}/img.png", AddressPolicy())
    assert detail["type"] == "url_not_allowed"
    assert "127.0.0.1" in detail["msg"] and "loopback" in detail["msg"] and "FLUX2_FETCH_ALLOW" in detail["msg"]
    assert get(f"{site.url}/img.png", LOOPBACK) == PNG
    assert get(f"http://localhost:{site.port}/img.png", AddressPolicy.parse("localhost")) == PNG


def test_a_refused_name_does_not_tell_the_caller_what_it_resolves_to(site, caplog):
    """Internal DNS stays internal: the caller hears "not allowed", the log says where the name pointed."""
    detail = refused(f"http://localhost:{site.port}/img.png", AddressPolicy())
    assert detail["type"] == "url_not_allowed" and "localhost resolves to an address" in detail["msg"]
    assert "127.0.0.1" not in detail["msg"] and "::1" not in detail["msg"] and "loopback" not in detail["msg"]
    assert "loopback" in caplog.text


def test_metadata_address_refused_without_connecting():
    detail = refused("http://169.254.169.254/latest/meta-data/", AddressPolicy())
    assert detail["type"] == "url_not_allowed" and "link-local" in detail["msg"]


def test_every_redirect_is_checked(site):
    # localhost is allowed by name; its redirect to 127.0.0.1 (not allowed) is refused at the redirect
    allowed_by_name = AddressPolicy.parse("localhost")
    start = f"http://localhost:{site.port}/redirect?to=http://127.0.0.1:{site.port}/img.png"
    detail = refused(start, allowed_by_name)
    assert detail["type"] == "url_not_allowed" and "127.0.0.1" in detail["msg"]
    # a redirect to the metadata service is refused too
    detail = refused(f"{site.url}/redirect?to=http://169.254.169.254/latest/", LOOPBACK)
    assert "link-local" in detail["msg"]
    # and an allowed redirect is followed
    assert get(f"{site.url}/redirect?to=/img.png", LOOPBACK) == PNG


def test_no_dns_rebinding_window(site, monkeypatch, caplog):
    """The address that was checked is the one connected to: a resolver whose answer changes after the check
    changes nothing, and the Host header stays the URL's host name."""
    answers = []

    async def rebinding_getaddrinfo(host, port, **kwargs):
        if host != "assets.test":
            return await real(host, port, **kwargs)
        # first answer allowed (127.0.0.1 is allow-listed), every later one the metadata address
        address = "127.0.0.1" if not answers else "169.254.169.254"
        answers.append(address)
        return [(2, 1, 6, "", (address, port))]

    real = net_guard.anyio.getaddrinfo
    monkeypatch.setattr(net_guard.anyio, "getaddrinfo", rebinding_getaddrinfo)
    assert get(f"http://assets.test:{site.port}/img.png", LOOPBACK) == PNG
    assert answers == ["127.0.0.1"]  # resolved once, for the check, and connected to that address
    assert site.http.hosts[-1] == f"assets.test:{site.port}"
    # the other way round: the checked answer is refused, so nothing is connected to
    answers.clear()
    answers.append("seen")  # next answer: 169.254.169.254
    detail = refused(f"http://assets.test:{site.port}/img.png", LOOPBACK)
    assert detail["type"] == "url_not_allowed" and "assets.test resolves to 169.254.169.254" in caplog.text


def test_https_keeps_the_host_name_for_sni_and_certificate(tmp_path, monkeypatch):
    from server.cli.tls import make_certificates

    paths = make_certificates(["localhost"], tmp_path / "tls")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(paths["cert"], paths["key"])
    secure = Site(tls=context)
    try:
        monkeypatch.setenv("SSL_CERT_FILE", str(paths["ca"]))
        # connected to 127.0.0.1 by address, verified as "localhost": the certificate is for localhost only
        assert get(f"https://localhost:{secure.port}/img.png", AddressPolicy.parse("localhost")) == PNG
    finally:
        secure.close()


def test_limits_on_redirects_bytes_and_time(site):
    detail = refused(f"{site.url}/loop", LOOPBACK, max_redirects=3)
    assert detail["type"] == "file_download_error" and "more than 3 redirects" in detail["msg"]
    for path in ("/big", "/big-chunked", "/gzip-bomb"):
        detail = refused(site.url + path, LOOPBACK)
        assert detail["type"] == "file_too_large", path
    started = time.monotonic()
    slow = InputLimits(max_bytes=1_000_000, max_pixels=10_000_000, timeout_s=1.5)
    detail = refused(f"{site.url}/slow", LOOPBACK, limits=slow)
    assert "within 1.5 s" in detail["msg"] and time.monotonic() - started < 10


@pytest.mark.parametrize("url", ["file:///etc/passwd", "gopher://127.0.0.1/", "ftp://example.com/a.png"])
def test_only_http_https_and_data(url):
    assert refused(url, AddressPolicy())["type"] == "invalid_url"


GOOD = {"prompt": "p", "image_urls": [data_uri(PNG)], "image_size": "square", "seed": 1}


def test_server_refuses_internal_urls_by_default(server, site):
    for url in (f"{site.url}/img.png", "http://169.254.169.254/latest/meta-data/", f"http://[::1]:{site.port}/x"):
        response = server.post("fal-ai/flux-2/flash/edit", {**GOOD, "image_urls": [GOOD["image_urls"][0], url]})
        assert response.status_code == 422, response.text
        [detail] = response.json()["detail"]
        assert detail["loc"] == ["body", "image_urls", 1] and detail["input"] == url
        assert detail["type"] == "url_not_allowed" and "not connect" in detail["msg"]


def test_server_fetches_from_an_allow_listed_network(tiny_weights, tmp_path, site):
    process, url = start_server(
        tiny_weights, tmp_path / "data", tmp_path / "log", env={"FLUX2_FETCH_ALLOW": "127.0.0.1/32"}
    )
    try:
        response = httpx.post(
            f"{url}/fal-ai/flux-2/flash/edit", json={**GOOD, "image_urls": [f"{site.url}/img.png"]}, timeout=120
        )
        assert response.status_code == 200, response.text
        unreachable = httpx.post(
            f"{url}/fal-ai/flux-2/flash/edit", json={**GOOD, "image_urls": ["http://127.0.0.1:1/a.png"]}, timeout=60
        )
        assert unreachable.status_code == 422
        assert unreachable.json()["detail"][0]["type"] == "file_download_error"
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_webhook_urls_are_guarded_too(server):
    refused_hook = server.client.post(
        f"{server.url}/queue/fal-ai/flux-2/flash/edit", params={"fal_webhook": "file:///etc/passwd"}, json=GOOD
    )
    assert refused_hook.status_code == 422
    assert refused_hook.json()["detail"][0]["loc"] == ["query", "fal_webhook"]
    # an internal webhook is refused at submit (a 422 naming the field and why), not accepted and dropped
    internal = server.client.post(
        f"{server.url}/queue/fal-ai/flux-2/flash/edit",
        params={"fal_webhook": "http://169.254.169.254/hook"},
        json=GOOD,
    )
    assert internal.status_code == 422
    detail = internal.json()["detail"][0]
    assert (detail["type"], detail["loc"]) == ("webhook_refused", ["query", "fal_webhook"])
    assert "169.254.169.254" in detail["msg"] and "FLUX2_FETCH_ALLOW" in detail["msg"]  # the caller wrote the address


MALFORMED = ["http://0177.0.0.1/x.png", "http://256.0.0.1/x.png", "http://[::1/x.png", "http://１２７.0.0.1/x.png"]
VERY_LONG = ["http://example.com/" + "x" * 100_000 + ".png", "http://[" + "1:" * 2000 + "]/x.png"]  # refused unresolved


@pytest.mark.parametrize("url", MALFORMED + VERY_LONG, ids=lambda url: url[:24])
def test_malformed_image_urls_are_a_422_naming_the_field(fake_server, url):
    """Not a 500, and queued not run twice into `worker_crashed`: an invalid URL is the caller's error."""
    from tests.conftest import data_uri, image_bytes
    from tests.fake_editor import FakeEditor

    client, _ = fake_server(editor := FakeEditor())
    good = data_uri(image_bytes(64, 64))
    body = {"prompt": "p", "image_urls": [good, url]}
    answer = client.post("/fal-ai/flux-2/flash/edit", json=body)
    assert answer.status_code == 422, (url, answer.text)
    [detail] = answer.json()["detail"]
    assert detail["loc"] == ["body", "image_urls", 1] and detail["type"] == "invalid_url", detail
    assert len(detail["input"]) < 200  # a long URL is echoed shortened
    handle = client.post("/queue/fal-ai/flux-2/flash/edit", json=body).json()
    for _ in range(1000):  # bounded
        status = client.get(handle["status_url"], params={"logs": 1}).json()
        if status["status"] == "COMPLETED":
            break
        time.sleep(0.01)
    assert status["error_type"] == "invalid_url"
    assert not any("re-queued" in line["message"] for line in status["logs"])  # ran once
    result = client.get(handle["response_url"])
    assert result.status_code == 422 and result.json()["detail"][0]["loc"] == ["body", "image_urls", 1]
    assert not editor.calls  # the model never ran
