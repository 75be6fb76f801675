"""SSRF-safe HTTP(S) fetching of untrusted URLs with byte, time and redirect limits.

Every hop (the first URL and each redirect target) is checked before any connection is made:

- the scheme must be allowed (http/https only here; data:/file: are handled by `api.media`);
- the host must match the domain allowlist, when one is configured;
- the host is resolved here (getaddrinfo in a worker thread) and *every* resolved address must be public
  unless private networks are allowed; the connection then goes to one of those checked addresses (the URL
  is rewritten to the IP literal, the Host header and TLS SNI/certificate check keep the original name), so a
  second DNS answer cannot swap in an internal address (DNS rebinding).

Environment proxies are ignored (`trust_env=False`): a proxy would connect to names we did not check.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

HTTP_SCHEMES = frozenset({"http", "https"})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_USER_AGENT = "infinitevl-serve/0.1 (media fetcher)"


@dataclass(frozen=True)
class FetchPolicy:
    """Where a fetch may go. Schemes outside http/https are never fetched here."""

    allowed_schemes: frozenset[str] = HTTP_SCHEMES
    allowed_domains: frozenset[str] | None = None  # None: any; "*.example.com" also matches subdomains
    allow_private_networks: bool = False
    max_redirects: int = 3


class FetchError(Exception):
    """A refused or failed fetch; `status_code` is 413 for size limits, 400 otherwise."""

    def __init__(self, message: str, status_code: int = 400):
        super().__init__(message)
        self.message = message
        self.status_code = status_code


@dataclass(frozen=True)
class _Hop:
    """One checked URL: the parsed URL and its host in ASCII (IDNA) form."""

    url: httpx.URL
    host: str  # lower-case ASCII host, no brackets for IPv6


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address tunnelled inside an IPv6 one (mapped, 6to4, Teredo client, NAT64), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_public_address(ip: IPAddress) -> bool:
    """True only for globally routable unicast addresses.

    Refuses loopback, private (RFC 1918, ULA), link-local (incl. 169.254.169.254 cloud metadata), CGNAT
    (100.64/10), multicast, reserved, unspecified and documentation ranges, and IPv6 forms that embed such
    an IPv4 address (::ffff:127.0.0.1, 6to4, Teredo, NAT64).
    """
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return False
        inner = _embedded_ipv4(ip)
        if inner is not None and not is_public_address(inner):
            return False
        if ip.is_site_local:
            return False
    flags = (ip.is_private, ip.is_loopback, ip.is_link_local, ip.is_multicast, ip.is_reserved)
    return ip.is_global and not ip.is_unspecified and not any(flags)


def host_allowed(host: str, allowed_domains: Iterable[str] | None) -> bool:
    """Allowlist match: exact host name, or any subdomain for an entry written "*.example.com"."""
    if allowed_domains is None:
        return True
    host = host.lower().rstrip(".")
    for entry in allowed_domains:
        entry = entry.lower().rstrip(".")
        if entry.startswith("*."):
            if host.endswith(entry[1:]) or host == entry[2:]:
                return True
        elif host == entry:
            return True
    return False


def resolve_addresses(host: str, port: int) -> list[IPAddress]:
    """Blocking DNS resolution (run it in a thread); IPv6 scope ids are kept so they can be refused."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: list[IPAddress] = []
    for *_, sockaddr in infos:
        ip = ipaddress.ip_address(sockaddr[0])
        if isinstance(ip, ipaddress.IPv6Address) and len(sockaddr) >= 4 and sockaddr[3]:
            ip = ipaddress.IPv6Address(f"{sockaddr[0].split('%')[0]}%{sockaddr[3]}")
        if ip not in addresses:
            addresses.append(ip)
    return addresses


def check_url(url: str | httpx.URL, policy: FetchPolicy) -> _Hop:
    """Parse and check scheme, credentials and domain of one hop (no network access)."""
    try:
        parsed = httpx.URL(url)
        host = parsed.raw_host.decode("ascii").lower()
    except (httpx.InvalidURL, UnicodeError, TypeError) as exc:
        raise FetchError("invalid media URL") from exc
    allowed = policy.allowed_schemes & HTTP_SCHEMES
    if parsed.scheme not in allowed:
        raise FetchError(
            f"URL scheme '{parsed.scheme}' is not allowed for media (allowed: {sorted(allowed)})"
        )
    if not host:
        raise FetchError("media URL has no host")
    if parsed.userinfo:
        raise FetchError("credentials in media URLs are not allowed")
    if not host_allowed(host, policy.allowed_domains):
        raise FetchError(f"media domain '{host}' is not in the allowed domains")
    return _Hop(url=parsed, host=host)


