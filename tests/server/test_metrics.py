"""Prometheus metrics of a real server: off by default, on their own plain-HTTP listener when
``[metrics] listen`` is set, behind their own address allowlist; signatures, signing time,
upload sizes, refusals by reason, token mints, workers and certificate expiry, as scraped and
parsed by prometheus_client's own parser."""

from __future__ import annotations

import hashlib
import os
import ssl
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import tomli_w
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from sealbox.server import tokens
from sealbox.server.metrics import REFUSALS
from tests.servers import Deployment, ServerProcess, start_server

LIMIT = 64 * 1024  # [server] max_filesize of the shared server
VOUCHER_MAX = 1024  # [formats.emevoucher] max_size: a bigger voucher is rejected by the format
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _configure(d: Deployment, metrics: dict[str, Any] | None, **server: Any) -> None:
    cfg = tomllib.loads(d.config.read_text())
    cfg["server"].update({"signing_processes": 2, **server})
    cfg.pop("metrics", None)
    if metrics is not None:
        cfg["metrics"] = metrics
    cfg["formats"]["emevoucher"]["max_size"] = VOUCHER_MAX
    d.config.write_text(tomli_w.dumps(cfg))


def _metrics_port(sp: ServerProcess) -> int | None:
    lines = [x for x in sp.log_lines() if x.get("event") == "metrics_listening"]
    return int(str(lines[0]["port"])) if lines else None


def _scrape_response(sp: ServerProcess) -> httpx.Response:
    port = _metrics_port(sp)
    assert port is not None, sp.log.read_text()
    return httpx.get(f"http://127.0.0.1:{port}/metrics", trust_env=False, timeout=60)


def _scrape(sp: ServerProcess) -> Samples:
    """Every sample, parsed by prometheus_client's parser, by (name, labels)."""
    r = _scrape_response(sp)
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[s.name, frozenset(s.labels.items())] = s.value
    return out


def _v(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, frozenset(labels.items())]


def _listening(sp: ServerProcess) -> set[int]:
    conns = psutil.Process(sp.proc.pid).net_connections(kind="inet")
    return {c.laddr.port for c in conns if c.status == psutil.CONN_LISTEN}


def test_metrics_listener_is_off_by_default_and_has_its_own_allowlist(tmp_path: Path) -> None:
    d = Deployment.create(tmp_path / "dep", "dep", ["gpg", "emevoucher"])
    _configure(d, None)
    sp = start_server(d)
    try:
        assert _metrics_port(sp) is None
        assert _listening(sp) == {sp.port}  # the HTTPS port, nothing else
    finally:
        sp.stop()

    _configure(d, {"listen": "127.0.0.1:0"})
    sp = start_server(d)
    try:
        port = _metrics_port(sp)
        assert port is not None and _listening(sp) == {sp.port, port}
        assert _scrape_response(sp).status_code == 200  # loopback: in the default allowlist
    finally:
        sp.stop()

    _configure(d, {"listen": "127.0.0.1:0", "allowed_ips": ["10.0.0.0/8"]})
    sp = start_server(d)
    try:
        r = _scrape_response(sp)
        assert r.status_code == 403
        assert "sealbox_" not in r.text
    finally:
        sp.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    d = Deployment.create(tmp_path_factory.mktemp("metrics") / "dep", "dep", ["gpg", "emevoucher"])
    _configure(d, {"listen": "127.0.0.1:0"}, max_filesize=LIMIT)
    sp = start_server(d)
    yield sp
    sp.stop()


def _files(folder: Path, tag: str, sizes: list[int]) -> list[Path]:
    folder.mkdir(exist_ok=True)
    out = []
    for i, size in enumerate(sizes):
        p = folder / f"{tag}{i}.bin"
        p.write_bytes(os.urandom(size))
        out.append(p)
    return out


