"""A failure that may pass (a timestamp server down) is remembered for a while, so polling
clients hear of it; a new upload of the same file then signs it again, through a real server."""

from __future__ import annotations

import tomllib
from pathlib import Path

import tomli_w

from sealbox.formats import authenticode, signer_class
from sealbox.samples.pe import write_pe
from tests.formats.test_authenticode import LocalTSA
from tests.servers import Deployment, start_server

FMT = "sha2signcode-v2"


def test_a_new_upload_after_a_transient_failure_signs_again(tmp_path: Path) -> None:
    """The upload starts a new job, and its answer is that job's outcome: not the failure still
    remembered from the last one (which would make the client give up on the server at once)."""
    tsa = LocalTSA(tmp_path / "tsa")
    tsa.available = False
    d = Deployment.create(tmp_path / "dep", "dep", [FMT])
    cfg = tomllib.loads(d.config.read_text())
    cfg["formats"][FMT]["timestamp_url"] = tsa.url
    d.config.write_text(tomli_w.dumps(cfg))
    (d.public / authenticode.TSA_CA_FILE).write_bytes(tsa.ca.cert_pem())
    server = start_server(d)
    try:
        src = write_pe(tmp_path)
        with server.client(timeout=60) as client:
            first = client.sign(src, [FMT], tmp_path / "first.exe")
        assert not first.ok and "timestamp server unreachable" in str(first.error), first.error
        tsa.available = True  # back, well within the 60 s the failure is remembered
        with server.client(timeout=60) as client:
            second = client.sign(src, [FMT], tmp_path / "second.exe")
        assert second.ok, second.error
        signer_class(FMT).verify(FMT, tmp_path / "second.exe", src, d.public)
    finally:
        server.stop()
        tsa.close()
