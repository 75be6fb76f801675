"""SSRF-safe fetching (api.net) and http(s) media loading, against a threaded HTTP server on 127.0.0.1 only."""

from __future__ import annotations

import asyncio
import io
import ipaddress
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from PIL import Image

from api import net
from api.media import MediaError, MediaLimits, fetch_image

LOCAL = MediaLimits(allow_private_networks=True)


def _png(width: int = 20, height: int = 10) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list[tuple[str, str]]  # (path, Host header), set on the server-specific subclass

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _stream(self, chunked: bool, total: int = 8 * 2**20) -> None:
        """Send `total` bytes without a truthful length; stop quietly when the client hangs up."""
        self.send_response(200)
        self.send_header("Transfer-Encoding" if chunked else "Connection", "chunked" if chunked else "close")
        self.end_headers()
        block = _png()[:8] + b"\0" * (65536 - 8)
        try:
            for _ in range(total // len(block)):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block) if chunked else block)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        self.close_connection = True

    def do_GET(self):  # noqa: N802 (http.server API)
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        self.seen.append((url.path, self.headers.get("Host", "")))
        if url.path == "/img.png":
            self._send(200, _png(), {"Content-Type": "image/png"})
        elif url.path == "/redirect":
            self._send(302, headers={"Location": query["to"]})
        elif url.path == "/chain":
            left = int(query["n"])
            location = f"/chain?n={left - 1}" if left > 0 else "/img.png"
            self._send(307, headers={"Location": location})
        elif url.path == "/declared-huge":
            self.send_response(200)
            self.send_header("Content-Length", str(10**9))
            self.end_headers()
            self.close_connection = True
        elif url.path == "/chunked":
            self._stream(chunked=True)
        elif url.path == "/until-close":
            self._stream(chunked=False)
        elif url.path == "/slow":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            try:
                for _ in range(40):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.05)
            except (BrokenPipeError, ConnectionResetError):
                pass
            self.close_connection = True
        else:
            self._send(404, b"not found")


@pytest.fixture(scope="module")
def server():
    handler = type("Handler", (_Handler,), {"seen": []})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.seen = handler.seen
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def base(server):
    server.seen.clear()
    return f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def fake_dns(monkeypatch):
    """Names ending in .test resolve through this table; anything else fails to resolve."""
    table: dict[str, list[str]] = {}

    def resolve(host: str, port: int):
        if host in table:
            return [ipaddress.ip_address(a) for a in table[host]]
        if host == "127.0.0.1":
            return [ipaddress.ip_address(host)]
        raise OSError(f"no fake DNS entry for {host}")

    monkeypatch.setattr(net, "resolve_addresses", resolve)
    return table


@pytest.fixture
def no_connect(monkeypatch):
    """Fail the test if any HTTP request is sent."""

    async def refuse(self, request, **kw):
        raise AssertionError(f"connection attempted to {request.url}")

    monkeypatch.setattr(httpx.AsyncClient, "send", refuse)


def _fetch(url: str, limits: MediaLimits = LOCAL) -> Image.Image:
    return asyncio.run(fetch_image(url, limits, param="p"))


def _refused(url: str, limits: MediaLimits = LOCAL) -> MediaError:
    with pytest.raises(MediaError) as err:
        _fetch(url, limits)
    assert err.value.param == "p"
    return err.value


# ------------------------------------------------------------------------------------------ address rules


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "240.0.0.1",
        "255.255.255.255",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
        "2002:7f00:1::1",
        "64:ff9b::a00:1",
    ],
)
def test_non_public_addresses(address):
    assert not net.is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["8.8.8.8", "93.184.216.34", "2606:4700:4700::1111"])
def test_public_addresses(address):
    assert net.is_public_address(ipaddress.ip_address(address))


def test_domain_allowlist_matching():
    allowed = frozenset({"example.com", "*.cdn.example"})
    assert net.host_allowed("example.com", allowed) and net.host_allowed("EXAMPLE.com.", allowed)
    assert net.host_allowed("a.b.cdn.example", allowed) and net.host_allowed("cdn.example", allowed)
    assert not net.host_allowed("sub.example.com", allowed)
    assert not net.host_allowed("evilcdn.example", allowed)
    assert not net.host_allowed("example.com.evil.org", allowed)
    assert net.host_allowed("anything.org", None)


# ------------------------------------------------------------------------------------------ SSRF refusals


@pytest.mark.parametrize(
    "addresses",
    [["127.0.0.1"], ["10.0.0.7"], ["169.254.169.254"], ["::1"], ["93.184.216.34", "192.168.0.10"]],
)
def test_host_resolving_to_private_refused_without_connecting(fake_dns, no_connect, addresses):
    fake_dns["media.test"] = addresses
    err = _refused("http://media.test/cat.png", MediaLimits())
    assert err.status_code == 400 and "non-public" in err.message


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/x.png",
        "http://[::1]/x.png",
        "http://169.254.169.254/latest/meta-data",
        "http://2130706433/",
    ],
)
def test_literal_private_addresses_refused(no_connect, url):
    assert _refused(url, MediaLimits()).status_code == 400