def test_scrape_after_signing(server: ServerProcess, tmp_path: Path) -> None:
    before = _scrape(server)
    gpg = _files(tmp_path, "g", [1000, 2000, 3000])
    vouchers = _files(tmp_path, "v", [100, 200])
    too_big = _files(tmp_path, "big", [VOUCHER_MAX * 2])[0]
    with server.client() as c:  # mints one token
        assert all(c.sign(f, ["gpg"]).ok for f in gpg)
        assert all(c.sign(f, ["emevoucher"]).ok for f in vouchers)
        assert not c.sign(too_big, ["emevoucher"]).ok  # the format rejects it
    ctx = ssl.create_default_context(cafile=str(server.deployment.ca))
    assert httpx.get(f"{server.server.url}/__heartbeat__", verify=ctx, trust_env=False).status_code == 200
    after = _scrape(server)

    def delta(name: str, **labels: str) -> float:
        return _v(after, name, **labels) - _v(before, name, **labels)

    assert delta("sealbox_signatures_total", format="gpg", level="dep", outcome="signed") == 3
    assert delta("sealbox_signatures_total", format="emevoucher", level="dep", outcome="signed") == 2
    assert delta("sealbox_signatures_total", format="emevoucher", level="dep", outcome="rejected") == 1
    for fmt in ("gpg", "emevoucher"):
        for outcome in ("failed", "error"):
            assert delta("sealbox_signatures_total", format=fmt, level="dep", outcome=outcome) == 0
    assert delta("sealbox_signing_seconds_count", format="gpg") == 3
    assert delta("sealbox_signing_seconds_bucket", format="gpg", le="+Inf") == 3
    assert delta("sealbox_signing_seconds_count", format="emevoucher") == 3
    assert delta("sealbox_upload_bytes_count", format="gpg") == 3
    assert delta("sealbox_upload_bytes_sum", format="gpg") == 6000
    assert delta("sealbox_upload_bytes_bucket", format="gpg", le="1024.0") == 1
    assert delta("sealbox_upload_bytes_sum", format="emevoucher") == 300 + VOUCHER_MAX * 2
    assert delta("sealbox_tokens_minted_total") == 1
    assert _v(after, "sealbox_jobs_queued") == 0 and _v(after, "sealbox_jobs_running") == 0
    assert _v(after, "sealbox_signing_workers") == 2 == _v(after, "sealbox_signing_workers_configured")
    assert _v(after, "sealbox_worker_losses_total") == 0
    for check in ("keys", "data_dir", "workers", "certificates"):
        assert _v(after, "sealbox_health_check_ok", check=check) == 1
    assert _v(after, "sealbox_heartbeat_timestamp_seconds") > _v(
        before, "sealbox_heartbeat_timestamp_seconds"
    )
    assert _v(after, "process_resident_memory_bytes") > 0

    chain = server.deployment.root / "keys" / "emevoucher.chain.pem"
    cert = x509.load_pem_x509_certificates(chain.read_bytes())[0]
    expiry = _v(after, "sealbox_certificate_expiry_timestamp_seconds", key="emevoucher")
    assert expiry == cert.not_valid_after_utc.timestamp()
    keys = {dict(ls)["key"] for name, ls in after if name == "sealbox_certificate_expiry_timestamp_seconds"}
    assert keys == {"emevoucher"}  # a gpg key has no certificate
    tls = x509.load_pem_x509_certificates((server.deployment.root / "tls" / "server.pem").read_bytes())[0]
    assert (
        _v(after, "sealbox_tls_certificate_expiry_timestamp_seconds") == tls.not_valid_after_utc.timestamp()
    )


def _post(
    server: ServerProcess,
    fmt: str = "gpg",
    *,
    data: bytes = b"x" * 100,
    token: str | None = "",
    filename: str = "t.bin",
    sha1: str | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """A raw upload, as a broken or hostile client would send it ("" token: a good one)."""
    fields = {"sha1": sha1 if sha1 is not None else hashlib.sha1(data, usedforsecurity=False).hexdigest()}
    fields["filename"] = filename
    if token is not None:
        fields["token"] = token or server.token()
    ctx = ssl.create_default_context(cafile=str(server.deployment.ca))
    with httpx.Client(verify=ctx, trust_env=False, timeout=60) as c:
        return c.post(
            f"{server.server.url}/sign/{fmt}",
            data=fields,
            files={"filedata": (filename, data)},
            headers=headers,
        )


def test_each_refused_upload_counts_under_its_reason(server: ServerProcess) -> None:
    secret = (server.deployment.root / "secrets" / "token-secret").read_bytes().strip()
    now = time.time()
    expect = dict.fromkeys(REFUSALS, 0)
    before = _scrape(server)

    def refused(reason: str, response: httpx.Response, status: int = 400) -> None:
        assert response.status_code == status, (reason, response.text)
        expect[reason] += 1

    refused("token_missing", _post(server, token=None))
    refused("token_malformed", _post(server, token="not a token\x01"))
    refused("token_forged", _post(server, token=tokens.mint(b"f" * 32, "127.0.0.1", 600)))
    refused("token_expired", _post(server, token=tokens.mint(secret, "127.0.0.1", 1, now - 100)))
    refused("token_not_yet_valid", _post(server, token=tokens.mint(secret, "127.0.0.1", 60, now + 1000)))
    refused("token_wrong_ip", _post(server, token=tokens.mint(secret, "10.9.8.7", 600)))
    refused("format", _post(server, "nosuchformat"))
    refused("filename", _post(server, filename="../../etc/passwd"), 403)
    refused("filename", _post(server, filename="-rf"), 403)
    refused("filename", _post(server, filename="\x01evil\u202e"), 403)  # never becomes a label
    refused("size", _post(server, data=os.urandom(LIMIT * 3)), 413)  # Content-Length says so
    refused("size", _post(server, data=os.urandom(LIMIT + 1000)))  # found while reading
    refused("size", _post(server, data=b"tiny"))
    refused("hash_mismatch", _post(server, sha1="0" * 40))
    refused("malformed", _post(server, sha1="NOT-HEX"))
    ctx = ssl.create_default_context(cafile=str(server.deployment.ca))
    with httpx.Client(verify=ctx, trust_env=False) as c:
        refused("malformed", c.post(f"{server.server.url}/sign/gpg", data={"sha1": "x"}))  # no multipart
    # A voucher the format rejects: the job's failure is remembered, and a new upload of the
    # same bytes is refused before it is read. The first answer (with the job's outcome,
    # X-Sealbox-Wait) is no refusal of the upload.
    voucher = os.urandom(VOUCHER_MAX + 1)
    first = _post(server, "emevoucher", data=voucher, headers={"X-Sealbox-Wait": "30"})
    assert first.status_code == 404 and "signing failed" in first.text, first.text
    refused("remembered_failure", _post(server, "emevoucher", data=voucher))

    after = _scrape(server)
    labels = {dict(ls)["reason"] for name, ls in after if name == "sealbox_uploads_refused_total"}
    assert labels == set(REFUSALS)  # the fixed set: nothing a client sent
    got = {
        r: _v(after, "sealbox_uploads_refused_total", reason=r)
        - _v(before, "sealbox_uploads_refused_total", reason=r)
        for r in REFUSALS
    }
    assert got == expect
