"""A pool of three replicas behind the real HAProxy (TCP mode, TLS passed through, PROXY v2),
configured from the shipped ``packaging/haproxy/haproxy.cfg``.

Through it ``sealbox sign`` and the real signtool 4.0.1 sign a few hundred files while the
replica they use is killed (SIGKILL, mid-run): none is lost, every signature verifies.
Source affinity keeps each client on one replica; after the loss its clients land on
another, which does not know their jobs (404) and gets the files again. The replicas see the
client's own address (IP-bound tokens), and HAProxy takes out a replica whose heartbeat fails.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import tomli_w

from sealbox.client import SigningClient, request_token
from sealbox.deploy.haproxy import HAProxy
from tests.servers import BIN, Deployment, ServerProcess, env_without_proxy, start_server

# Not skipped without haproxy: scripts/bootstrap.sh installs it, and `make test` runs this.
pytestmark = pytest.mark.slow

CAP = 180.0  # bound of every wait
CLI_FILES = 300
SIGNTOOL_RUNS, SIGNTOOL_FILES = 4, 12  # signtool signs one file at a time, a second or more each
KILL_AFTER = 40  # uploads the busy replica has taken when it is killed


def _until(what: str, check: Callable[[], object], cap: float = CAP) -> None:
    deadline = time.monotonic() + cap
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {cap:g} s waiting for {what}")
        time.sleep(0.02)


@contextmanager
def pool(tmp: Path) -> Iterator[tuple[Deployment, list[ServerProcess], HAProxy]]:
    """One deployment, three replicas (each its own data dir), HAProxy in front."""
    d = Deployment.create(tmp / "dep", "dep", ["gpg"])
    cfg = tomllib.loads(d.config.read_text())
    cfg["server"]["trusted_proxies"] = ["127.0.0.1/32"]
    d.config.write_text(tomli_w.dumps(cfg))
    replicas: list[ServerProcess] = []
    haproxy = None
    try:
        for i in (1, 2, 3):
            replicas.append(start_server(d, extra=["--data-dir", str(tmp / f"replica{i}")]))
        haproxy = HAProxy(tmp, replicas, d.ca)
        haproxy.wait_up(CAP)
        yield d, replicas, haproxy
    finally:
        if haproxy is not None:
            haproxy.stop()
        for r in replicas:
            r.stop()


def _uploads(sp: ServerProcess) -> list[dict[str, object]]:
    """Uploads the replica took (202 Accepted, or 200 when the client waited for the result)."""
    return [
        e
        for e in sp.log_lines()
        if e.get("event") == "request"
        and e.get("method") == "POST"
        and str(e.get("path")).startswith("/sign/")
        and e.get("status") in (200, 202)
    ]


def _inputs(folder: Path, count: int, tag: str) -> list[Path]:
    folder.mkdir(parents=True)
    files = []
    for i in range(count):
        p = folder / f"{tag}{i:03d}.bin"
        p.write_bytes(f"{tag} {i}\n".encode() + os.urandom(2048))
        files.append(p)
    return files


def _gpgv(public_key: Path, tmp: Path) -> Callable[[Path, Path], bool]:
    """A verifier of detached signatures with the level's public key (gpgv, one keyring)."""
    home = tmp / "gpgv"
    home.mkdir(mode=0o700)
    keyring = home / "keyring.gpg"
    subprocess.run(["gpg", "--dearmor", "--output", str(keyring), str(public_key)], check=True)

    def verify(signature: Path, data: Path) -> bool:
        res = subprocess.run(
            ["gpgv", "--homedir", str(home), "--keyring", str(keyring), str(signature), str(data)],
            capture_output=True,
            check=False,
        )
        return res.returncode == 0

    return verify


