"""The HTTP transport against real servers on 127.0.0.1: what it trusts."""

from __future__ import annotations

import http.server
import shutil
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import MakeClient


class _Accepting(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.server.posts += 1  # type: ignore[attr-defined]
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(202)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def self_signed_server(tmp_path: Path) -> Iterator[tuple[str, http.server.HTTPServer]]:
    """An HTTPS server on 127.0.0.1 whose certificate no authority signed."""
    openssl = shutil.which("openssl")
    assert openssl, "openssl is needed to make a certificate"
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            *(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    server = http.server.HTTPServer(("127.0.0.1", 0), _Accepting)
    server.posts = 0  # type: ignore[attr-defined]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}", server
    finally:
        server.shutdown()
        server.server_close()


def test_an_https_base_url_refuses_a_certificate_no_authority_signed(
    make_client: MakeClient, self_signed_server: tuple[str, http.server.HTTPServer]
) -> None:
    # Only a plain-HTTP base URL skips loading certificates: HTTPS verifies, so events
    # never reach a server that cannot prove who it is.
    url, server = self_signed_server
    client = make_client(base_url=url, max_retries=0)
    client.track("u1", "paid", {"i": 1})
    result = client.flush(timeout=10)
    assert (result.pending, result.reason) == (1, "retry_exhausted")
    assert server.posts == 0  # type: ignore[attr-defined]
    assert client.stats().pending_tracks == 1
