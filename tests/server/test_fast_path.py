"""The small-file fast path: waited uploads, signing worker processes, one server per data folder."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import ssl
import time
from pathlib import Path

import httpx
import psutil

from sealbox.client import AsyncSigningClient, SigningClient
from sealbox.formats import signer_class
from tests.servers import Deployment, ServerProcess, gpg_verify, start_server


def _form(server: ServerProcess, data: bytes, name: str = "f.bin") -> dict[str, str]:
    return {
        "sha1": hashlib.sha1(data, usedforsecurity=False).hexdigest(),
        "filename": name,
        "token": server.token(),
        "nonce": "",
    }


def _post(
    server: ServerProcess,
    data: bytes,
    headers: dict[str, str] | None = None,
    name: str = "f.bin",
    fmt: str = "gpg",
) -> httpx.Response:
    ctx = ssl.create_default_context(cafile=str(server.deployment.ca))
    with httpx.Client(verify=ctx, timeout=60) as c:
        return c.post(
            f"{server.server.url}/sign/{fmt}",
            data=_form(server, data, name),
            files={"filedata": (name, data)},
            headers=headers or {},
        )


def test_classic_upload_is_202_and_waited_upload_returns_the_result(
    gpg_server: ServerProcess, tmp_path: Path
) -> None:
    classic = os.urandom(3000)
    r = _post(gpg_server, classic)
    assert r.status_code == 202 and r.headers["X-Nonce"] == "UNUSED"  # what signtool expects
    waited = os.urandom(3000)
    r = _post(gpg_server, waited, {"X-Sealbox-Wait": "20"})
    assert r.status_code == 200, r.text
    assert r.headers["X-SHA1-Digest"] == hashlib.sha1(r.content, usedforsecurity=False).hexdigest()
    (tmp_path / "w.bin").write_bytes(waited)
    (tmp_path / "w.bin.asc").write_bytes(r.content)
    assert _valid(tmp_path / "w.bin.asc", tmp_path / "w.bin", gpg_server.deployment.public / "gpg.asc")
    # The same file again: known to the server, answered at once without reading the upload.
    r = _post(gpg_server, waited, {"X-Sealbox-Wait": "20"})
    assert r.status_code == 200 and r.headers["X-SHA1-Digest"]
    # A nonsense wait is ignored: the classic answer.
    assert _post(gpg_server, os.urandom(3000), {"X-Sealbox-Wait": "nan"}).status_code == 202


def _valid(sig: Path, data: Path, public: Path) -> bool:
    res = gpg_verify(sig, data, public)
    return res.returncode == 0 and b"VALIDSIG" in res.stdout


def _workers(server: ServerProcess) -> list[psutil.Process]:
    return psutil.Process(server.proc.pid).children()  # at rest, only the forked signing workers


def _ran_in(server: ServerProcess, files: list[Path]) -> list[object]:
    """Where each file's gpg job ran, from the server's job log lines (waits for all of them)."""
    sha1s = [hashlib.sha1(f.read_bytes(), usedforsecurity=False).hexdigest() for f in files]

    def jobs(lines: list[dict[str, object]]) -> dict[object, object]:
        return {e["sha1"]: e.get("ran_in") for e in lines if e.get("event") == "job" and e["format"] == "gpg"}

    logged = jobs(server.wait_log(lambda lines: set(sha1s) <= jobs(lines).keys()))
    return [logged[s] for s in sha1s]


def test_small_jobs_run_in_worker_processes_and_survive_their_loss(tmp_path: Path) -> None:
    d = Deployment.create(tmp_path / "wk", "dep", ["gpg"])
    sp = start_server(d)
    try:
        workers = _workers(sp)
        assert len(workers) == min(4, os.cpu_count() or 1)
        files = []
        for i in range(20):
            f = tmp_path / f"f{i}.bin"
            f.write_bytes(os.urandom(2000))
            files.append(f)
        with sp.client() as c:
            outs = c.sign_many([(f, ["gpg"], None) for f in files], jobs=4)
        assert all(o.ok for o in outs) and [o.source for o in outs] == files  # in order
        assert _ran_in(sp, files) == ["worker"] * len(files)  # the workers signed
        for w in workers:  # every worker dies: small jobs fall back to threads
            w.send_signal(signal.SIGKILL)
        # The server has seen every worker go (and reaped it) before the next job.
        sp.wait_log(lambda lines: sum(e.get("event") == "worker_gone" for e in lines) == len(workers))
        late = tmp_path / "late.bin"
        late.write_bytes(os.urandom(2000))
        with sp.client(timeout=60) as c:
            out = c.sign(late, ["gpg"])
        assert out.ok, out.error
        assert _valid(late.with_name("late.bin.asc"), late, d.public / "gpg.asc")
        assert _ran_in(sp, [late]) == ["thread"]
    finally:
        assert sp.stop() == 0


def _gone(w: psutil.Process) -> bool:
    try:
        return not w.is_running() or w.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_stop_is_prompt_and_leaves_no_worker(tmp_path: Path) -> None:
    d = Deployment.create(tmp_path / "st", "dep", ["gpg"])
    sp = start_server(d)
    workers = _workers(sp)
    assert workers
    assert sp.stop() == 0
    assert all(_gone(w) for w in workers)
    # Prompt: each worker exits by itself once its pipe closes, so the server never waits for one
    # and kills it. Seen with a server that can do neither: killed, it only closes the pipes.
    sp = start_server(d)
    workers = _workers(sp)
    sp.stop(signal.SIGKILL)
    deadline = time.monotonic() + 60
    while not all(_gone(w) for w in workers):
        assert time.monotonic() < deadline, "a signing worker outlived its server"
        time.sleep(0.05)


def test_one_server_per_data_folder(tmp_path: Path) -> None:
    d = Deployment.create(tmp_path / "lk", "dep", ["gpg"])
    first = start_server(d)
    try:
        second = start_server(d, wait=False)
        assert second.proc.wait(60) == 2
        assert "is in use by another sealbox server" in second.log.read_text()
    finally:
        first.stop()


def test_async_client_and_token_from_async_code(gpg_server: ServerProcess, payload: Path) -> None:
    async def main() -> bool:
        token = gpg_server.token()  # the blocking helper works inside a running loop too
        async with AsyncSigningClient([gpg_server.server], gpg_server.deployment.ca, token) as c:
            out = await c.sign(payload, ["gpg"])
        return out.ok

    assert asyncio.run(main())
    assert _valid(payload.with_name(payload.name + ".asc"), payload, gpg_server.deployment.public / "gpg.asc")


def test_blocking_client_is_usable_from_many_threads(gpg_server: ServerProcess, tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    files = []
    for i in range(12):
        f = tmp_path / f"t{i}.bin"
        f.write_bytes(os.urandom(1500))
        files.append(f)
    started = time.monotonic()
    with (
        SigningClient([gpg_server.server], gpg_server.deployment.ca, gpg_server.token()) as c,
        ThreadPoolExecutor(6) as pool,
    ):
        results = list(pool.map(lambda f: c.sign_one(f, "gpg", f.with_name(f.name + ".asc")), files))
    assert all(url == gpg_server.server.url for url, _ in results)
    assert time.monotonic() - started < 60
    assert all(f.with_name(f.name + ".asc").stat().st_size > 100 for f in files)


def _get(server: ServerProcess, fmt: str, sha1: str) -> httpx.Response:
    ctx = ssl.create_default_context(cafile=str(server.deployment.ca))
    with httpx.Client(verify=ctx, timeout=90) as c:
        for _ in range(10):  # long-polls; a job still running answers 404 + X-Pending
            r = c.get(f"{server.server.url}/sign/{fmt}/{sha1}")
            if "X-Pending" not in r.headers:
                return r
    return r


def test_content_held_for_one_format_signs_in_others_without_upload(tmp_path: Path) -> None:
    from sealbox.samples import pe

    d = Deployment.create(tmp_path / "held", "dep", ["gpg", "sha2signcode", "widevine"])
    sp = start_server(d)
    try:
        small = pe.write_pe(tmp_path)  # ~100 KiB: the worker path, kept as a row
        big = pe.write_large_pe(tmp_path, size=1024 * 1024)  # the thread path, kept as a file
        # a big file goes up for widevine: gpg keeps no big input (see the test below)
        for src, sent in ((small, "gpg"), (big, "widevine")):
            data = src.read_bytes()
            sha1 = hashlib.sha1(data, usedforsecurity=False).hexdigest()
            r = _post(sp, data, {"X-Sealbox-Wait": "30"}, src.name, sent)  # uploaded for one format
            assert r.status_code == 200, r.text
            for fmt in {"gpg", "widevine", "sha2signcode"} - {sent}:  # never uploaded for these
                got = _get(sp, fmt, sha1)
                assert got.status_code == 200, (fmt, got.status_code, got.headers)
                suffix = {"widevine": ".sig", "gpg": ".asc"}.get(fmt, "")
                out = tmp_path / f"{src.stem}-{fmt}{suffix or '.exe'}"
                out.write_bytes(got.content)
                signer_class(fmt).verify(fmt, out, src if suffix else None, d.public)
        uploads = [
            e for e in sp.log_lines() if e.get("method") == "POST" and str(e["path"]).startswith("/sign/")
        ]
        assert len(uploads) == 2  # one upload per file; the other formats needed none
    finally:
        sp.stop()


def test_big_gpg_upload_keeps_its_digests_not_its_bytes(tmp_path: Path) -> None:
    """gpg signs the SHA-256 taken as a big upload arrives: its bytes are never written to the
    store (one pass over them on the server), and another format asked for them later
    answers unknown (404), so the client uploads them again: nothing is signed from nothing."""
    d = Deployment.create(tmp_path / "digests", "dep", ["gpg", "widevine"])
    sp = start_server(d)
    try:
        src = tmp_path / "big.bin"
        src.write_bytes(os.urandom(3 * 1024 * 1024))
        data = src.read_bytes()
        sha1 = hashlib.sha1(data, usedforsecurity=False).hexdigest()
        r = _post(sp, data, {"X-Sealbox-Wait": "30"}, src.name)
        assert r.status_code == 200, r.text
        sig = tmp_path / "big.bin.asc"
        sig.write_bytes(r.content)
        signer_class("gpg").verify("gpg", sig, src, d.public)
        held = [p for p in (d.root / "data").rglob(f"{sha1}*") if "signed" not in p.parts]
        assert held == []  # the signature is stored (signed/gpg/<sha1>), the input is not
        assert _get(sp, "widevine", sha1).status_code == 404  # unknown: upload it
    finally:
        sp.stop()
