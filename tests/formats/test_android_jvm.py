"""The long-lived apksig JVM behind ``jar``/``focus-jar``/``apk``/``focus-apk``: through real
servers (key files, and keys in a SoftHSM token) one JVM signs job after job, and never gets
key material; it is replaced when it dies, hangs past a job's timeout or reaches its job bound;
a JVM that cannot sign stops start-up. Outputs checked by the independent verifiers."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from sealbox.errors import ConfigError, SigningFailed
from sealbox.formats import FormatSettings, SignRequest
from sealbox.formats.android import DEFAULT_JAVA_OPTIONS, AndroidSigner
from sealbox.samples.android import write_apk, write_jar
from tests.keys.test_hsm_server import _pin
from tests.servers import Deployment, ServerProcess, start_server

pytestmark = pytest.mark.skipif(AndroidSigner.available() is not None, reason=str(AndroidSigner.available()))

FORMATS = ["jar", "focus-jar", "apk", "focus-apk"]
CAP = 120.0  # bound of every wait
#: what a child of the server gets in its environment, and nothing else
CHILD_ENV = {b"PATH", b"LANG", b"HOME"}


def _until(done: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + CAP
    while not done():
        assert time.monotonic() < deadline, f"not {what} after {CAP:g} s"
        time.sleep(0.02)


def _jvms(sp: ServerProcess) -> list[psutil.Process]:
    """The server's apksig JVMs (not yet reaped ones included)."""
    found = []
    for child in psutil.Process(sp.proc.pid).children(recursive=True):
        try:
            if any("SealboxApkSigner" in a for a in child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:  # a zombie, or gone: not a running JVM
            continue
    return found


def _jvm_pid(sp: ServerProcess) -> int:
    jvms = _jvms(sp)
    assert len(jvms) == 1, jvms
    return jvms[0].pid


class _DataDirWatch:
    """Names every file that appears under a folder while it runs (polled)."""

    def __init__(self, root: Path) -> None:
        self.root, self.seen = root, set[str]()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for dirpath, _, files in os.walk(self.root):
                self.seen.update(os.path.join(dirpath, f) for f in files)
            time.sleep(0.005)

    def __enter__(self) -> _DataDirWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServerProcess]]:
    root = tmp_path_factory.mktemp("android-jvm")
    started: dict[str, ServerProcess] = {}
    try:
        for kind, hsm in (("file", False), ("hsm", True)):
            started[kind] = start_server(Deployment.create(root / kind, "dep", FORMATS, hsm=hsm))
        yield started
    finally:
        for sp in started.values():
            sp.stop()


def _inputs(folder: Path) -> list[tuple[str, Path]]:
    """(format, input): each name on what it signs: APKs v1+v2+v3, APKs v1 only, JARs."""
    folder.mkdir()
    return [
        ("apk", write_apk(folder, "a.apk", package="org.sealbox.jvm.a")),
        ("focus-apk", write_apk(folder, "b.apk", package="org.sealbox.jvm.b")),
        ("jar", write_apk(folder, "c.apk", package="org.sealbox.jvm.c", target_sdk=29)),
        ("jar", write_jar(folder, "d.jar")),
        ("focus-jar", write_jar(folder, "e.jar", extra_size=100)),
    ]


@pytest.mark.parametrize("kind", ["file", "hsm"])
def test_one_jvm_signs_every_name_without_key_material(
    servers: dict[str, ServerProcess], tmp_path: Path, kind: str
) -> None:
    sp = servers[kind]
    d = sp.deployment
    secrets = [v.encode() for v in d.passphrases().values()]
    if kind == "hsm":
        assert _pin(d).encode() in secrets
    data = d.root / "data"
    pids = set()
    with sp.client(timeout=CAP) as c, _DataDirWatch(data) as watch:
        for i, (fmt, src) in enumerate(_inputs(tmp_path / "in")):
            out = tmp_path / "out" / f"{i}-{src.name}"
            res = c.sign(src, [fmt], out)
            assert res.ok, res.error
            assert AndroidSigner.verify(fmt, out, None, d.public)
            pids.add(_jvm_pid(sp))
    assert len(pids) == 1, "one long-lived JVM signs job after job"
    jvm = psutil.Process(pids.pop())
    cmdline = Path(f"/proc/{jvm.pid}/cmdline").read_bytes()
    environ = Path(f"/proc/{jvm.pid}/environ").read_bytes()
    for secret in secrets:
        assert secret not in cmdline and secret not in environ
    assert {kv.split(b"=", 1)[0] for kv in environ.split(b"\0") if kv} <= CHILD_ENV
    # the token is reached by the server only: the JVM never loads a PKCS#11 module, nor
    # opens a keystore (none is ever written)
    maps = Path(f"/proc/{jvm.pid}/maps").read_text()
    assert "softhsm" not in maps and "pkcs11" not in maps.lower()
    assert b"PKCS11" not in cmdline.upper() and b"keystore" not in cmdline.lower()
    keystores = [p for p in watch.seen if p.lower().endswith((".p12", ".pfx", ".jks", ".keystore", ".cfg"))]
    assert watch.seen and not keystores, keystores
    for path in data.rglob("*"):
        if path.is_file():
            blob = path.read_bytes()
            assert b"PRIVATE KEY" not in blob and not any(s in blob for s in secrets), path


