"""The client rides out a server restart and a hung server, against real servers over HTTPS."""

from __future__ import annotations

import os
import resource
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sealbox.client import SigningClient, SignOutcome
from sealbox.formats.widevine import WidevineSigner
from sealbox.samples.mar import write_mar
from tests.servers import Deployment, ServerProcess, gpg_verify, start_server


def wait_until(condition: Callable[[], bool], cap: float = 60.0) -> bool:
    """Poll ``condition`` until it holds or ``cap`` seconds pass."""
    end = time.monotonic() + cap
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


def gpg_ok(data: Path, public: Path) -> bool:
    res = gpg_verify(data.with_name(data.name + ".asc"), data, public / "gpg.asc")
    return res.returncode == 0 and b"VALIDSIG" in res.stdout


def test_single_host_restart_loses_no_file(tmp_path: Path) -> None:
    dep = Deployment.create(tmp_path / "dep", "dep", ["gpg"])
    server = start_server(dep)
    files = []
    for i in range(60):
        f = tmp_path / f"f{i:02d}.txt"
        f.write_bytes(f"file {i} ".encode() * 40 + os.urandom(16))
        files.append(f)
    retries: dict[Path, list[str]] = defaultdict(list)
    paused, resume = threading.Event(), threading.Event()
    signed = 0

    def progress(n: int) -> None:
        nonlocal signed
        signed += n
        if signed == 10:  # hold the client (its loop runs this) while the server goes away
            paused.set()
            resume.wait(120)

    def on_retry(source: Path, fmt: str, error: str) -> None:
        retries[source].append(error)

    results: list[SignOutcome] = []
    restarted: ServerProcess | None = None
    with SigningClient([server.server], dep.ca, server.token(), timeout=60, on_retry=on_retry) as client:
        worker = threading.Thread(
            target=lambda: results.extend(client.sign_many([(f, ["gpg"], None) for f in files], 8, progress))
        )
        worker.start()
        try:
            assert paused.wait(60), "the client never got going"
            server.stop()
            resume.set()
            # Down until some file has been refused more often than the old client bore
            # (max_errors = 5 failed attempts, then it gave up): a fact, not a sleep.
            assert wait_until(lambda: max(map(len, list(retries.values())), default=0) > 5)
            restarted = start_server(dep, port=server.port)
            worker.join(120)
        finally:
            resume.set()
            if restarted is None:
                server.stop()
    try:
        assert not worker.is_alive()
        errors = [e for errs in list(retries.values()) for e in errs]
        assert any("Cannot connect to host" in e for e in errors), errors[:3]
        assert [r.error for r in results if not r.ok] == []
        assert len(results) == len(files)
        assert all(gpg_ok(f, dep.public) for f in files)
    finally:
        if restarted is not None:
            restarted.stop()


@pytest.fixture
def two_hosts(tmp_path: Path) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Two servers with their own signing keys, sharing a TLS CA and a token secret."""
    a = Deployment.create(tmp_path / "a", "dep", ["gpg", "widevine"])
    b = Deployment.create(tmp_path / "b", "dep", ["gpg", "widevine"])
    for rel in ("tls/ca.pem", "tls/server.pem", "tls/server.key", "secrets/token-secret"):
        (b.root / rel).write_bytes((a.root / rel).read_bytes())
    sa = start_server(a)
    try:
        sb = start_server(b)
        try:
            yield sa, sb
        finally:
            sb.stop()
    finally:
        sa.stop()


def test_hung_host_is_found_out_once_for_every_file_and_format(
    two_hosts: tuple[ServerProcess, ServerProcess], tmp_path: Path
) -> None:
    hung, healthy = two_hosts
    reports: list[str] = []

    def batch(client: SigningClient, tag: str, n: int = 20) -> tuple[float, list[SignOutcome]]:
        items = []
        for i in range(n):
            f = tmp_path / f"{tag}{i:02d}.so"  # a real ELF, made unique
            f.write_bytes(Path("/bin/true").read_bytes() + os.urandom(2000))
            items.append((f, ["gpg", "widevine"], None))
        started = time.monotonic()
        out = client.sign_many(items, 8)
        return time.monotonic() - started, out

    with SigningClient(
        [hung.server, healthy.server],
        hung.deployment.ca,
        hung.token(),
        timeout=120,
        shuffle=False,  # the host about to hang comes first, for every format
        on_retry=lambda source, fmt, error: reports.append(error),
    ) as client:
        batch(client, "warm", 8)  # leaves keep-alive connections to the first host in the pool
        base_s, base = batch(client, "base")
        assert all(r.ok and r.server == hung.server.url for r in base)
        os.kill(hung.proc.pid, signal.SIGSTOP)
        try:
            hung_s, out = batch(client, "hung")
        finally:
            os.kill(hung.proc.pid, signal.SIGCONT)
    slowest = max(r.seconds for r in out)
    print(f"\nboth healthy: {base_s:.1f} s; one hung: {hung_s:.1f} s (slowest file {slowest:.1f} s)")
    assert [r.error for r in out if not r.ok] == []
    assert all(r.server == healthy.server.url for r in out)
    # The old client waited ~90 s per exchange on the hung host, and learnt it per format.
    assert hung_s < 40
    # Only the exchanges in flight when it hung (8 files at a time) met the hung host; every
    # later file and format knew to skip it.
    against_hung = [e for e in reports if hung.server.url in e]
    assert 0 < len(against_hung) <= 8, against_hung
    public = healthy.deployment.public
    for r in out:
        assert gpg_ok(r.source, public)
        WidevineSigner.verify("widevine", r.source.with_name(r.source.name + ".sig"), r.source, public)


def test_a_server_that_cannot_store_an_upload_is_left_for_the_next(tmp_path: Path) -> None:
    """A full disk (RLIMIT_FSIZE stands in for it, as in the server's own test): its 507 sends
    the client to the next server at once. It read the 507 of an unhashed upload as an older
    server that does not name uploads and sent the whole file to the same server again."""
    d = Deployment.create(tmp_path / "dep", "dep", ["mar"])
    full = start_server(d, extra=["--data-dir", str(tmp_path / "full-data")])
    good = start_server(d, extra=["--data-dir", str(tmp_path / "good-data")])
    try:
        _, hard = resource.prlimit(full.proc.pid, resource.RLIMIT_FSIZE)
        resource.prlimit(full.proc.pid, resource.RLIMIT_FSIZE, (256 * 1024, hard))
        mar = write_mar(tmp_path, "update.mar", size=2 * 1024 * 1024, seed=1)
        servers = [full.server, good.server]
        with SigningClient(servers, d.ca, full.token(), shuffle=False) as client:
            client.sign(_small_mar(tmp_path), ["mar"])  # learnt: these servers name uploads
            outcome = client.sign(mar, ["mar"])
        assert outcome.ok and outcome.server == good.server.url, outcome.error
        posts = [e for e in full.log_lines() if e.get("event") == "request" and e.get("status") == 507]
        assert len(posts) == 1, posts
    finally:
        full.stop()
        good.stop()


def _small_mar(tmp: Path) -> Path:
    return write_mar(tmp, "small.mar", size=1024, seed=2)
