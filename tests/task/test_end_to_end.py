"""Whole signing tasks against real dep and release servers, every output checked by the
independent verifiers, and outputs of one task fed to the next through the chain of trust."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sealbox.deploy.taskdev import BUILD_TASK_ID, verify_release_outputs, write_sample_task
from sealbox.formats import signer_class
from sealbox.samples.macos import write_app_tarball
from sealbox.samples.pe import write_pe
from sealbox.task import artifacts, cot
from tests.servers import BIN, ServerProcess, env_without_proxy, gpg_verify

from .helpers import Result, Worker, entry, run, write_task, write_upstream

SIGNING_ID = "ReleaseSigningTask0001"


@pytest.fixture(scope="module")
def release_task(tmp_path_factory: pytest.TempPathFactory, worker: Worker) -> tuple[Path, Path, Result]:
    root = tmp_path_factory.mktemp("release-task")
    work, out = root / "work", root / "out"
    write_sample_task(work, worker.dir, "release")
    return work, out, run(worker.config, work, out, SIGNING_ID)


def test_release_task_signs_a_small_release(
    release_task: tuple[Path, Path, Result], servers: dict[str, ServerProcess], worker: Worker
) -> None:
    _, out, res = release_task
    assert res.code == 0, res.text
    rows = dict(verify_release_outputs(out, servers["release"].deployment.public, worker.public_key()))
    # every signed thing of the sample was checked by its verifier
    for label in (
        "public/build/setup.exe",
        "public/build/target.zip!firefox/firefox.exe",
        "public/build/target.zip!firefox/xul.dll",
        "public/build/target.zip!firefox/plugin-container.exe.sig",
        "public/build/target.tar.gz!firefox/libxul.so.sig",
        "public/build/target.tar.gz!firefox/plugin-container.sig",
        "public/build/app.apk",
        "public/build/update.mar",
        "public/build/SHA256SUMS.asc",
        "public/build/SHA512SUMS.asc",
        cot.RECORD,
    ):
        assert label in rows
    # the raw verifier command lines as well
    build = out / "public" / "build"
    ca = servers["release"].deployment.public / "sha2signcode-ca.pem"
    raw = subprocess.run(
        ["osslsigncode", "verify", "-CAfile", str(ca), "-in", str(build / "setup.exe")],
        capture_output=True,
        check=False,
    )
    assert raw.returncode == 0, raw.stdout + raw.stderr
    assert subprocess.run(["zipalign", "-c", "-p", "4", str(build / "app.apk")], check=False).returncode == 0
    sums = gpg_verify(build / "SHA256SUMS.asc", build / "SHA256SUMS", build / "KEY")
    assert sums.returncode == 0 and b"GOODSIG" in sums.stdout
    assert (build / "KEY").read_bytes() == (servers["release"].deployment.public / "gpg.asc").read_bytes()


def test_release_task_archive_rules(release_task: tuple[Path, Path, Result]) -> None:
    work, out, res = release_task
    assert res.code == 0, res.text
    build = out / "public" / "build"
    # the zip keeps every member, same names, same order; .sig files follow their file
    original = zipfile.ZipFile(work / "cot" / BUILD_TASK_ID / "public/build/target.zip").namelist()
    rebuilt = zipfile.ZipFile(build / "target.zip").namelist()
    assert [n for n in rebuilt if not n.endswith(".sig")] == original
    assert rebuilt[rebuilt.index("firefox/xul.dll") + 1] == "firefox/xul.dll.sig"
    assert "firefox/msvcp140.dll.sig" not in rebuilt
    # the tarball: same compression, root-owned, regenerated precomplete by the rules
    with (build / "target.tar.gz").open("rb") as f:
        assert f.read(2) == b"\x1f\x8b"
    with tarfile.open(build / "target.tar.gz") as tf:
        assert all(m.uid == 0 and m.gid == 0 for m in tf.getmembers())
        pre = tf.extractfile("firefox/precomplete")
        assert pre is not None
        lines = pre.read().decode().splitlines()
    assert 'remove "libxul.so.sig"' in lines and 'remove "precomplete"' in lines
    assert not any("channel-prefs.js" in ln or "distribution/" in ln for ln in lines)
    assert lines.index('remove "plugin-container.sig"') < lines.index('remove "firefox"')  # reverse-sorted
    assert lines[-1].startswith("rmdir ")
    diff = (out / "public/logs/precomplete.diff").read_text()
    assert "target.tar.gz:firefox/precomplete" in diff and '+remove "libxul.so.sig"' in diff
    # the record covers every published file
    record = json.loads((out / cot.RECORD).read_text())
    assert record["taskId"] == SIGNING_ID and record["workerType"] == "signing"
    assert set(record["artifacts"]) == set(cot.list_artifacts(out))
    assert "public/logs/precomplete.diff" in record["artifacts"]


def test_outputs_feed_a_downstream_task(
    release_task: tuple[Path, Path, Result], worker: Worker, tmp_path: Path, servers: dict[str, ServerProcess]
) -> None:
    """The signing task's outputs, with its signed record, are the upstream of a gpg task."""
    _, out, res = release_task
    assert res.code == 0, res.text
    work = tmp_path / "work"
    (work / "cot").mkdir(parents=True)
    # published in the artifact store, fetched from there (not pre-seeded in cot/)
    store = worker.dir / "store" / SIGNING_ID
    shutil.copytree(out, store)
    write_task(
        work,
        [entry(SIGNING_ID, ["public/build/setup.exe", "public/build/update.mar"], ["gpg"], "signing")],
        level="release",
    )
    res2 = run(worker.config, work, tmp_path / "out", "DownstreamGpgTask0001")
    assert res2.code == 0, res2.text
    assert any(ln.startswith("fetched") for ln in res2.lines)
    signed = tmp_path / "out/public/build"
    for name in ("setup.exe", "update.mar"):
        assert (signed / name).read_bytes() == (out / "public/build" / name).read_bytes()
        check = gpg_verify(signed / f"{name}.asc", signed / name, signed / "KEY")
        assert check.returncode == 0 and b"GOODSIG" in check.stdout
    signer_class("gpg").verify(
        "gpg", signed / "setup.exe.asc", signed / "setup.exe", servers["release"].deployment.public
    )


