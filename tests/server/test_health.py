"""Dockerflow endpoints of a real server: ``/__heartbeat__`` checks the keys, the data dir and
the signing workers and goes 503 naming what failed; ``/__lbheartbeat__`` and ``/__version__``."""

from __future__ import annotations

import contextlib
import os
import signal
import ssl
import subprocess
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import tomli_w

import sealbox
from sealbox.server.health import KEY_CHECK_TTL
from tests.servers import Deployment, ServerProcess, start_server

CAP = 60.0  # bound of every wait
CHECKS = {"keys", "data_dir", "workers", "certificates", "signing_log", "formats"}


def _deployment(root: Path, **server: Any) -> Deployment:
    """gpg and emevoucher (both sign in the worker processes; emevoucher's key has a
    certificate), two signing processes, and ``server`` set in ``[server]``."""
    d = Deployment.create(root / "dep", "dep", ["gpg", "emevoucher"])
    cfg = tomllib.loads(d.config.read_text())
    cfg["server"].update({"signing_processes": 2, **server})
    d.config.write_text(tomli_w.dumps(cfg))
    return d


def _get(sp: ServerProcess, path: str) -> httpx.Response:
    with httpx.Client(verify=ssl.create_default_context(cafile=str(sp.deployment.ca)), timeout=CAP) as c:
        return c.get(f"{sp.server.url}{path}")


def _until(sp: ServerProcess, done: Callable[[httpx.Response], bool]) -> httpx.Response:
    """Heartbeats until ``done`` holds for one (at most CAP seconds): a wait on a fact."""
    deadline = time.monotonic() + CAP
    while True:
        r = _get(sp, "/__heartbeat__")
        if done(r):
            return r
        if time.monotonic() > deadline:
            raise AssertionError(f"heartbeat never got there: {r.status_code} {r.text}")
        time.sleep(0.1)


@contextlib.contextmanager
def _served(d: Deployment) -> Iterator[ServerProcess]:
    sp = start_server(d)
    try:
        yield sp
    finally:
        sp.stop()


def _data_dir(d: Deployment) -> Path:
    return d.root / str(tomllib.loads(d.config.read_text())["server"]["data_dir"])


def test_heartbeat_names_every_check_lbheartbeat_and_version(tmp_path: Path) -> None:
    d = _deployment(tmp_path)
    with _served(d) as sp:
        r = _get(sp, "/__heartbeat__")
        assert r.status_code == 200, r.text
        beat = r.json()
        # What the client and older tests read is still there.
        assert beat["status"] == "ok" and beat["level"] == "dep"
        assert beat["formats"] == ["emevoucher", "gpg"]
        assert beat["failed"] == []
        checks = beat["checks"]
        assert set(checks) == CHECKS
        assert all(c["status"] == "ok" for c in checks.values()), checks
        assert checks["keys"]["keys"] == {"emevoucher": "ok", "gpg": "ok", "signlog": "ok"}  # log key too
        assert checks["data_dir"]["free_bytes"] >= checks["data_dir"]["min_free_bytes"] > 0
        assert (checks["workers"]["alive"], checks["workers"]["started"]) == (2, 2)
        assert set(checks["certificates"]["expires"]) == {"emevoucher", "(tls)"}
        # The probe file of the data dir check is gone again.
        assert not [p for p in (_data_dir(d) / "tmp").iterdir() if p.name.startswith("heartbeat")]

        lb = _get(sp, "/__lbheartbeat__")
        assert lb.status_code == 200 and lb.json() == {"status": "ok"}
        v = _get(sp, "/__version__")
        assert v.status_code == 200 and v.json() == {"version": sealbox.__version__}


def test_free_space_floor_fails_the_heartbeat(tmp_path: Path) -> None:
    d = _deployment(tmp_path, min_free_bytes=2**62)  # far above any real disk's free space
    with _served(d) as sp:
        r = _get(sp, "/__heartbeat__")
        assert r.status_code == 503, r.text
        beat = r.json()
        assert beat["status"] == "error" and beat["failed"] == ["data_dir"]
        assert "server.min_free_bytes" in beat["checks"]["data_dir"]["message"]
        assert beat["checks"]["keys"]["status"] == "ok"
        assert _get(sp, "/__lbheartbeat__").status_code == 200  # the process still serves