def test_pool_behind_haproxy(tmp_path: Path) -> None:
    with pool(tmp_path) as (d, replicas, haproxy):
        user, password = d.auth
        # Minted through the proxy: the issuer check sees the client (127.0.0.1), not HAProxy.
        token = request_token(haproxy.server, d.ca, user, password, "127.0.0.1", 1800)
        token_file = tmp_path / "token"
        token_file.write_text(token)
        hostspec = haproxy.hostspec

        cli_in, cli_out = tmp_path / "cli-in", tmp_path / "cli-out"
        cli_files = _inputs(cli_in, CLI_FILES, "cli")
        args = [str(BIN / "sealbox"), "sign", "-H", hostspec, "-c", str(d.ca), "-t", str(token_file)]
        args += ["-f", "gpg", "-d", str(cli_out), "-j", "8", "--timeout", "150", "-q", str(cli_in)]
        cli = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env_without_proxy(),
        )
        signtools = []
        for k in range(SIGNTOOL_RUNS):
            files = _inputs(tmp_path / f"st{k}-in", SIGNTOOL_FILES, f"st{k}-")
            out = tmp_path / f"st{k}-out"
            args = [str(BIN / "signtool"), "-H", hostspec, "-c", str(d.ca), "-t", str(token_file)]
            args += ["-n", str(tmp_path / f"nonce{k}"), "-f", "gpg", "-d", str(out), *map(str, files)]
            proc = subprocess.Popen(
                args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env_without_proxy()
            )
            signtools.append((proc, files, out))

        # Affinity: every upload from 127.0.0.1 goes to one replica, the busy one.
        _until(
            f"{KILL_AFTER} uploads on a replica",
            lambda: any(len(_uploads(r)) >= KILL_AFTER for r in replicas),
        )
        busy = next(r for r in replicas if len(_uploads(r)) >= KILL_AFTER)
        others = [r for r in replicas if r is not busy]
        assert all(not _uploads(r) for r in others), "source affinity: one client, one replica"
        assert cli.poll() is None and all(p.poll() is None for p, _, _ in signtools), "mid-run"
        busy.proc.kill()  # a crash: its queued and running jobs are gone with it
        busy.proc.wait()
        name = f"replica{replicas.index(busy) + 1}"
        _until(f"{name} DOWN in HAProxy", lambda: haproxy.state(name).startswith("DOWN"))

        _, err = cli.communicate(timeout=CAP)
        assert cli.returncode == 0, err.decode()
        for proc, _, _ in signtools:
            log = proc.communicate(timeout=CAP)[0].decode()
            assert proc.returncode == 0, log

        verify = _gpgv(d.public / "gpg.asc", tmp_path)
        for f in cli_files:
            assert verify(cli_out / (f.name + ".asc"), f), f
        for _, files, st_out in signtools:
            for f in files:
                assert verify(st_out / f.name, f), f  # signtool names a gpg signature like its input
        # The files the busy replica never finished went to the others, uploaded again
        # (to one of them: the next on HAProxy's hash ring; a retry may also have been
        # redispatched before the loss was noticed).
        moved = [e for r in others for e in _uploads(r)]
        assert moved and {e["peer"] for e in moved} == {"127.0.0.1"}
        assert len(_uploads(busy)) + len(moved) >= CLI_FILES + SIGNTOOL_RUNS * SIGNTOOL_FILES
        successor = max(others, key=lambda r: len(_uploads(r)))
        # Each replica kept its files in its own data dir (--data-dir), none in the shared one.
        assert not (d.root / "data").exists()
        assert all((tmp_path / f"replica{i}" / "tmp").is_dir() for i in (1, 2, 3))

        # Tokens: the replica sees the address HAProxy reports, the client's own.
        other_ip = request_token(haproxy.server, d.ca, user, password, "127.0.0.2", 600)
        sample = _inputs(tmp_path / "token-check", 2, "tok")
        with SigningClient([haproxy.server], d.ca, other_ip, source_address="127.0.0.1", timeout=60) as c:
            refused = c.sign(sample[0], ["gpg"], tmp_path / "refused.asc")
        assert not refused.ok and "Invalid token" in str(refused.error), refused.error
        with SigningClient([haproxy.server], d.ca, other_ip, source_address="127.0.0.2", timeout=60) as c:
            signed = c.sign(sample[1], ["gpg"], tmp_path / "signed.asc")
        assert signed.ok, signed.error
        assert verify(tmp_path / "signed.asc", sample[1])

        # A failing heartbeat takes a replica out: the successor's data dir stops being
        # writable (its tmp/ becomes a file), its heartbeat answers 503, HAProxy marks it DOWN.
        successor_name = f"replica{replicas.index(successor) + 1}"
        scratch = tmp_path / f"replica{replicas.index(successor) + 1}" / "tmp"
        scratch.rename(scratch.with_name("tmp.moved"))
        scratch.write_text("not a folder\n")
        try:
            _until(f"{successor_name} DOWN", lambda: haproxy.state(successor_name) == "DOWN L7STS")
            row = haproxy.servers()[successor_name]
            assert row["check_code"] == "503", row
            # Signing goes on with the replica left.
            last = _inputs(tmp_path / "last", 1, "last")[0]
            with SigningClient([haproxy.server], d.ca, token, timeout=60) as c:
                assert c.sign(last, ["gpg"], tmp_path / "last.asc").ok
            assert verify(tmp_path / "last.asc", last)
            remaining = next(r for r in others if r is not successor)  # the only one UP
            digest = hashlib.sha1(last.read_bytes(), usedforsecurity=False).hexdigest()
            _until("the last file's job on the last replica", lambda: digest in remaining.log.read_text())
        finally:
            scratch.unlink()
            scratch.with_name("tmp.moved").rename(scratch)
        _until(f"{successor_name} UP again", lambda: haproxy.state(successor_name) == "UP L7OK")