def test_cli_dep_task(tmp_path: Path, worker: Worker, servers: dict[str, ServerProcess]) -> None:
    """`sealbox task run` as a user runs it; then `sealbox cot verify` on the result."""
    work = tmp_path / "work"
    src = write_pe(tmp_path, "setup.exe")
    write_upstream(work, "DepBuild1", {"public/build/setup.exe": src}, worker.dir / "keys/build.key")
    write_task(work, [entry("DepBuild1", ["public/build/setup.exe"], ["sha2signcode", "gpg"])])
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            *(str(BIN / "sealbox"), "task", "run", "--config", str(worker.config)),
            *("--work-dir", str(work), "--artifact-dir", str(out), "--task-id", "DepSign1"),
        ],
        capture_output=True,
        text=True,
        env=env_without_proxy(),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    pub = servers["dep"].deployment.public
    signer_class("sha2signcode").verify("sha2signcode", out / "public/build/setup.exe", None, pub)
    signer_class("gpg").verify("gpg", out / "public/build/setup.exe.asc", out / "public/build/setup.exe", pub)
    verify = subprocess.run(
        [
            str(BIN / "sealbox"),
            "cot",
            "verify",
            str(out),
            "--config",
            str(worker.config),
            "--task-id",
            "DepSign1",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verify.returncode == 0, verify.stderr
    (out / "public/build/setup.exe").write_bytes(b"tampered")
    verify = subprocess.run(
        [str(BIN / "sealbox"), "cot", "verify", str(out), "--config", str(worker.config)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verify.returncode == 3 and "sha256" in verify.stderr


def test_dep_worker_record_cannot_feed_a_production_worker(
    tmp_path: Path, worker: Worker, dep_worker: Worker, servers: dict[str, ServerProcess]
) -> None:
    work = tmp_path / "work"
    src = write_pe(tmp_path, "setup.exe")
    # a dep worker does not check signatures: an unsigned upstream record is accepted
    write_upstream(work, "DepBuild2", {"public/build/setup.exe": src}, None)
    write_task(work, [entry("DepBuild2", ["public/build/setup.exe"], ["sha2signcode"])])
    res = run(dep_worker.config, work, tmp_path / "out", "DepWorkerTask1")
    assert res.code == 0, res.text
    assert (tmp_path / "out" / cot.RECORD).is_file()
    assert not (tmp_path / "out" / cot.SIGNATURE).exists()
    # ... but it still checks hashes
    work_bad = tmp_path / "bad"
    write_upstream(work_bad, "DepBuild3", {"public/build/setup.exe": src}, None)
    (work_bad / "cot/DepBuild3/public/build/setup.exe").write_bytes(b"MZ swapped")
    write_task(work_bad, [entry("DepBuild3", ["public/build/setup.exe"], ["sha2signcode"])])
    bad = run(dep_worker.config, work_bad, tmp_path / "out-bad")
    assert bad.code == 3 and "sha256" in bad.first
    # a production worker downstream of the dep worker must fail
    down = tmp_path / "down"
    folder = down / "cot" / "DepWorkerTask1"
    shutil.copytree(tmp_path / "out", folder)
    write_task(down, [entry("DepWorkerTask1", ["public/build/setup.exe"], ["gpg"], "signing")])
    res = run(worker.config, down, tmp_path / "out2")
    assert res.code == 3, res.text
    assert "not signed" in res.first
    assert not (tmp_path / "out2").exists()


def _fake_dmg_tools(folder: Path) -> tuple[Path, Path]:
    """Stand-ins for the dmg/hfsplus tools: our '.dmg' is a tar.gz and the 'hfs' a copy of it."""
    folder.mkdir(parents=True, exist_ok=True)
    dmg, hfsplus = folder / "dmg", folder / "hfsplus"
    dmg.write_text('#!/bin/sh\n[ "$1" = extract ] || exit 2\ncp "$2" "$3"\n')
    hfsplus.write_text('#!/bin/sh\n[ "$2" = extractall ] || exit 2\ntar xzf "$1" -C "$4"\n')
    for p in (dmg, hfsplus):
        p.chmod(p.stat().st_mode | stat.S_IXUSR)
    return dmg, hfsplus


def test_macapp_dmg_is_converted_then_signed(
    tmp_path: Path, worker: Worker, servers: dict[str, ServerProcess]
) -> None:
    dmg_tool, hfsplus_tool = _fake_dmg_tools(tmp_path / "tools")

    def tools(data: dict[str, object]) -> None:
        data["tools"] = {"dmg": str(dmg_tool), "hfsplus": str(hfsplus_tool)}

    config = worker.variant("with-dmg-tools", tools)
    work = tmp_path / "work"
    app = write_app_tarball(tmp_path / "src", "Hello.tar.gz")
    write_upstream(work, "MacBuild1", {"public/build/Hello.dmg": app}, worker.dir / "keys/build.key")
    write_task(work, [entry("MacBuild1", ["public/build/Hello.dmg"], ["macapp"])], level="release")
    res = run(config, work, tmp_path / "out")
    assert res.code == 0, res.text
    out = tmp_path / "out/public/build"
    assert not (out / "Hello.dmg").exists()
    how = signer_class("dmg").verify("dmg", out / "Hello.tar.gz", None, servers["release"].deployment.public)
    assert how


def test_dmg_without_tools_is_a_clear_error_before_any_token(
    tmp_path: Path, worker: Worker, free_hostspec: str
) -> None:
    def dead(data: dict[str, object]) -> None:
        levels = data["levels"]
        assert isinstance(levels, dict)
        levels["release"]["hosts"] = [free_hostspec]
        data["tools"] = {"dmg": "/nonexistent/dmg", "hfsplus": "/nonexistent/hfsplus"}

    config = worker.variant("no-dmg-tools", dead)
    work = tmp_path / "work"
    write_upstream(work, "MacBuild2", {"public/build/Hello.dmg": b"x" * 100}, worker.dir / "keys/build.key")
    write_task(work, [entry("MacBuild2", ["public/build/Hello.dmg"], ["macapp"])], level="release")
    res = run(config, work, tmp_path / "out")
    assert res.code == 5, res.text
    assert "dmg and hfsplus tools" in res.first


def test_worker_key_must_be_private(tmp_path: Path, worker: Worker) -> None:
    key = worker.dir / "keys/worker.key"
    os.chmod(key, 0o644)
    try:
        work = tmp_path / "work"
        write_task(work, [entry("X1", ["public/a.txt"], ["gpg"])])
        res = run(worker.config, work, tmp_path / "out")
    finally:
        os.chmod(key, 0o600)
    assert res.code == 5 and "readable by others" in res.first
    assert key.read_text().strip() not in res.text


@dataclass
class StoreStats:
    """What the test artifact store saw."""

    connections: int = 0
    requests: int = 0
    in_flight: int = 0
    most_in_flight: int = 0


@pytest.fixture
def https_store(
    tmp_path: Path, servers: dict[str, ServerProcess]
) -> Iterator[tuple[str, Path, Path, StoreStats]]:
    """An HTTPS artifact store on loopback (the dev deployment's TLS certificate) that keeps
    connections alive, as real stores do, and counts connections and concurrent requests. A
    request waits (10 s at most) until a second one is in flight or one has already been."""
    import functools
    import ssl
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    root = tmp_path / "https-store"
    root.mkdir()
    tls = servers["dep"].deployment.root / "tls"
    stats, lock, together = StoreStats(), threading.Lock(), threading.Event()

    class Handler(SimpleHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            with lock:
                stats.connections += 1

        def do_GET(self) -> None:
            with lock:
                stats.requests += 1
                stats.in_flight += 1
                stats.most_in_flight = max(stats.most_in_flight, stats.in_flight)
                if stats.in_flight > 1:
                    together.set()
            try:
                together.wait(timeout=10)
                super().do_GET()
            finally:
                with lock:
                    stats.in_flight -= 1

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tls / "server.pem", tls / "server.key")
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    url = f"https://127.0.0.1:{httpd.server_address[1]}/{{taskId}}/{{path}}"
    yield url, root, tls / "ca.pem", stats
    httpd.shutdown()
    httpd.server_close()


def _store_config(worker: Worker, url: str, ca: Path) -> Path:
    def store(data: dict[str, Any]) -> None:
        data["worker"]["artifact_store"] = url
        data["worker"]["artifact_store_ca"] = str(ca)

    return worker.variant("https-store", store)


def test_artifact_downloads_share_one_session(
    tmp_path: Path, worker: Worker, https_store: tuple[str, Path, Path, StoreStats]
) -> None:
    """A task's downloads run a few at a time over kept-alive connections: 8 files, from two
    upstream tasks, over at most artifacts.PARALLEL connections (one per file before)."""
    url, root, ca, stats = https_store
    staging = tmp_path / "staging"
    entries = []
    for task_id in ("ManyBuild1", "ManyBuild2"):
        files = {f"public/{task_id}/f{i}.txt": f"{task_id} artifact {i}\n".encode() for i in range(2)}
        write_upstream(staging, task_id, files, worker.dir / "keys/build.key")
        shutil.copytree(staging / "cot" / task_id, root / task_id)
        entries.append(entry(task_id, list(files), ["gpg"]))
    work = tmp_path / "work"
    write_task(work, entries)
    res = run(_store_config(worker, url, ca), work, tmp_path / "out")
    assert res.code == 0, res.text
    assert sum(ln.startswith("fetched ") for ln in res.lines) == stats.requests == 8  # 2 x (record, .sig, 2)
    assert stats.most_in_flight >= 2, stats
    assert stats.connections <= artifacts.PARALLEL, stats


def test_https_artifact_store(
    tmp_path: Path,
    worker: Worker,
    https_store: tuple[str, Path, Path, StoreStats],
    servers: dict[str, ServerProcess],
) -> None:
    url, root, ca, _ = https_store
    config = _store_config(worker, url, ca)
    staging = tmp_path / "staging"
    src = write_pe(tmp_path, "setup.exe")
    write_upstream(staging, "HttpsBuild1", {"public/build/setup.exe": src}, worker.dir / "keys/build.key")
    shutil.copytree(staging / "cot" / "HttpsBuild1", root / "HttpsBuild1")
    work = tmp_path / "work"
    write_task(work, [entry("HttpsBuild1", ["public/build/setup.exe"], ["sha2signcode"])])
    res = run(config, work, tmp_path / "out")
    assert res.code == 0, res.text
    assert sum(ln.startswith("fetched HttpsBuild1/") for ln in res.lines) == 3  # record, .sig, exe
    signer_class("sha2signcode").verify(
        "sha2signcode", tmp_path / "out/public/build/setup.exe", None, servers["dep"].deployment.public
    )
    # tampered in the store: caught by the record's sha256
    (root / "HttpsBuild1/public/build/setup.exe").write_bytes(b"MZ tampered in the store")
    work2 = tmp_path / "work2"
    write_task(work2, [entry("HttpsBuild1", ["public/build/setup.exe"], ["sha2signcode"])])
    bad = run(config, work2, tmp_path / "out2")
    assert bad.code == 3 and "sha256" in bad.first
    # missing in the store: unavailable
    work3 = tmp_path / "work3"
    write_task(work3, [entry("NotThere1", ["public/build/setup.exe"], ["sha2signcode"])])
    gone = run(config, work3, tmp_path / "out3")
    assert gone.code == 4 and "404" in gone.first
    # a CA bundle that is not one: the worker's configuration, failed at once (not retried)
    (tmp_path / "not-a-bundle.pem").write_text("not a certificate\n")

    def broken(data: dict[str, Any]) -> None:
        data["worker"]["artifact_store"] = url
        data["worker"]["artifact_store_ca"] = str(tmp_path / "not-a-bundle.pem")

    work4 = tmp_path / "work4"
    write_task(work4, [entry("HttpsBuild1", ["public/build/setup.exe"], ["sha2signcode"])])
    misconfigured = run(worker.variant("bad-store-ca", broken), work4, tmp_path / "out4")
    assert misconfigured.code == 5 and "worker.artifact_store_ca" in misconfigured.first, misconfigured.text