async def checked_addresses(hop: _Hop, policy: FetchPolicy) -> list[IPAddress]:
    """Resolve the hop's host; every address must be public unless private networks are allowed."""
    port = hop.url.port or (443 if hop.url.scheme == "https" else 80)
    try:
        addresses = await asyncio.to_thread(resolve_addresses, hop.host, port)
    except (OSError, UnicodeError, ValueError) as exc:
        raise FetchError(f"could not resolve media host '{hop.host}'") from exc
    if not addresses:
        raise FetchError(f"could not resolve media host '{hop.host}'")
    if not policy.allow_private_networks and not all(is_public_address(ip) for ip in addresses):
        raise FetchError(f"media host '{hop.host}' resolves to a non-public network address")
    return addresses


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    """One verifying TLS context for all fetches (building one loads the CA bundle)."""
    return httpx.create_ssl_context()


def _client(timeout_s: float) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        follow_redirects=False,
        trust_env=False,
        verify=_ssl_context(),
        timeout=httpx.Timeout(timeout_s),
        headers={"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"},
    )


def _pinned_request(client: httpx.AsyncClient, hop: _Hop, ip: IPAddress) -> httpx.Request:
    """A request to the IP literal that still names the original host (Host header, SNI, cert check)."""
    host_header = hop.host if hop.url.port is None else f"{hop.host}:{hop.url.port}"
    extensions = {"sni_hostname": hop.host} if hop.url.scheme == "https" else {}
    return client.build_request(
        "GET",
        hop.url.copy_with(host=str(ip).split("%")[0]),
        headers={"Host": host_header},
        extensions=extensions,
    )


async def _read_body(response: httpx.Response, max_bytes: int) -> bytes:
    """Stream the body, aborting as soon as more than `max_bytes` (decoded) bytes arrive."""
    declared = response.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > max_bytes:
        raise FetchError(f"media is larger than the limit of {max_bytes} bytes", status_code=413)
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > max_bytes:
            raise FetchError(f"media is larger than the limit of {max_bytes} bytes", status_code=413)
        chunks.append(chunk)
    return b"".join(chunks)


def _is_tls_failure(exc: BaseException | None) -> bool:
    while exc is not None:
        if isinstance(exc, ssl.SSLError):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


async def _send_pinned(client: httpx.AsyncClient, hop: _Hop, addresses: list[IPAddress]) -> httpx.Response:
    """Open a streamed response from the first checked address that accepts a connection."""
    last_error: Exception | None = None
    for ip in addresses:
        try:
            return await client.send(_pinned_request(client, hop, ip), stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            if _is_tls_failure(exc):
                raise FetchError(f"TLS handshake with media host '{hop.host}' failed") from exc
            last_error = exc
    raise FetchError(f"could not connect to media host '{hop.host}'") from last_error


def _redirect_target(hop: _Hop, location: str) -> httpx.URL:
    try:
        return hop.url.join(location)
    except (httpx.InvalidURL, UnicodeError, ValueError) as exc:
        raise FetchError("media server sent an invalid redirect") from exc


async def _fetch_hops(url: str, policy: FetchPolicy, max_bytes: int, timeout_s: float) -> bytes:
    hop = check_url(url, policy)
    async with _client(timeout_s) as client:
        for _ in range(policy.max_redirects + 1):
            addresses = await checked_addresses(hop, policy)
            response = await _send_pinned(client, hop, addresses)
            try:
                if response.status_code in REDIRECT_STATUSES and "location" in response.headers:
                    hop = check_url(_redirect_target(hop, response.headers["location"]), policy)
                    continue
                if not 200 <= response.status_code < 300:
                    raise FetchError(f"fetching media failed with HTTP status {response.status_code}")
                return await _read_body(response, max_bytes)
            finally:
                await response.aclose()
    raise FetchError(f"too many redirects fetching media (limit {policy.max_redirects})")


async def fetch_url(url: str, policy: FetchPolicy, *, max_bytes: int, timeout_s: float) -> bytes:
    """GET `url` under `policy`; the whole fetch (DNS, redirects, body) must finish within `timeout_s`.

    Raises FetchError: 413 when the body exceeds `max_bytes` (checked from Content-Length and while
    streaming), 400 for refused URLs/addresses, redirect loops, HTTP errors, network errors and timeouts.
    """
    try:
        async with asyncio.timeout(timeout_s):
            return await _fetch_hops(url, policy, max_bytes, timeout_s)
    except TimeoutError as exc:
        raise FetchError(f"fetching media timed out after {timeout_s:g} s") from exc
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise FetchError(f"fetching media failed ({type(exc).__name__})") from exc
