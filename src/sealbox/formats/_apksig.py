"""A long-lived JVM driving apksig (Debian's ``libapksig-java``) for the Android signer.

One JVM (``_jvm/SealboxApkSigner.java``, compiled once per server process with ``javac``)
serves every Android job of a server whose formats share its settings, several at once (a
thread per job on its side, request ids on the pipe). The JVM never gets a key, a keystore
or a PIN: a JCA provider inside it hashes what apksig signs and sends the digest back over
the pipe, where the job's thread signs it through the key interface
(:class:`~sealbox.keys.SigningKey`), so key files and PKCS#11 keys work alike.

Bounded and restarted when it misbehaves: a JVM takes at most ``max_jobs`` jobs and new jobs
go to a fresh one after ``max_age`` seconds (the old one finishes its jobs, then its stdin
closes and it exits); a job still running after its timeout kills the JVM (the jobs it was
running fail as retryable, :class:`~sealbox.errors.SigningFailed`), and so does a JVM that
dies; the next job starts a fresh one. The JVM runs with the minimal environment
(:func:`~sealbox.procs.child_env`), a private temporary folder as home and ``java.io.tmpdir``,
and a process group of its own.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import queue
import shutil
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, get_args

from ..errors import FormatRejected, SealboxError, SigningFailed
from ..keys import HashName
from ..procs import child_env, kill_group, run_process

__all__ = ["APKSIG_JAR", "ApksigJvm", "JvmSettings", "SignDigest", "Verdict", "jvm_for"]

APKSIG_JAR = Path("/usr/share/java/apksig.jar")
SOURCE = Path(__file__).with_name("_jvm") / "SealboxApkSigner.java"
MAIN = "SealboxApkSigner"
_CHILD_PATH = "/usr/local/bin:/usr/bin:/bin"
#: bytes of the JVM's stderr kept for the reason of a failure
_STDERR_KEPT = 8192
_HASHES: frozenset[str] = frozenset(get_args(HashName))
#: javac's bound (once per process; not a job's timeout, which may be short)
COMPILE_TIMEOUT = 120.0
#: the flags of a sign request
V1, V2, V3 = 1, 2, 4

#: signs a digest made with the named hash (PKCS#1 v1.5) through the job's key
SignDigest = Callable[[HashName, bytes], bytes]


@dataclass(frozen=True)
class JvmSettings:
    """What a JVM is started with and how long it lives; formats with equal settings share one."""

    java_options: tuple[str, ...]
    max_jobs: int
    max_age: float


@dataclass(frozen=True)
class Verdict:
    """apksig's verdict on an APK: verified or not, and its errors, one ``ERROR: ...`` a line."""

    verified: bool
    text: str


# -- the compiled signer: once per process ---------------------------------------------------------

_compile_lock = threading.Lock()
_classes: Path | None = None


def _compiled(timeout: float) -> Path:
    """The folder holding the compiled signer, made on first use in a private temporary folder
    (removed at exit, with the JVMs' homes beside it): ``javac`` once rather than the source
    launcher's compile at every start."""
    global _classes
    with _compile_lock:
        if _classes is None or not (_classes / f"{MAIN}.class").is_file():
            base = Path(tempfile.mkdtemp(prefix="sealbox-apksig-"))
            atexit.register(shutil.rmtree, base, True)
            out = base / "classes"
            out.mkdir()
            argv = ["javac", "-nowarn", "-encoding", "UTF-8", "-cp", str(APKSIG_JAR), "-d", str(out)]
            res = run_process([*argv, str(SOURCE)], what="javac", timeout=timeout, failure=SigningFailed,
                              env=child_env(out, _CHILD_PATH), cwd=out)  # fmt: skip
            if res.returncode != 0:
                raise SigningFailed(f"javac cannot compile {SOURCE.name}: {res.reason}")
            _classes = out
        return _classes


# -- one JVM process --------------------------------------------------------------------------------

_Message = tuple[int, bytes] | None  # (frame type, fields); None: the JVM is gone


