"""SIGTERM drains: the listener closes at once, requests in progress (an upload still sending
its body included) complete, long polls are answered at once, every job finishes, exit 0."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import sys
import threading
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import tomli_w

from sealbox.samples.msi import write_msi
from tests.servers import Deployment, ServerProcess, gpg_verify, start_server

JOB_TIMEOUT = 30.0
BLOCK = 1024 * 1024
BLOCKS = 64  # a 64 MiB upload
SENT_BEFORE_STOP = 16  # blocks sent before SIGTERM; the rest only after the server is stopping
CAP = 60.0  # bound of every wait
PROMPT = 15.0  # bound of a wait for what should happen at once (well under get_hold and job_timeout)

SLOW = "osslsigncode"  # the format whose jobs the test holds
# Stands in for osslsigncode: waits until the test creates ``release`` (at most 120 s), then
# runs the real one, so "still running" is a fact the test controls. (Start-up asks the tool
# its version: that passes straight through.)
BLOCKER = """#!{python}
import os, pathlib, sys, time
if sys.argv[1:] == ["--version"]:
    os.execv({tool!r}, [{tool!r}, "--version"])
d = pathlib.Path({markers!r})
(d / f"started-{{os.getpid()}}").touch()
end = time.monotonic() + 120
while not (d / "release").exists() and time.monotonic() < end:
    time.sleep(0.02)
os.execv({tool!r}, [{tool!r}, *sys.argv[1:]])
"""


def _until(what: str, check: Callable[[], object], cap: float = CAP) -> None:
    deadline = time.monotonic() + cap
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {cap:g} s waiting for {what}")
        time.sleep(0.02)


def _sha1(data: bytes) -> str:
    return hashlib.sha1(data, usedforsecurity=False).hexdigest()


def _tls(sp: ServerProcess, timeout: float = CAP) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(sp.deployment.ca))
    raw = socket.create_connection(("127.0.0.1", sp.port), timeout=timeout)
    return ctx.wrap_socket(raw, server_hostname="127.0.0.1")


def _slow_deployment(
    root: Path, formats: list[str], job_timeout: float = JOB_TIMEOUT
) -> tuple[Deployment, Path]:
    """A deployment whose osslsigncode jobs wait until the test releases them; it and the
    folder of the tool's "started" marks."""
    d = Deployment.create(root / "dep", "dep", formats)
    markers = root / "markers"
    markers.mkdir()
    tool = shutil.which("osslsigncode")
    assert tool is not None
    blocker = root / "osslsigncode-held"
    blocker.write_text(BLOCKER.format(python=sys.executable, markers=str(markers), tool=tool))
    blocker.chmod(0o755)
    cfg = tomllib.loads(d.config.read_text())
    cfg["server"].update(job_timeout=job_timeout, get_hold=60.0)
    cfg["formats"][SLOW]["osslsigncode"] = str(blocker)
    d.config.write_text(tomli_w.dumps(cfg))
    return d, markers


def _inputs(folder: Path, count: int) -> list[Path]:
    """Distinct small MSI files (PE files sign in-process: only MSI and the like run the tool)."""
    folder.mkdir(parents=True, exist_ok=True)
    return [write_msi(folder, f"app{i}.msi", b"payload %d\n" % i * (1000 + i)) for i in range(count)]


def _job_lines(sp: ServerProcess) -> dict[tuple[str, str], str]:
    jobs = [e for e in sp.log_lines() if e.get("event") == "job"]
    return {(str(e["format"]), str(e["sha1"])): str(e["outcome"]) for e in jobs}


def _event(sp: ServerProcess, name: str) -> dict[str, object] | None:
    return next((e for e in sp.log_lines() if e.get("event") == name), None)


def _post(sp: ServerProcess, token: str, fmt: str, path: Path) -> httpx.Response:
    data = path.read_bytes()
    fields = {"sha1": _sha1(data), "filename": path.name, "token": token}
    ctx = ssl.create_default_context(cafile=str(sp.deployment.ca))
    with httpx.Client(verify=ctx, timeout=CAP) as c:
        return c.post(f"{sp.server.url}/sign/{fmt}", data=fields, files={"filedata": (path.name, data)})


