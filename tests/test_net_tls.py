"""HTTPS through the pinned connection: SNI and certificate checks use the URL's host name, not the IP."""

from __future__ import annotations

import asyncio
import datetime
import io
import ipaddress
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from api import net
from api.media import MediaError, MediaLimits, fetch_image

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

HOST = "pinned.test"


def _cert(subject: str, issuer_key, public_key, issuer: str, *, is_ca: bool):
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if not is_ca:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A throw-away CA and a leaf certificate for HOST, as PEM files."""
    folder = tmp_path_factory.mktemp("pki")
    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _cert("test-ca", ca_key, ca_key.public_key(), "test-ca", is_ca=True)
    leaf = _cert(HOST, ca_key, leaf_key.public_key(), "test-ca", is_ca=False)
    (folder / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (folder / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_pem = leaf_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (folder / "leaf.key").write_bytes(key_pem)
    return folder


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_names: list[str | None] = []

    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802 (http.server API)
        buf = io.BytesIO()
        Image.new("RGB", (6, 4), (9, 8, 7)).save(buf, format="PNG")
        self.send_response(200)
        self.send_header("Content-Length", str(len(buf.getvalue())))
        self.end_headers()
        self.wfile.write(buf.getvalue())


@pytest.fixture(scope="module")
def tls_port(pki):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki / "leaf.pem", pki / "leaf.key")
    context.sni_callback = lambda sock, name, ctx: _Handler.server_names.append(name)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def trusted(monkeypatch, pki):
    """Trust the test CA and resolve *.test names to the loopback TLS server."""
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    monkeypatch.setattr(net, "_ssl_context", lambda: context)
    monkeypatch.setattr(net, "resolve_addresses", lambda host, port: [ipaddress.ip_address("127.0.0.1")])
    _Handler.server_names.clear()


LIMITS = MediaLimits(allow_private_networks=True)


def test_https_pinned_with_sni_and_verified_name(trusted, tls_port):
    image = asyncio.run(fetch_image(f"https://{HOST}:{tls_port}/a.png", LIMITS))
    assert image.size == (6, 4)
    assert _Handler.server_names == [HOST]


def test_certificate_checked_against_url_host(trusted, tls_port):
    with pytest.raises(MediaError) as err:
        asyncio.run(fetch_image(f"https://other.test:{tls_port}/a.png", LIMITS))
    assert err.value.status_code == 400
    assert "TLS" in err.value.message  # the certificate names HOST only
    assert _Handler.server_names == ["other.test"]