def test_loopback_server_refused_by_default(base, server):
    _refused(f"{base}/img.png", MediaLimits())
    assert server.seen == []


def test_domain_allowlist_refuses_other_hosts(no_connect):
    err = _refused("https://evil.example/x.png", MediaLimits(allowed_domains=frozenset({"good.example"})))
    assert "allowed domains" in err.message


def test_credentials_in_url_refused(no_connect):
    _refused("http://user:pass@good.example/x.png", MediaLimits())


def test_http_scheme_can_be_disabled(no_connect):
    _refused("http://good.example/x.png", MediaLimits(allowed_schemes=frozenset({"https", "data"})))


def test_unresolvable_host(fake_dns):
    assert "resolve" in _refused("http://nowhere.test/x.png").message


# ------------------------------------------------------------------------------------------ fetching


def test_fetch_image_from_loopback_when_allowed(base):
    image = _fetch(f"{base}/img.png")
    assert image.size == (20, 10) and image.getpixel((0, 0)) == (1, 2, 3)


def test_connection_pinned_to_checked_address(fake_dns, base, server):
    """ "pinned.test" exists only in our resolver: success means httpx never did its own lookup."""
    port = server.server_address[1]
    fake_dns["pinned.test"] = ["127.0.0.1"]
    assert _fetch(f"http://pinned.test:{port}/img.png").size == (20, 10)
    assert server.seen == [("/img.png", f"pinned.test:{port}")]


def test_http_error_status(base):
    assert "404" in _refused(f"{base}/missing.png").message


def test_declared_length_over_limit_is_413(base):
    assert _refused(f"{base}/declared-huge").status_code == 413


@pytest.mark.parametrize("path", ["/chunked", "/until-close"])
def test_streaming_byte_cap_is_413(base, path):
    err = _refused(f"{base}{path}", MediaLimits(allow_private_networks=True, max_image_bytes=100_000))
    assert err.status_code == 413


def test_total_timeout(base):
    err = _refused(f"{base}/slow", MediaLimits(allow_private_networks=True, fetch_timeout_image_s=0.3))
    assert err.status_code == 400 and "timed out" in err.message


# ------------------------------------------------------------------------------------------ redirects


def test_redirects_followed_up_to_limit(base):
    assert _fetch(f"{base}/chain?n=2").size == (20, 10)  # 3 redirects: /chain 2 -> 1 -> 0 -> /img.png
    err = _refused(f"{base}/chain?n=3")
    assert "too many redirects" in err.message
    limits = MediaLimits(allow_private_networks=True, max_redirects=0)
    assert "too many redirects" in _refused(f"{base}/chain?n=0", limits).message


@pytest.fixture
def public_loopback(monkeypatch, fake_dns, server):
    """Pretend the test server at 127.0.0.1 is a public host "public.test"; every other address stays private."""
    real = net.is_public_address
    monkeypatch.setattr(net, "is_public_address", lambda ip: str(ip) == "127.0.0.1" or real(ip))
    fake_dns["public.test"] = ["127.0.0.1"]
    server.seen.clear()
    return f"http://public.test:{server.server_address[1]}"


def test_public_redirect_positive_control(public_loopback, server):
    target = urllib.parse.quote(f"{public_loopback}/img.png")
    assert _fetch(f"{public_loopback}/redirect?to={target}", MediaLimits()).size == (20, 10)
    assert [path for path, _ in server.seen] == ["/redirect", "/img.png"]


@pytest.mark.parametrize(
    "target",
    [
        "http://internal.test/secret",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/secret",
        "http://10.0.0.1/secret",
        "file:///etc/passwd",
        "data:image/png;base64,AAAA",
        "ftp://public.test/x.png",
    ],
)
def test_redirect_targets_rechecked(public_loopback, fake_dns, server, target):
    fake_dns["internal.test"] = ["10.0.0.5"]
    err = _refused(f"{public_loopback}/redirect?to={urllib.parse.quote(target)}", MediaLimits())
    assert err.status_code == 400
    assert [path for path, _ in server.seen] == ["/redirect"]


def test_redirect_outside_domain_allowlist(public_loopback, fake_dns, server):
    fake_dns["other.test"] = ["127.0.0.1"]
    port = server.server_address[1]
    limits = MediaLimits(allowed_domains=frozenset({"public.test"}))
    target = urllib.parse.quote(f"http://other.test:{port}/img.png")
    assert "allowed domains" in _refused(f"{public_loopback}/redirect?to={target}", limits).message
    assert [path for path, _ in server.seen] == ["/redirect"]