class _SlowUpload:
    """A 64 MiB upload over a raw TLS socket, sent in two parts at the test's command."""

    def __init__(self, sp: ServerProcess, token: str) -> None:
        self.block = os.urandom(BLOCK)
        digest = hashlib.sha1(usedforsecurity=False)
        for _ in range(BLOCKS):
            digest.update(self.block)
        self.sha1 = digest.hexdigest()
        boundary = secrets.token_hex(16)
        fields = {"sha1": self.sha1, "filename": "big.bin", "token": token}
        part = '--{}\r\nContent-Disposition: form-data; name="{}"\r\n\r\n{}\r\n'
        head = "".join(part.format(boundary, k, v) for k, v in fields.items())
        head += f'--{boundary}\r\nContent-Disposition: form-data; name="filedata"; filename="big.bin"\r\n\r\n'
        self.tail = f"\r\n--{boundary}--\r\n".encode()
        length = len(head) + BLOCKS * BLOCK + len(self.tail)
        self.sock = _tls(sp)
        self.sock.sendall(
            f"POST /sign/gpg HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {length}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n{head}".encode()
        )

    def send(self, blocks: int) -> None:
        for _ in range(blocks):
            self.sock.sendall(self.block)

    def finish(self) -> http.client.HTTPResponse:
        self.send(BLOCKS - SENT_BEFORE_STOP)
        self.sock.sendall(self.tail)
        response = http.client.HTTPResponse(self.sock)
        try:
            response.begin()
            response.read()
        finally:
            self.sock.close()  # the answer says Connection: close
        return response


def _closed(sock: ssl.SSLSocket) -> bool:
    """True once the server has closed ``sock`` (raises if it stays open for its timeout)."""
    try:
        return sock.recv(1) == b""
    except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionResetError):
        return True