@contextlib.contextmanager
def _unwritable(folder: Path) -> Iterator[str]:
    """``folder`` made unwritable even for root (the tests run as root, where chmod stops
    nothing): the immutable attribute (``chattr +i``, ext2/3/4, xfs, btrfs); where that is not
    supported, the folder is swapped for a plain file. Yields which was used."""
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True, check=False).returncode == 0:
        try:
            yield "chattr +i"
        finally:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        return
    aside = folder.with_name(folder.name + ".aside")
    folder.rename(aside)
    folder.write_bytes(b"")
    try:
        yield "a file in its place"
    finally:
        folder.unlink()
        aside.rename(folder)


def test_unwritable_data_dir_fails_the_heartbeat_until_it_is_writable_again(tmp_path: Path) -> None:
    d = _deployment(tmp_path)
    with _served(d) as sp:
        assert _get(sp, "/__heartbeat__").status_code == 200
        with _unwritable(_data_dir(d) / "tmp") as how:
            r = _get(sp, "/__heartbeat__")
            assert r.status_code == 503, (how, r.text)
            beat = r.json()
            assert beat["failed"] == ["data_dir"], beat
            assert "cannot write in" in beat["checks"]["data_dir"]["message"]
        assert _get(sp, "/__heartbeat__").status_code == 200


def test_key_check_is_cached(tmp_path: Path) -> None:
    d = _deployment(tmp_path)
    with _served(d) as sp:
        started = time.monotonic()
        beats = [_get(sp, "/__heartbeat__").json() for _ in range(5)]
        elapsed = time.monotonic() - started
        lines = sp.wait_log(lambda ls: any(x.get("event") == "keys_checked" for x in ls))
        checked = [x for x in lines if x.get("event") == "keys_checked"]
        assert checked[0]["keys"] == 3 and checked[0]["failed"] == []  # gpg, emevoucher, the log key
        if elapsed < KEY_CHECK_TTL:  # five requests on loopback: always, bar a frozen machine
            assert len(checked) == 1, checked
            assert len({b["checks"]["keys"]["checked"] for b in beats}) == 1


def test_certificate_expiry_is_a_warning_not_a_failure(tmp_path: Path) -> None:
    d = _deployment(tmp_path, cert_expiry_warning_days=365 * 100)  # the dev certificates: 5 years
    with _served(d) as sp:
        r = _get(sp, "/__heartbeat__")
        assert r.status_code == 200, r.text
        beat = r.json()
        assert beat["status"] == "warning" and beat["failed"] == []
        certs = beat["checks"]["certificates"]
        assert certs["status"] == "warning"
        assert "key 'emevoucher' expires in" in certs["message"]
        assert "the TLS certificate expires in" in certs["message"]


def test_lost_signing_workers_warn_then_fail(tmp_path: Path, payload: Path) -> None:
    d = _deployment(tmp_path)
    with _served(d) as sp:
        workers = psutil.Process(sp.proc.pid).children()
        assert len(workers) == 2, workers  # the forked signing processes (gpg signs in-process)
        os.kill(workers[0].pid, signal.SIGKILL)
        r = _until(sp, lambda r: r.json()["checks"]["workers"]["alive"] == 1)
        assert r.status_code == 200 and r.json()["checks"]["workers"]["status"] == "warning"
        os.kill(workers[1].pid, signal.SIGKILL)
        r = _until(sp, lambda r: r.json()["checks"]["workers"]["alive"] == 0)
        assert r.status_code == 503 and r.json()["failed"] == ["workers"], r.text
        with sp.client() as c:  # still signing, in threads: the 503 drains a slower server
            assert c.sign(payload, ["gpg"]).ok
