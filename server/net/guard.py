"""Outbound HTTP that can't be turned against the network the server sits in (a guard against SSRF).

The server opens connections to URLs its callers choose: input images (`image_urls`) and webhooks
(`fal_webhook`). Every such connection goes through `GuardedBackend.connect_tcp`, an httpcore network backend:
it resolves the host itself, refuses any address that is loopback, link-local (cloud metadata services such as
169.254.169.254 live there), private, shared (CGNAT), multicast, reserved, unspecified or otherwise not globally
routable (IPv4 and IPv6, including IPv4 addresses embedded in IPv6: mapped, 6to4, Teredo, NAT64), and then
connects to the very address it checked. There is no second DNS lookup between check and connect, so a DNS answer
that changes in between (DNS rebinding) changes nothing. Redirects open new connections through the same backend,
so each hop is checked. TLS still verifies the certificate for, and sends SNI of, the URL's host name; the Host
header is the URL's.

Studios whose assets live on internal servers allow-list them: host names (exact, or `*.example.lan` for a
domain's subdomains) and networks in CIDR form (`10.20.0.0/16`, `127.0.0.1/32`).

httpx's `AsyncHTTPTransport` takes no network backend, so `GuardedTransport` builds httpx's transport and swaps
in an httpcore pool that uses this backend; everything else (request/response mapping, redirects, timeouts,
errors) is httpx's own code. The tests in tests/test_ssrf.py fail if that swap ever stops taking effect.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Iterable
from dataclasses import dataclass

import anyio
import httpcore
import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
NAT64 = ipaddress.ip_network("64:ff9b::/96")
log = logging.getLogger(__name__)
ALLOW_SETTING = "FLUX2_FETCH_ALLOW"


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


class AddressRefused(Exception):
    """A URL's host resolves only to addresses the server must not connect to. The message says which and why."""


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped:
        return ip.ipv4_mapped
    if ip.sixtofour:
        return ip.sixtofour
    if ip.teredo:
        return ip.teredo[1]
    if ip in NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def refusal_reason(ip: IPAddress) -> str | None:
    """Why a connection to `ip` is refused by default, or None if it is a public address."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            reason = refusal_reason(embedded)
            return f"{reason} (embedded in {ip})" if reason else None
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address (where cloud metadata services live)"
    if ip.is_multicast:
        return "a multicast address"
    if ip.is_reserved:
        return "a reserved address"
    if ip.is_private:
        return "a private address"
    if not ip.is_global:
        return "an address that is not globally routable"
    return None


@dataclass(frozen=True)
class AddressPolicy:
    """Which addresses outbound connections may reach: public ones, plus an allow-list of hosts and networks."""

    hosts: tuple[str, ...] = ()  # exact names, or "*.domain" for its subdomains
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, allow: str | None) -> AddressPolicy:
        """From the FLUX2_FETCH_ALLOW setting: comma-separated host names and CIDR networks."""
        hosts, networks = [], []
        for entry in (e.strip() for e in (allow or "").split(",")):
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                hosts.append(entry.lower().rstrip("."))
        return cls(tuple(hosts), tuple(networks))

    def host_allowed(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        return any(host == h or (h.startswith("*.") and host.endswith(h[1:])) for h in self.hosts)

    def address_allowed(self, ip: IPAddress) -> bool:
        return any(ip.version == n.version and ip in n for n in self.networks)

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        """The addresses of `host` that may be connected to, in resolver order; AddressRefused if none."""
        try:
            infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise httpcore.ConnectError(f"cannot resolve {host!r}: {exc}") from exc
        addresses: list[IPAddress] = []
        for *_, sockaddr in infos:
            ip = ipaddress.ip_address(str(sockaddr[0]).partition("%")[0])
            if ip not in addresses:
                addresses.append(ip)
        if self.host_allowed(host):
            return addresses
        allowed = [ip for ip in addresses if self.address_allowed(ip) or refusal_reason(ip) is None]
        if not allowed:
            ip = addresses[0]
            detail = f"{host} resolves to {ip}, {refusal_reason(ip)}, which this server does not connect to"
            if _is_address(host):  # the caller wrote the address: saying why reveals nothing
                raise AddressRefused(f"{detail} (allow it with {ALLOW_SETTING})")
            log.warning("outbound URL refused: %s", detail)  # what the name resolves to stays in the log
            raise AddressRefused(
                f"{host} resolves to an address this server does not connect to (allow it with {ALLOW_SETTING})"
            )
        return allowed


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's anyio backend, connecting only to addresses the policy allows, by address."""

    def __init__(self, policy: AddressPolicy):
        self.policy = policy
        self._backend = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            with anyio.fail_after(timeout):
                addresses = await self.policy.resolve(host, port)
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(f"resolving {host!r} timed out") from exc
        failure: Exception | None = None
        for ip in addresses:
            try:
                return await self._backend.connect_tcp(
                    str(ip), port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None
        raise failure

    async def connect_unix_socket(self, path: str, timeout=None, socket_options=None):
        raise AddressRefused("unix sockets are not reachable from URLs")

    async def sleep(self, seconds: float) -> None:
        await self._backend.sleep(seconds)


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport over a connection pool whose every TCP connection goes through `GuardedBackend`."""

    def __init__(self, policy: AddressPolicy):
        super().__init__()
        # httpx exposes no `network_backend` argument; the pool it built above is replaced by the same pool with
        # the guarded backend (the ssl context is httpx's default one: certifi, or SSL_CERT_FILE when set).
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=5.0)  # httpx's
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=GuardedBackend(policy),
        )


def guarded_client(policy: AddressPolicy, timeout_s: float, max_redirects: int) -> httpx.AsyncClient:
    """The client for every URL a caller chose. Proxy environment variables are ignored (trust_env=False): through
    a proxy the address actually reached could not be checked."""
    return httpx.AsyncClient(
        transport=GuardedTransport(policy),
        follow_redirects=True,
        max_redirects=max_redirects,
        timeout=timeout_s,
        trust_env=False,
    )