def _blob(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


class _Fields:
    """Reads the fields of one frame."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def byte(self) -> int:
        self.pos += 1
        return self.data[self.pos - 1]

    def blob(self) -> bytes:
        (n,) = struct.unpack_from(">I", self.data, self.pos)
        self.pos += 4 + n
        if self.pos > len(self.data):
            raise ValueError("truncated frame")
        return self.data[self.pos - n : self.pos]


class _Process:
    """One running JVM: its pipes, a reader thread routing its answers to the jobs by request
    id, and what decides its retirement."""

    def __init__(self, settings: JvmSettings, classes: Path) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="jvm-", dir=classes.parent))
        argv = [
            "java", *settings.java_options, f"-Djava.io.tmpdir={self.home}",
            "-cp", f"{APKSIG_JAR}:{classes}", MAIN,
        ]  # fmt: skip
        try:
            # not run_process: this child lives on between jobs, with both pipes open
            self.popen = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=child_env(self.home, _CHILD_PATH),
                cwd=self.home,
                start_new_session=True,  # its own process group, killed as a whole
            )
        except OSError as e:
            shutil.rmtree(self.home, ignore_errors=True)
            raise SigningFailed(f"cannot start the apksig JVM: {e.strerror or e}") from None
        self.pid = self.popen.pid
        self.settings = settings
        self.started = time.monotonic()
        self.jobs = 0  # requests given to it
        self.inflight = 0
        self.retiring = False
        self.dead: str | None = None  # why it is gone, once it is
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._boxes: dict[int, queue.SimpleQueue[_Message]] = {}
        self._stderr = bytearray()
        self._stderr_thread = threading.Thread(target=self._drain_stderr, name="apksig-stderr", daemon=True)
        self._reader = threading.Thread(target=self._read, name="apksig-reader", daemon=True)
        self._stderr_thread.start()
        self._reader.start()

    def usable(self) -> bool:
        """Whether a new job may go to this JVM: alive, not retiring, within its bounds."""
        return (
            self.dead is None
            and not self.retiring
            and self.popen.poll() is None
            and self.jobs < self.settings.max_jobs
            and time.monotonic() - self.started < self.settings.max_age
        )

    def open(self) -> tuple[int, queue.SimpleQueue[_Message]]:
        """A request id and the mailbox its answers arrive in."""
        with self._lock:
            if self.dead is not None:
                raise SigningFailed(f"the apksig JVM stopped: {self.dead}")
            rid = next(self._ids)
            box: queue.SimpleQueue[_Message] = queue.SimpleQueue()
            self._boxes[rid] = box
            self.jobs += 1
            self.inflight += 1
            return rid, box

    def close_request(self, rid: int) -> None:
        with self._lock:
            self._boxes.pop(rid, None)
            self.inflight -= 1
            last = self.retiring and self.inflight == 0
        if last:
            self._close_stdin()

    def send(self, kind: bytes, rid: int, fields: bytes) -> None:
        body = kind + struct.pack(">I", rid) + fields
        stdin = self.popen.stdin
        assert stdin is not None
        try:
            with self._write_lock:
                stdin.write(struct.pack(">I", len(body)) + body)
                stdin.flush()
        except (OSError, ValueError):  # a broken pipe, or stdin closed by a kill
            self._reader.join(5)  # it reaps the JVM and finds out why it ended
            raise SigningFailed(f"the apksig JVM stopped: {self.dead or 'its pipe is closed'}") from None

    def retire(self) -> None:
        """No new jobs; stdin closes (the JVM exits) once the last one is done."""
        with self._lock:
            self.retiring = True
            idle = self.inflight == 0
        if idle:
            self._close_stdin()

    def kill(self, reason: str) -> None:
        with self._lock:
            if self.dead is None:
                self.dead = reason
        kill_group(self.pid)  # reaped by the reader thread's wait only, so not yet

    def stop(self, timeout: float) -> None:
        """Close stdin and wait for the JVM to exit (killed if it does not within ``timeout``)."""
        self.retire()
        self._reader.join(timeout)
        if self._reader.is_alive():
            self.kill("stopped")
            self._reader.join()

    def _close_stdin(self) -> None:
        with self._write_lock, contextlib.suppress(OSError):
            assert self.popen.stdin is not None
            self.popen.stdin.close()

    def _read(self) -> None:
        out = self.popen.stdout
        assert out is not None
        try:
            while True:
                head = _read_exactly(out, 4)
                if head is None:
                    break
                body = _read_exactly(out, struct.unpack(">I", head)[0])
                if body is None or len(body) < 5:
                    break
                (rid,) = struct.unpack_from(">I", body, 1)
                with self._lock:
                    box = self._boxes.get(rid)
                if box is not None:
                    box.put((body[0], body[5:]))
        except OSError:
            pass
        code = self.popen.wait()
        self._stderr_thread.join(5)
        with self._lock:
            if self.dead is None:
                lines = bytes(self._stderr).decode(errors="replace").splitlines()
                why = " / ".join(ln.strip() for ln in lines if ln.strip())[:300]
                self.dead = f"exit {code}" + (f": {why}" if why else "")
            boxes = list(self._boxes.values())
        for box in boxes:
            box.put(None)
        out.close()
        shutil.rmtree(self.home, ignore_errors=True)

    def _drain_stderr(self) -> None:
        err = self.popen.stderr
        assert err is not None
        with contextlib.suppress(OSError, ValueError):
            while chunk := os.read(err.fileno(), 65536):
                self._stderr += chunk
                del self._stderr[:-_STDERR_KEPT]
        err.close()


def _read_exactly(stream: IO[bytes], n: int) -> bytes | None:
    data = stream.read(n)
    return data if len(data) == n else None


# -- the service the signers use -----------------------------------------------------------------------


class ApksigJvm:
    """The JVM of one :class:`JvmSettings`, started on first use and replaced as needed."""

    def __init__(self, settings: JvmSettings) -> None:
        self.settings = settings
        self.proven = False  # set by the first signer that proved it at start-up
        self._lock = threading.Lock()
        self._current: _Process | None = None

    @property
    def pid(self) -> int | None:
        """The running JVM's process id (None before the first job and after a stop)."""
        current = self._current
        return current.pid if current is not None and current.dead is None else None

    def sign(
        self,
        src: Path,
        dest: Path,
        flags: int,
        min_sdk: int | None,
        chain: list[bytes],
        sign_digest: SignDigest,
        timeout: float,
    ) -> None:
        """apksig signs ``src`` into ``dest`` (v1/v2/v3 as ``flags`` say; ``min_sdk`` None: the
        APK's own) with the certificates ``chain`` (DER), through ``sign_digest``. Raises
        FormatRejected when apksig finds the input malformed, SigningFailed otherwise."""
        fields = b"".join(
            [
                _blob(os.fsencode(src)),
                _blob(os.fsencode(dest)),
                bytes([flags]),
                struct.pack(">i", -1 if min_sdk is None else min_sdk),
                _blob(b"SIGNER"),
                struct.pack(">I", len(chain)),
                *(_blob(c) for c in chain),
            ]
        )
        self._call(b"S", fields, sign_digest, timeout)

    def verify(self, path: Path, timeout: float) -> Verdict:
        """apksig's verification of the APK at ``path`` (what ``apksigner verify`` applies)."""
        return self._call(b"V", _blob(os.fsencode(path)), None, timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the running JVM (the next job starts one): e.g. before forking workers."""
        with self._lock:
            current, self._current = self._current, None
        if current is not None:
            current.stop(timeout)

    def _acquire(self) -> tuple[_Process, int, queue.SimpleQueue[_Message]]:
        with self._lock:
            current = self._current
            if current is None or not current.usable():
                if current is not None:
                    current.retire()
                self._current = None
                current = _Process(self.settings, _compiled(COMPILE_TIMEOUT))
                self._current = current
            rid, box = current.open()
            return current, rid, box

    def _call(self, kind: bytes, fields: bytes, sign_digest: SignDigest | None, timeout: float) -> Verdict:
        deadline = time.monotonic() + timeout
        jvm, rid, box = self._acquire()
        failure: SealboxError | None = None  # the key's own error, raised once the JVM gave up
        try:
            jvm.send(kind, rid, fields)
            while True:
                try:
                    message = box.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    jvm.kill(f"a job took more than {timeout:g} s")
                    raise SigningFailed(f"apksig timed out after {timeout:g} s (JVM killed)") from None
                if message is None:
                    raise SigningFailed(f"the apksig JVM stopped: {jvm.dead}")
                kind_in, body = message
                f = _Fields(body)
                if kind_in == ord("K"):
                    failure = self._answer(jvm, rid, f, sign_digest) or failure
                    continue
                if failure is not None:
                    raise failure
                flag, text = f.byte(), f.blob().decode(errors="replace")
                if kind_in == ord("D"):
                    return Verdict(bool(flag), text)
                raise (FormatRejected if flag else SigningFailed)(f"apksigner's library apksig: {text[:300]}")
        finally:
            jvm.close_request(rid)

    @staticmethod
    def _answer(jvm: _Process, rid: int, f: _Fields, sign_digest: SignDigest | None) -> SealboxError | None:
        """Answer the JVM's request for a signature; the error if the key could not sign."""
        hash_name, digest = f.blob().decode(errors="replace"), f.blob()
        try:
            if sign_digest is None or hash_name not in _HASHES:
                raise SigningFailed(f"apksig asked for an unexpected signature ({hash_name[:20]!r})")
            signature = sign_digest(hash_name, digest)  # type: ignore[arg-type]  # checked above
        except SealboxError as e:
            jvm.send(b"X", rid, _blob(str(e).encode()))
            return e
        jvm.send(b"R", rid, _blob(signature))
        return None


_registry_lock = threading.Lock()
_registry: dict[JvmSettings, ApksigJvm] = {}


def jvm_for(settings: JvmSettings) -> ApksigJvm:
    """The process's JVM for ``settings`` (formats with the same settings share it)."""
    with _registry_lock:
        jvm = _registry.get(settings)
        if jvm is None:
            jvm = _registry[settings] = ApksigJvm(settings)
        return jvm