def test_killed_jvm_is_replaced_by_the_next_job(servers: dict[str, ServerProcess], tmp_path: Path) -> None:
    sp = servers["file"]
    with sp.client(timeout=CAP) as c:
        assert c.sign(write_jar(tmp_path, "one.jar"), ["jar"], tmp_path / "out" / "one.jar").ok
        before = _jvm_pid(sp)
        os.kill(before, signal.SIGKILL)
        _until(lambda: not _jvms(sp), "reaped by the server")
        jar = write_jar(tmp_path, "two.jar", extra_size=7)
        res = c.sign(jar, ["jar"], tmp_path / "out" / "two.jar")
        assert res.ok, res.error
        AndroidSigner.verify("jar", tmp_path / "out" / "two.jar", None, sp.deployment.public)
        assert _jvm_pid(sp) != before
    jobs = [e for e in sp.log_lines() if e.get("event") == "job" and e.get("format") == "jar"]
    assert jobs and all(e["outcome"] == "signed" for e in jobs), jobs


# -- the signer on its own: its JVM's lifecycle ---------------------------------------------------------


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    return Deployment.create(tmp_path_factory.mktemp("android-jvm-signer") / "dep", "dep", ["jar"])


def _signer(dep: Deployment, tag: str, **options: object) -> AndroidSigner:
    """A signer with a JVM of its own (JVMs are shared by equal settings: ``tag`` makes them differ)."""
    from sealbox.keys import PassphraseSource, load_key
    from sealbox.server.config import load_config

    cfg = load_config(dep.config)
    key = load_key(cfg.key_spec("jar"), PassphraseSource.from_file(dep.root / "passphrases").get("jar"))
    java_options = [*DEFAULT_JAVA_OPTIONS, f"-Dsealbox.test={tag}"]
    settings = FormatSettings("jar", "jar", {"java_options": java_options, **options}, dep.root)
    return AndroidSigner(settings, lambda name: key)


def _sign(signer: AndroidSigner, tmp: Path, name: str) -> Path:
    src = write_jar(tmp, name, extra_size=len(name))
    work = tmp / f"work-{name}"
    work.mkdir()
    out = tmp / f"signed-{name}"
    signer.sign(SignRequest(src, out, src.name, work))
    return out


def _pid(signer: AndroidSigner) -> int:
    pid = signer._jvm.pid
    assert pid is not None
    return pid


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_jvm_dying_during_a_job_fails_it_as_retryable(dep: Deployment, tmp_path: Path) -> None:
    signer = _signer(dep, "dies")
    real = signer._sign_digest

    def kill_first(hash_name: str, digest: bytes) -> bytes:  # the JVM waits for this signature
        os.kill(_pid(signer), signal.SIGKILL)
        return real(hash_name, digest)  # type: ignore[arg-type]

    signer._sign_digest = kill_first  # type: ignore[method-assign]
    with pytest.raises(SigningFailed, match="apksig JVM stopped"):
        _sign(signer, tmp_path, "dies.jar")
    assert not (tmp_path / "signed-dies.jar").exists()
    signer._sign_digest = real  # type: ignore[method-assign]
    AndroidSigner.verify("jar", _sign(signer, tmp_path, "next.jar"), None, dep.public)
    signer._jvm.stop()


def test_job_timeout_kills_a_hung_jvm(dep: Deployment, tmp_path: Path) -> None:
    signer = _signer(dep, "hangs", timeout=2)
    _sign(signer, tmp_path, "first.jar")
    hung = _pid(signer)
    os.kill(hung, signal.SIGSTOP)  # stands still until killed
    with pytest.raises(SigningFailed, match="timed out"):
        _sign(signer, tmp_path, "stuck.jar")
    _until(lambda: _gone(hung), "killed")
    AndroidSigner.verify("jar", _sign(signer, tmp_path, "after.jar"), None, dep.public)
    assert _pid(signer) != hung
    signer._jvm.stop()


def test_jvm_retires_after_its_job_bound(dep: Deployment, tmp_path: Path) -> None:
    signer = _signer(dep, "retires", jvm_jobs=2)
    _sign(signer, tmp_path, "a.jar")
    first = _pid(signer)
    _sign(signer, tmp_path, "b.jar")
    assert _pid(signer) == first
    AndroidSigner.verify("jar", _sign(signer, tmp_path, "c.jar"), None, dep.public)
    assert _pid(signer) != first
    _until(lambda: _gone(first), "retired")
    signer._jvm.stop()


def test_jvm_that_cannot_sign_stops_start_up(dep: Deployment) -> None:
    with pytest.raises(ConfigError, match=r"format 'jar': apksig cannot sign with key 'jar'.*NoSuchOption"):
        _signer(dep, "broken", java_options=[*DEFAULT_JAVA_OPTIONS, "-XX:+NoSuchOption"])
    with pytest.raises(ConfigError, match="jvm_jobs"):
        _signer(dep, "bad-bound", jvm_jobs=0)
