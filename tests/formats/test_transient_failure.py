"""A failure that may pass (a timestamp server down) is remembered for a while, so polling
clients hear of it; a new upload of the same file then signs it again, through a real server."""

from __future__ import annotations

import threading
import tomllib
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from sealbox.formats import authenticode, signer_class
from sealbox.samples.pe import write_pe
from tests.formats.test_authenticode import LocalTSA
from tests.servers import Deployment, start_server

FMT = "sha2signcode-v2"


class Gate:
    """An HTTP front of a timestamp server: 503 while closed, the server's own answer once open."""

    def __init__(self, upstream: str) -> None:
        self.open = False
        gate = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if not gate.open:
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                request = urllib.request.Request(upstream, body, dict(self.headers.items()))
                with urllib.request.urlopen(request, timeout=30) as answer:
                    reply = answer.read()
                self.send_response(200)
                self.send_header("Content-Type", "application/timestamp-reply")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def gate(inprocess_tsa: LocalTSA) -> Iterator[Gate]:
    g = Gate(inprocess_tsa.url)
    yield g
    g.close()


def test_a_new_upload_after_a_transient_failure_signs_again(
    tmp_path: Path, gate: Gate, inprocess_tsa: LocalTSA
) -> None:
    """The upload starts a new job, and its answer is that job's outcome: not the failure still
    remembered from the last one (which made the client give up on the server at once)."""
    d = Deployment.create(tmp_path / "dep", "dep", [FMT])
    cfg = tomllib.loads(d.config.read_text())
    cfg["formats"][FMT]["timestamp_url"] = gate.url
    d.config.write_text(tomli_w.dumps(cfg))
    (d.public / authenticode.TSA_CA_FILE).write_bytes(inprocess_tsa.ca.cert_pem())
    server = start_server(d)
    try:
        src = write_pe(tmp_path)
        with server.client(timeout=60) as client:
            first = client.sign(src, [FMT], tmp_path / "first.exe")
        assert not first.ok and "timestamp server unreachable" in str(first.error), first.error
        gate.open = True  # the timestamp server is back, well within the failure's 60 s
        with server.client(timeout=60) as client:
            second = client.sign(src, [FMT], tmp_path / "second.exe")
        assert second.ok, second.error
        signer_class(FMT).verify(FMT, tmp_path / "second.exe", src, d.public)
    finally:
        server.stop()
