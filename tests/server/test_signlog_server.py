"""The signing log of a real server: every released signature recorded first and provable,
fail-closed on a real full file system, no record lost when the server is killed mid-signing,
``sealbox sign --log-proof`` and the task runner's chain-of-trust record."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import ssl
import subprocess
import time
import tomllib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil
import tomli_w
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sealbox.client import SigningClient
from sealbox.deploy.taskdev import init_worker_dev
from sealbox.samples import pe
from sealbox.signlog import Checkpoint, parse_public_key, public_key_text
from sealbox.signlog.merkle import leaf_hash, verify_consistency, verify_inclusion
from sealbox.task import cot
from tests.servers import BIN, Deployment, ServerProcess, start_server
from tests.signlog.fs import fill, small_tmpfs
from tests.task.helpers import entry, run, write_task, write_upstream

CAP = 60.0  # bound of every wait
INDEX = "X-Sealbox-Log-Index"


def _client(sp: ServerProcess) -> httpx.Client:
    return httpx.Client(verify=ssl.create_default_context(cafile=str(sp.deployment.ca)), timeout=CAP)


def _upload(sp: ServerProcess, data: bytes, name: str, token: str, fmt: str = "gpg") -> httpx.Response:
    """A waited upload (the server answers with the result once signed)."""
    sha1 = hashlib.sha1(data, usedforsecurity=False).hexdigest()
    with _client(sp) as c:
        return c.post(
            f"{sp.server.url}/sign/{fmt}",
            data={"sha1": sha1, "filename": name, "token": token, "nonce": ""},
            files={"filedata": (name, data)},
            headers={"X-Sealbox-Wait": "30"},
        )


def _get(sp: ServerProcess, path: str) -> httpx.Response:
    with _client(sp) as c:
        return c.get(f"{sp.server.url}{path}")


def _log_key(d: Deployment) -> Any:
    return parse_public_key((d.public / "signlog.pub").read_text())


def _proven(sp: ServerProcess, index: int) -> dict[str, Any]:
    """Entry ``index`` as the server proves it: inclusion checked against the checkpoint, the
    checkpoint's signature against the deployment's public log key."""
    answer = _get(sp, f"/log/proof/{index}").json()
    raw = base64.b64decode(answer["entry"])
    cp = Checkpoint.from_json(answer["checkpoint"])
    assert cp.verify(_log_key(sp.deployment)) and cp.size == answer["tree_size"] > index
    verify_inclusion(leaf_hash(raw), index, cp.size, [bytes.fromhex(h) for h in answer["hashes"]], cp.root)
    entry_obj: dict[str, Any] = json.loads(raw)
    assert entry_obj["index"] == index
    return entry_obj


def _fingerprint(d: Deployment, key: str) -> str:
    pem = (d.root / "keys" / f"{key}.pem").read_bytes()
    private = serialization.load_pem_private_key(pem, d.passphrases()[key].encode())
    der = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256:" + hashlib.sha256(der).hexdigest()


def _verify_log(d: Deployment, folder: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *(str(BIN / "sealbox"), "log", "verify", str(folder or d.root / "data" / "log")),
            *("--public", str(d.public / "signlog.pub"), "--json"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )


def _until(what: Callable[[], bool], message: str) -> None:
    deadline = time.monotonic() + CAP
    while not what():
        assert time.monotonic() < deadline, message
        time.sleep(0.05)


def test_every_released_signature_is_recorded_and_provable(tmp_path: Path) -> None:
    """A worker-process job, a thread job and a job a GET started: each answer names its entry;
    the entry holds what the issue lists and is proven against a checkpoint signed by the key in
    DIR/public; the checkpoints are consistent; after the stop the offline audit passes."""
    d = Deployment.create(tmp_path / "dep", "dep", ["gpg", "widevine"])
    sp = start_server(d)
    try:
        token = sp.token(duration=600)
        small = pe.write_pe(tmp_path)  # ~100 KiB: a signing worker process
        big = pe.write_large_pe(tmp_path, size=1024 * 1024)  # a job thread
        answers = {}
        for src in (small, big):
            r = _upload(sp, src.read_bytes(), src.name, token)
            assert r.status_code == 200 and INDEX in r.headers, (r.status_code, r.text)
            answers[src.name] = r
            if src is small:  # a checkpoint of the tree of one entry, made for this proof
                first = Checkpoint.from_json(_get(sp, "/log/proof/0").json()["checkpoint"])
                assert first.size == 1
        small_sha1 = hashlib.sha1(small.read_bytes(), usedforsecurity=False).hexdigest()
        held = _get(sp, f"/sign/widevine/{small_sha1}")  # content held: a job a GET started
        assert held.status_code == 200 and INDEX in held.headers
        again = _get(sp, f"/sign/gpg/{small_sha1}")  # the same result later names the same entry
        assert again.headers[INDEX] == answers[small.name].headers[INDEX]

        fingerprint = _fingerprint(d, "gpg")
        instance = json.loads((d.root / "data" / "log" / "log.json").read_text())["instance"]
        for src, ran_in in ((small, "worker"), (big, "thread")):
            r = answers[src.name]
            e = _proven(sp, int(r.headers[INDEX]))
            data = src.read_bytes()
            assert e["format"] == "gpg" and e["level"] == "dep" and e["ran_in"] == ran_in
            assert e["key"] == {"name": "gpg", "fingerprint": fingerprint}
            assert e["input"] == {
                "sha1": hashlib.sha1(data, usedforsecurity=False).hexdigest(),
                "sha256": hashlib.sha256(data).hexdigest(),
                "size": len(data),
                "filename": src.name,
            }
            assert e["output"] == {
                "sha1": r.headers["X-SHA1-Digest"],
                "sha256": hashlib.sha256(r.content).hexdigest(),
                "size": len(r.content),
            }
            tok = e["request"].pop("token")
            assert e["request"] == {"kind": "upload", "client": "127.0.0.1"}
            assert tok["ip"] == "127.0.0.1" and tok["valid_to"] - tok["valid_from"] == 600
            assert tok["issuer"] == d.auth[0]  # this server minted it
            assert e["server"]["instance"] == instance
            assert token.partition("!")[2] not in json.dumps(e)  # no token MAC
        e = _proven(sp, int(held.headers[INDEX]))
        assert e["format"] == "widevine" and e["request"] == {"kind": "get", "client": "127.0.0.1"}
        assert e["output"]["sha256"] == hashlib.sha256(held.content).hexdigest()

        cp = _get(sp, "/log/checkpoint").json()
        latest = Checkpoint.from_json(cp)
        assert latest.verify(_log_key(d)) and latest.size == 3
        assert cp["public_key"] == (d.public / "signlog.pub").read_text().strip()
        assert cp["note"].startswith(f"{latest.origin}\n3\n") and "\n\u2014 " in cp["note"]
        proof = _get(sp, f"/log/consistency/{first.size}/{latest.size}").json()
        hashes = [bytes.fromhex(h) for h in proof["hashes"]]
        verify_consistency(first.size, latest.size, first.root, latest.root, hashes)
        assert _get(sp, "/log/proof/3").status_code == 404
        assert _get(sp, "/log/proof/x1").status_code == 400
        beat = _get(sp, "/__heartbeat__").json()
        assert (
            beat["checks"]["signing_log"]["status"] == "ok" and beat["checks"]["signing_log"]["entries"] == 3
        )
    finally:
        sp.stop()
    done = _verify_log(d)
    assert done.returncode == 0, done.stdout + done.stderr
    (report,) = json.loads(done.stdout)
    assert report["entries"] == 3 and report["warnings"] == []  # the stop wrote a last checkpoint


def test_sign_cli_and_library_check_each_signature_in_the_log(tmp_path: Path) -> None:
    d = Deployment.create(tmp_path / "dep", "dep", ["gpg"])
    off = Deployment.create(tmp_path / "off", "dep", ["gpg"])  # the same, its log off
    cfg = tomllib.loads(off.config.read_text())
    cfg["log"]["enabled"] = False
    off.config.write_text(tomli_w.dumps(cfg))
    files = []
    for i in range(3):
        files.append(tmp_path / f"f{i}.bin")
        files[-1].write_bytes(os.urandom(2000 + i))
    other = tmp_path / "other.pub"
    other.write_text(public_key_text(Ed25519PrivateKey.generate().public_key()))
    sp, sp_off = start_server(d), start_server(off)
    try:

        def sign(server: ServerProcess, *extra: str) -> tuple[int, dict[str, Any]]:
            token = tmp_path / "token"
            token.write_text(server.token())
            done = subprocess.run(
                [
                    *(str(BIN / "sealbox"), "sign", "-H", server.hostspec, "-c", str(server.deployment.ca)),
                    *("-t", str(token), "-f", "gpg", "--json", "--timeout", "30", *extra, *map(str, files)),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            return done.returncode, json.loads(done.stdout)

        code, out = sign(sp, "--log-key", str(d.public / "signlog.pub"))
        assert code == 0, out
        indexes = set()
        for f in out["files"]:
            (p,) = f["log_proofs"]
            assert p["keyChecked"] and p["format"] == "gpg" and p["file"] == Path(f["source"]).name
            indexes.add(p["index"])
            signed = _proven(sp, p["index"])
            asc = Path(f["outputs"][0]).read_bytes()
            assert signed["output"]["sha256"] == hashlib.sha256(asc).hexdigest()
        assert indexes == {0, 1, 2}

        code, out = sign(sp, "--log-key", str(other))  # another log's key: the checkpoints are not its
        assert code == 1
        assert all("the checkpoint is not signed by the given log key" in f["error"] for f in out["files"])

        code, out = sign(sp_off, "--log-proof")  # a server without a log cannot prove anything
        assert code == 1
        assert all("named no signing log entry" in f["error"] for f in out["files"])
        code, out = sign(sp_off)  # without --log-proof it signs as before
        assert code == 0 and all(f["log_proofs"] == [] for f in out["files"])

        # The library: the proofs on the outcome and on the client.
        more = tmp_path / "more.bin"
        more.write_bytes(os.urandom(3000))
        with SigningClient([sp.server], d.ca, sp.token(), log_proof=True, log_key=_log_key(d)) as c:
            outcome = c.sign(more, ["gpg"])
            assert outcome.ok, outcome.error
            (p,) = outcome.log_proofs
            assert c.log_proofs == [p] and p.key_checked and p.index == 3 and p.tree_size >= 4
    finally:
        sp.stop()
        sp_off.stop()
    assert not (off.root / "data" / "log").exists()


def test_full_file_system_releases_no_signature_and_fails_the_heartbeat(tmp_path: Path) -> None:
    """The log on a real 256 KiB tmpfs, filled to the last byte: once the log needs a new page,
    every job fails as retryable naming the reason, no result is served, the heartbeat is 503;
    with space back the server signs again, and the log holds exactly what was released."""
    with small_tmpfs(tmp_path / "logfs") as fs:
        d = Deployment.create(tmp_path / "dep", "dep", ["gpg"])
        cfg = tomllib.loads(d.config.read_text())
        cfg["log"]["dir"] = str(fs / "log")
        cfg["metrics"] = {"listen": "127.0.0.1:0"}
        d.config.write_text(tomli_w.dumps(cfg))
        sp = start_server(d)
        released: list[httpx.Response] = []
        try:
            token = sp.token()
            refused: dict[str, httpx.Response] = {}  # by the input's SHA-1

            def sign(i: int) -> int:
                data = f"file {i} ".encode() + os.urandom(1000)
                r = _upload(sp, data, f"f{i}.bin", token)
                if r.status_code == 200:
                    released.append(r)
                else:
                    refused[hashlib.sha1(data, usedforsecurity=False).hexdigest()] = r
                return r.status_code

            assert sign(0) == 200
            filler = fill(fs)
            beat = _get(sp, "/__heartbeat__")
            assert beat.status_code == 503 and beat.json()["failed"] == ["signing_log"]
            assert "No space left on device" in beat.json()["checks"]["signing_log"]["message"]
            # The segment's last page may still take a few entries (recorded, so released):
            # the first one that needs a new page fails, within a page's worth of entries.
            i = 1
            while sign(i) == 200:
                i += 1
                assert i < 20, "the log never ran out of space"
            before = len(released)
            for j in range(100, 106):
                sign(j)
            assert len(released) == before  # not one signature released while the log is full
            assert len(refused) == 7
            for sha1, r in refused.items():
                assert r.status_code == 404, r.text
                why = r.headers["X-Sealbox-Error"]
                assert "signing failed: cannot write the signing log: No space left on device" in why
                assert _get(sp, f"/sign/gpg/{sha1}").status_code == 404  # nor served later
            assert any(e.get("event") == "signlog_failed" for e in sp.log_lines())
            metrics = _metrics(sp)
            assert metrics["sealbox_signing_log_failures_total"] >= len(refused)
            assert metrics['sealbox_health_check_ok{check="signing_log"}'] == 0

            filler.unlink()
            _until(lambda: _get(sp, "/__heartbeat__").status_code == 200, "the heartbeat stays 503")
            assert sign(1000) == 200  # signs again
        finally:
            sp.stop()
        done = _verify_log(d, fs / "log")
        assert done.returncode == 0, done.stdout
        (report,) = json.loads(done.stdout)
        assert report["entries"] == len(released)
        shown = subprocess.run(
            [str(BIN / "sealbox"), "log", "show", str(fs / "log"), "--json"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
        logged = {json.loads(line)["output"]["sha256"] for line in shown}
        assert logged == {hashlib.sha256(r.content).hexdigest() for r in released}


def _metrics(sp: ServerProcess) -> dict[str, float]:
    port = next(int(str(e["port"])) for e in sp.log_lines() if e.get("event") == "metrics_listening")
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", trust_env=False, timeout=CAP).text
    return {
        name: float(value)
        for name, _, value in (
            ln.rpartition(" ") for ln in text.splitlines() if ln and not ln.startswith("#")
        )
    }


def test_a_server_killed_mid_signing_loses_no_record_of_a_released_signature(tmp_path: Path) -> None:
    d = Deployment.create(tmp_path / "dep", "dep", ["gpg"])
    sp = start_server(d)
    token = sp.token()
    answered: list[httpx.Response] = []

    def one(i: int) -> None:
        try:
            r = _upload(sp, f"payload {i} ".encode() + os.urandom(1500), f"p{i}.bin", token)
        except httpx.HTTPError:
            return  # the server was killed under this request
        if r.status_code == 200:
            answered.append(r)

    workers = psutil.Process(sp.proc.pid).children(recursive=True)
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(one, i) for i in range(300)]
        _until(lambda: len(answered) >= 40, "no signature released")
        sp.proc.send_signal(signal.SIGKILL)  # no drain, no last checkpoint
        sp.proc.wait(CAP)
        for f in futures:
            f.result()
    assert 40 <= len(answered) < 300
    psutil.wait_procs(workers, timeout=CAP)  # its signing processes follow it
    released = {int(r.headers[INDEX]): hashlib.sha256(r.content).hexdigest() for r in answered}

    sp = start_server(d)  # the same log, reopened
    try:
        for index, sha256 in released.items():
            assert _proven(sp, index)["output"]["sha256"] == sha256
        assert _upload(sp, b"after the restart " + os.urandom(100), "z.bin", sp.token()).status_code == 200
    finally:
        sp.stop()
    done = _verify_log(d)
    assert done.returncode == 0, done.stdout
    assert json.loads(done.stdout)[0]["entries"] >= len(released) + 1


def test_task_runner_records_each_signature_in_its_chain_of_trust(tmp_path: Path) -> None:
    d = Deployment.create(tmp_path / "dep", "dep", ["gpg"])
    sp = start_server(d)
    try:
        config = init_worker_dev(tmp_path / "worker", [d.root], False, False, {"dep": [sp.hostspec]})
        levels = tomllib.loads(config.read_text())["levels"]
        assert levels["dep"]["log_pubkey"] == str((d.public / "signlog.pub").resolve())
        work, out = tmp_path / "work", tmp_path / "out"
        files = {"public/build/a.bin": os.urandom(4000), "public/build/b.bin": os.urandom(5000)}
        write_upstream(work, "Build1", dict(files), tmp_path / "worker" / "keys" / "build.key")
        write_task(work, [entry("Build1", sorted(files), ["gpg"])])
        result = run(config, work, out, "Sign1")
        assert result.code == 0, result.text
        record = cot.parse_record((out / cot.RECORD).read_bytes())
        proofs = record["environment"]["signingLog"]
        assert sorted(p["file"] for p in proofs) == ["a.bin", "b.bin"]
        for p in proofs:
            assert p["keyChecked"] and p["format"] == "gpg" and p["server"] == sp.server.url
            logged = _proven(sp, p["index"])
            asc = (out / "public/build" / (p["file"] + ".asc")).read_bytes()
            assert logged["output"]["sha256"] == hashlib.sha256(asc).hexdigest()
    finally:
        sp.stop()