def test_sigterm_drains_uploads_polls_and_jobs(tmp_path: Path) -> None:
    d, markers = _slow_deployment(tmp_path, ["gpg", SLOW])
    sp = start_server(d)
    try:
        token = sp.token()

        def running(n: int) -> bool:
            return len(list(markers.glob("started-*"))) >= n

        # Two slow jobs submitted before the stop, held in their tool until released.
        inputs = _inputs(tmp_path / "in", 3)
        sha1s = [_sha1(p.read_bytes()) for p in inputs]
        for p in inputs[:2]:
            assert _post(sp, token, SLOW, p).status_code == 202
        _until("two slow jobs running", lambda: running(2))
        # A long poll held for a slow job (the GET itself starts it: the input is on the server).
        with sp.client() as c:
            assert c.sign(inputs[2], ["gpg"], tmp_path / "third.asc").ok
        polled: dict[str, object] = {}

        def long_poll() -> None:
            ctx = ssl.create_default_context(cafile=str(d.ca))
            with httpx.Client(verify=ctx, timeout=CAP) as c:
                r = c.get(f"{sp.server.url}/sign/{SLOW}/{sha1s[2]}")
            polled.update(status=r.status_code, pending=r.headers.get("X-Pending"), jobs=_job_lines(sp))

        poller = threading.Thread(target=long_poll, daemon=True)
        poller.start()
        _until("the polled slow job running", lambda: running(3))
        # An idle keep-alive connection.
        idle = _tls(sp, PROMPT)
        idle.sendall(b"GET /__heartbeat__ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        beat = http.client.HTTPResponse(idle)
        beat.begin()
        assert beat.status == 200 and json.loads(beat.read())["status"] == "ok"
        # An upload still sending its body. Once sendall returns, the server has read all of
        # its first part but what the socket buffers hold (a few MiB of 16): it is inside the
        # handler. (gpg keeps a big upload's digests, not its bytes: there is no file to watch.)
        upload = _SlowUpload(sp, token)
        upload.send(SENT_BEFORE_STOP)

        sigterm = time.monotonic()
        sp.proc.send_signal(signal.SIGTERM)
        _until("the stopping line", lambda: _event(sp, "stopping"), PROMPT)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", sp.port), timeout=PROMPT).close()
        # The long poll is answered now, with its usual "pending", while its job still runs.
        poller.join(PROMPT)
        assert not poller.is_alive(), "the long poll was held through the drain"
        assert polled["status"] == 404 and polled["pending"] == "True", polled
        assert (SLOW, sha1s[2]) not in polled["jobs"]  # type: ignore[operator]
        # The idle keep-alive connection is closed.
        assert _closed(idle), "the idle keep-alive connection was left open"
        idle.close()
        # The upload sends the rest of its body and is answered.
        answer = upload.finish()
        assert answer.status == 202, answer.status
        assert answer.getheader("Connection", "").lower() == "close"
        (markers / "release").touch()
        sp.proc.wait(JOB_TIMEOUT + 30)
        drained = time.monotonic() - sigterm
        assert sp.proc.returncode == 0, sp.log.read_text()
        assert drained < JOB_TIMEOUT + 5, drained
        jobs = _job_lines(sp)
        for sha1 in sha1s:
            assert jobs.get((SLOW, sha1)) == "signed", jobs
        assert jobs.get(("gpg", upload.sha1)) == "signed", jobs
        stopped = _event(sp, "stopped")
        assert stopped is not None, sp.log.read_text()
        assert stopped["requests"] >= 2 and stopped["jobs"] >= 4 and stopped["unfinished_jobs"] == 0, stopped  # type: ignore[operator]
        print(f"drain: {drained:.2f} s from SIGTERM to exit; stopped line: {stopped}")
    finally:
        (markers / "release").touch()
        sp.stop()

    # Nothing was lost: a new server on the same store answers every result at once.
    sp = start_server(d)
    try:
        ctx = ssl.create_default_context(cafile=str(d.ca))
        with httpx.Client(verify=ctx, timeout=CAP) as hc:
            for sha1 in sha1s:
                assert hc.get(f"{sp.server.url}/sign/{SLOW}/{sha1}").status_code == 200
            r = hc.get(f"{sp.server.url}/sign/gpg/{upload.sha1}")
        assert r.status_code == 200
        big = tmp_path / "big.bin"
        big.write_bytes(upload.block * BLOCKS)
        (tmp_path / "big.bin.asc").write_bytes(r.content)
        assert gpg_verify(tmp_path / "big.bin.asc", big, d.public / "gpg.asc").returncode == 0
    finally:
        sp.stop()


@pytest.mark.parametrize("second_signal", [False, True], ids=["bounded", "second-signal"])
def test_a_hung_job_does_not_hold_the_exit(tmp_path: Path, second_signal: bool) -> None:
    """A job that never finishes: the drain ends at job_timeout (or at a second signal) and
    the server exits 0 without waiting for the job's thread."""
    job_timeout = 60.0 if second_signal else 4.0
    d, markers = _slow_deployment(tmp_path, [SLOW], job_timeout)
    sp = start_server(d)
    try:
        assert _post(sp, sp.token(), SLOW, _inputs(tmp_path / "in", 1)[0]).status_code == 202
        _until("the slow job running", lambda: any(markers.glob("started-*")))
        sigterm = time.monotonic()
        sp.proc.send_signal(signal.SIGTERM)
        _until("the stopping line", lambda: _event(sp, "stopping"), PROMPT)
        if second_signal:
            sp.proc.send_signal(signal.SIGINT)
            sp.proc.wait(PROMPT)  # well before job_timeout
            assert _event(sp, "hurry") is not None
        else:
            sp.proc.wait(job_timeout + 5)
        drained = time.monotonic() - sigterm
        assert sp.proc.returncode == 0, sp.log.read_text()
        stopped = _event(sp, "stopped")
        assert stopped is not None and stopped["unfinished_jobs"] == 1, sp.log.read_text()
        assert stopped["hurried"] is second_signal
        assert _event(sp, "abandoned") is not None  # said so, instead of waiting for the thread
        print(f"hung job, second signal {second_signal}: exit {drained:.2f} s after SIGTERM")
    finally:
        (markers / "release").touch()
        sp.stop()
