"""The signing log on disk: append-only segments, group-committed, with signed checkpoints.

Layout of a log folder (one per server instance; replicas each keep their own)::

    log.json                 {"origin": ..., "instance": ..., "created": ...}, written once
    segment-00000000.log     entries 0.. as frames; a new segment starts past ``segment_bytes``
    checkpoints.log          signed checkpoints, as frames
    lock                     held while a server writes the folder

A frame is ``u32 big-endian length | JSON | SHA-256(0x00 || JSON)``: the JSON is the entry
(one signature, its ``index`` included), the trailing hash its RFC 9162 leaf hash, which names
a corrupted entry at once. Entries are the leaves of one Merkle tree across every segment;
a checkpoint is a C2SP checkpoint body (origin, size, root) plus a time, signed with the log's
Ed25519 key.

One writer thread does all the disk work. :meth:`SignLog.append` only queues an entry and
returns a future; the writer takes everything queued, writes it in one ``write`` and makes it
durable with one ``fsync`` (group commit: concurrent jobs share a flush), then resolves each
future with the entry's index. A write that fails (disk full) is cut back and fails its batch;
the next batch tries again. An ``fsync`` that fails leaves the log's state unknown (the page
cache may have dropped the pages): the log then refuses everything until a restart.
"""

from __future__ import annotations

import base64
import bisect
import concurrent.futures
import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import socket
import struct
import threading
import time
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..errors import ConfigError, SigningFailed
from ..fsutil import private, take_lock
from . import merkle

log = logging.getLogger("sealbox.signlog")

META = "log.json"
CHECKPOINTS = "checkpoints.log"
SEGMENT = re.compile(r"^segment-(\d{8})\.log$")
_LEN = struct.Struct(">I")
MAX_FRAME = 1 << 20  # an entry is well under 2 KiB; anything larger is not one of ours
#: results whose log index a GET can name (the newest; an older result is served without)
LOOKUP_ENTRIES = 500_000
_META_KEYS = ("origin", "instance")
PROBE_BYTES = 4096  # one page: a file system that cannot give one cannot take a batch either


class LogUnavailable(SigningFailed):
    """The signing log cannot record an entry: the signature is not released."""


class LogCorrupt(ConfigError):
    """The log on disk does not match itself or its checkpoints: the server will not extend it."""


def segment_name(n: int) -> str:
    return f"segment-{n:08d}.log"


def encode(obj: dict[str, Any]) -> bytes:
    """The exact bytes a JSON object is logged as (sorted keys, no spaces)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def frame(data: bytes) -> bytes:
    return _LEN.pack(len(data)) + data + merkle.leaf_hash(data)


@dataclass(frozen=True)
class Frame:
    data: bytes
    offset: int  # where the frame starts in its file
    intact: bool  # its trailing hash matches its data


def read_frames(f: BinaryIO) -> Iterator[Frame]:
    """Every frame of a file in order; a torn one at the end raises :class:`TornFrame`."""
    offset = 0
    while True:
        head = f.read(_LEN.size)
        if not head:
            return
        if len(head) < _LEN.size:
            raise TornFrame(offset)
        (n,) = _LEN.unpack(head)
        if n > MAX_FRAME:
            raise TornFrame(offset, f"frame length {n} is not plausible")
        body = f.read(n + merkle.HASH_SIZE)
        if len(body) < n + merkle.HASH_SIZE:
            raise TornFrame(offset)
        data = body[:n]
        yield Frame(data, offset, merkle.leaf_hash(data) == body[n:])
        offset += _LEN.size + n + merkle.HASH_SIZE


class TornFrame(Exception):
    """A file ends inside a frame (``cut``: what a crash leaves) or holds something that is not
    one (not ``cut``: the file was changed) at ``offset``."""

    def __init__(self, offset: int, why: str = "") -> None:
        super().__init__(why or "the file ends inside a frame")
        self.offset = offset
        self.cut = not why
        self.why = str(self)


# -- checkpoints ------------------------------------------------------------------------------
def key_id(name: str, public: Ed25519PublicKey) -> bytes:
    """The C2SP signed-note key ID of an Ed25519 key: SHA-256(name || LF || 0x01 || key)[:4]."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(name.encode() + b"\n\x01" + raw).digest()[:4]


def public_key_text(public: Ed25519PublicKey) -> str:
    """A log public key as stored in ``DIR/public/signlog.pub``: base64 of the raw 32 bytes."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def parse_public_key(text: str) -> Ed25519PublicKey:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise ConfigError("a signing log public key is the base64 of a raw 32-byte Ed25519 key") from None


@dataclass(frozen=True)
class Checkpoint:
    """A signed tree head. The signature covers :meth:`body`: a C2SP ``tlog-checkpoint``
    body (origin, size, base64 root) with the time as an extension line."""

    origin: str
    size: int
    root: bytes
    time: int  # milliseconds since the epoch
    signature: bytes

    @staticmethod
    def body_of(origin: str, size: int, root: bytes, when: int) -> bytes:
        return f"{origin}\n{size}\n{base64.b64encode(root).decode()}\ntime {when}\n".encode()

    def body(self) -> bytes:
        return self.body_of(self.origin, self.size, self.root, self.time)

    @classmethod
    def sign(
        cls, sign: Callable[[bytes], bytes], origin: str, size: int, root: bytes, when: int
    ) -> Checkpoint:
        return cls(origin, size, root, when, sign(cls.body_of(origin, size, root, when)))

    def verify(self, public: Ed25519PublicKey) -> bool:
        try:
            public.verify(self.signature, self.body())
        except InvalidSignature:
            return False
        return True

    def note(self, public: Ed25519PublicKey) -> str:
        """The checkpoint as a C2SP signed note (``body``, a blank line, a signature line)."""
        sig = base64.b64encode(key_id(self.origin, public) + self.signature).decode()
        return f"{self.body().decode()}\n\u2014 {self.origin} {sig}\n"

    def to_json(self) -> dict[str, Any]:
        return {
            "origin": self.origin,
            "size": self.size,
            "root": self.root.hex(),
            "time": self.time,
            "signature": base64.b64encode(self.signature).decode(),
        }

    @classmethod
    def from_json(cls, obj: Any) -> Checkpoint:
        """Raises ValueError for anything that is not a checkpoint."""
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
        try:
            origin, size, root = obj["origin"], obj["size"], bytes.fromhex(obj["root"])
            when, signature = obj["time"], base64.b64decode(obj["signature"], validate=True)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a checkpoint: {e}") from None
        if not isinstance(origin, str) or not isinstance(size, int) or not isinstance(when, int):
            raise ValueError("not a checkpoint: origin, size or time of the wrong type")
        if size < 0 or len(root) != merkle.HASH_SIZE or len(signature) != 64:
            raise ValueError("not a checkpoint: bad size, root or signature length")
        return cls(origin, size, root, when, signature)


# -- the log ----------------------------------------------------------------------------------
class _Pending:
    __slots__ = ("entry", "future")

    def __init__(self, entry: dict[str, Any]) -> None:
        self.entry = entry
        self.future: concurrent.futures.Future[int] = concurrent.futures.Future()


class SignLog:
    """The signing log of one server instance (see the module docstring)."""

    def __init__(
        self,
        root: Path,
        sign: Callable[[bytes], bytes],
        public: Ed25519PublicKey,
        level: str,
        segment_bytes: int = 64 * 1024 * 1024,
        checkpoint_interval: float = 5.0,
    ) -> None:
        """``sign`` makes an Ed25519 signature with the log key, ``public`` is its public half."""
        self.root = root
        self._sign = sign
        self.public = public
        self.segment_bytes = segment_bytes
        self.checkpoint_interval = checkpoint_interval
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock_file = take_lock(root / "lock", f"signing log {root} is in use by another sealbox server")
        try:
            meta = self._meta(level)
            self.origin: str = meta["origin"]
            self.instance: str = meta["instance"]
            self.host = socket.gethostname()
            self.tree = merkle.Tree()
            #: (first index, segment number) of every segment, and each entry's offset in its own
            self._segments: list[tuple[int, int]] = []
            self._offsets = array("q")
            self._lookup: dict[str, int] = {}
            self._times: tuple[str | None, str | None] = (None, None)
            self._load_segments()
            self.checkpoints: list[Checkpoint] = []
            self._cp_fd = self._load_checkpoints()
            self._fd = self._open_segment()
            self._pos = os.fstat(self._fd).st_size  # where the next frame goes
        except BaseException:
            self._lock_file.close()
            raise
        self.checkpoint: Checkpoint | None = self.checkpoints[-1] if self.checkpoints else None
        self._cond = threading.Condition()
        self._queue: list[_Pending] = []
        self._cp_waiters: list[concurrent.futures.Future[Checkpoint]] = []
        self._closing = False
        self._last_cp = time.monotonic()
        #: why the log refuses everything until a restart (an fsync failed), else None
        self.broken: str | None = None
        #: why the last write failed, cleared by the next one that succeeds
        self.last_error: str | None = None
        self.appended = 0  # entries made durable since start-up
        self.flushes = 0  # batches made durable (one fsync each) since start-up
        self.failures = 0  # entries refused since start-up
        self._writer = threading.Thread(target=self._run, name="sealbox-signlog", daemon=True)
        self._writer.start()

    # -- opening ------------------------------------------------------------------------------
    def _meta(self, level: str) -> dict[str, str]:
        path = self.root / META
        try:
            meta = json.loads(path.read_text("utf-8"))
        except FileNotFoundError:
            instance = secrets.token_hex(8)
            meta = {"origin": f"sealbox/{level}/{instance}", "instance": instance, "created": _now()}
            tmp = self.root / f".{META}.tmp"
            with open(tmp, "wb", opener=private) as f:
                f.write(encode(meta) + b"\n")
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_dir(self.root)
            return meta
        except (OSError, ValueError) as e:
            raise LogCorrupt(f"signing log {self.root}: cannot read {META}: {e}") from None
        if not isinstance(meta, dict) or not all(isinstance(meta.get(k), str) for k in _META_KEYS):
            raise LogCorrupt(f"signing log {self.root}: {META} has no origin and instance")
        return meta

    def _load_segments(self) -> None:
        numbers = sorted(int(m[1]) for p in self.root.iterdir() if (m := SEGMENT.match(p.name)))
        first = last = None
        for i, n in enumerate(numbers):
            if n != i:
                raise LogCorrupt(f"signing log {self.root}: {segment_name(i)} is missing")
            path = self.root / segment_name(n)
            self._segments.append((self.tree.size, n))
            with path.open("rb") as f:
                try:
                    for fr in read_frames(f):
                        entry = self._check_entry(fr, path)
                        self._add(fr.data, fr.offset, entry)
                        first = first or entry.get("time")
                        last = entry.get("time")
                except TornFrame as t:
                    if not t.cut:  # not what a crash leaves: never cut away what may follow
                        where = f"signing log {self.root}: {path.name} byte {t.offset}"
                        raise LogCorrupt(f"{where}: {t.why}") from None
                    if n != numbers[-1]:
                        raise LogCorrupt(
                            f"signing log {self.root}: {path.name} is cut at byte {t.offset}, inside entry "
                            f"{self.tree.size}, and later segments follow"
                        ) from None
                    # A crash while writing the last batch: those entries were never made
                    # durable, so no signature of theirs was released. Drop the torn bytes.
                    log.warning(
                        "signing log tail dropped",
                        extra={"fields": {"event": "signlog_torn_tail", "file": path.name, "at": t.offset}},
                    )
                    os.truncate(path, t.offset)
        self._times = (first, last)

    def _check_entry(self, fr: Frame, path: Path) -> dict[str, Any]:
        where = f"signing log {self.root}: {path.name} byte {fr.offset}"
        if not fr.intact:
            raise LogCorrupt(f"{where}: entry {self.tree.size} does not match its hash")
        try:
            entry = json.loads(fr.data)
        except (ValueError, RecursionError):
            raise LogCorrupt(f"{where}: entry {self.tree.size} is not JSON") from None
        if not isinstance(entry, dict) or entry.get("index") != self.tree.size:
            got = entry.get("index") if isinstance(entry, dict) else None
            raise LogCorrupt(f"{where}: entry {self.tree.size} is numbered {got}")
        return entry

    def _load_checkpoints(self) -> int:
        path = self.root / CHECKPOINTS
        with contextlib.suppress(FileNotFoundError), path.open("rb") as f:
            try:
                for fr in read_frames(f):
                    try:
                        if not fr.intact:
                            raise ValueError("it does not match its hash")
                        self.checkpoints.append(Checkpoint.from_json(json.loads(fr.data)))
                    except (ValueError, RecursionError) as e:
                        where = f"signing log {self.root}: checkpoint at byte {fr.offset}"
                        raise LogCorrupt(f"{where}: {type(e).__name__}: {e}"[:300]) from None
            except TornFrame as t:
                if not t.cut:
                    where = f"signing log {self.root}: {CHECKPOINTS} byte {t.offset}"
                    raise LogCorrupt(f"{where}: {t.why}") from None
                log.warning(
                    "signing log checkpoint tail dropped",
                    extra={"fields": {"event": "signlog_torn_tail", "segment": CHECKPOINTS, "at": t.offset}},
                )
                os.truncate(path, t.offset)
        if self.checkpoints:
            cp = self.checkpoints[-1]
            n = len(self.checkpoints) - 1
            if not cp.verify(self.public):
                raise LogCorrupt(
                    f"signing log {self.root}: checkpoint {n} is not signed by this server's log key"
                )
            if cp.origin != self.origin:
                raise LogCorrupt(f"signing log {self.root}: checkpoint {n} is for log {cp.origin}")
            if cp.size > self.tree.size:
                raise LogCorrupt(
                    f"signing log {self.root}: checkpoint {n} covers {cp.size} entries, the log holds "
                    f"{self.tree.size}: entries were removed"
                )
            if self.tree.root(cp.size) != cp.root:
                raise LogCorrupt(
                    f"signing log {self.root}: the first {cp.size} entries do not match checkpoint {n}"
                )
        return _append_fd(path)

    def _open_segment(self) -> int:
        if not self._segments:
            self._segments.append((0, 0))
            fd = _append_fd(self.root / segment_name(0))
            _fsync_dir(self.root)
            return fd
        return _append_fd(self.root / segment_name(self._segments[-1][1]))

    def _add(self, data: bytes, offset: int, entry: dict[str, Any]) -> int:
        index = self.tree.append(merkle.leaf_hash(data))
        self._offsets.append(offset)
        fmt = entry.get("format")
        if isinstance(fmt, str):
            for side in ("input", "output"):
                part = entry.get(side)
                if isinstance(part, dict) and isinstance(part.get("sha1"), str):
                    key = f"{fmt}/{part['sha1']}"
                    # The input names the result; an output that replaces its input is also
                    # served under its own digest (signing it again returns it unchanged).
                    if side == "input" or key not in self._lookup:
                        self._lookup.pop(key, None)
                        self._lookup[key] = index
        while len(self._lookup) > LOOKUP_ENTRIES:
            del self._lookup[next(iter(self._lookup))]
        return index

    # -- the public face ----------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self.tree.size

    def append(self, entry: dict[str, Any]) -> concurrent.futures.Future[int]:
        """Queue ``entry`` (its ``index`` is set when written); the future resolves with the
        index once the entry is durable, or raises :class:`LogUnavailable`."""
        pending = _Pending(entry)
        with self._cond:
            if self.broken is not None or self._closing:
                self.failures += 1
                pending.future.set_exception(LogUnavailable(self.broken or "the signing log is closed"))
                return pending.future
            self._queue.append(pending)
            self._cond.notify()
        return pending.future

    def lookup(self, fmt: str, sha1: str) -> int | None:
        """The index of the entry whose result is (fmt, sha1), if it is a recent one."""
        return self._lookup.get(f"{fmt}/{sha1}")

    def covering(self, size: int) -> concurrent.futures.Future[Checkpoint]:
        """A checkpoint of at least ``size`` entries: the latest, or a new one made for it."""
        future: concurrent.futures.Future[Checkpoint] = concurrent.futures.Future()
        with self._cond:
            cp = self.checkpoint
            if cp is not None and cp.size >= size:
                future.set_result(cp)
            elif size > self.tree.size:
                future.set_exception(ValueError(f"the log holds {self.tree.size} entries"))
            else:
                self._cp_waiters.append(future)
                self._cond.notify()
        return future

    def entry(self, index: int) -> bytes:
        """The exact bytes of entry ``index`` (a durable one)."""
        if not 0 <= index < self.tree.size:
            raise IndexError(index)
        _, n = self._segments[bisect.bisect_right(self._segments, index, key=lambda s: s[0]) - 1]
        offset = self._offsets[index]
        with (self.root / segment_name(n)).open("rb") as f:
            f.seek(offset)
            (length,) = _LEN.unpack(f.read(_LEN.size))
            return f.read(length)

    def times(self) -> tuple[str | None, str | None]:
        """The time of the first and of the last entry."""
        return self._times

    def probe(self) -> str | None:
        """Why the log cannot record now (None: it can): a page written and fsynced beside
        the segments, as the next batch would be (the heartbeat's check)."""
        if self.broken is not None:
            return self.broken
        path = self.root / f".probe-{os.getpid()}-{threading.get_ident()}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                _write_all(fd, bytes(PROBE_BYTES))
                os.fsync(fd)
            finally:
                os.close(fd)
                path.unlink(missing_ok=True)
        except OSError as e:
            return f"cannot write in {self.root}: {e.strerror or e}"
        return None

    def close(self) -> None:
        """Write what is queued and a last checkpoint, then release the folder."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._writer.join()
        for fd in (self._fd, self._cp_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._lock_file.close()

    # -- the writer thread --------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._queue or self._cp_waiters or self._closing or self._checkpoint_due()):
                    self._cond.wait(self._until_checkpoint())
                batch, self._queue = self._queue, []
                waiters, self._cp_waiters = self._cp_waiters, []
                closing = self._closing
            # A job that gave up waiting (its timeout) cancelled its future: its entry is not
            # written, and its signature is not released. The rest can no longer be cancelled.
            batch = [p for p in batch if p.future.set_running_or_notify_cancel()]
            waiters = [w for w in waiters if w.set_running_or_notify_cancel()]
            try:
                if batch:
                    self._write(batch)
                if waiters or closing or self._checkpoint_due():
                    self._write_checkpoint(waiters)
            except Exception as e:  # a bug must not leave jobs waiting forever: refuse instead
                log.exception("signing log writer failed", extra={"fields": {"event": "signlog_failed"}})
                self.broken = f"the signing log writer failed: {type(e).__name__}: {e}"
                left: list[concurrent.futures.Future[Any]] = [p.future for p in batch]
                for f in [*left, *waiters]:
                    if not f.done():
                        f.set_exception(LogUnavailable(self.broken))
            if closing:
                with self._cond:
                    if not self._queue:
                        return

    def _checkpoint_due(self) -> bool:
        done = self.checkpoint.size if self.checkpoint is not None else 0
        return self.tree.size > done and time.monotonic() - self._last_cp >= self.checkpoint_interval

    def _until_checkpoint(self) -> float | None:
        done = self.checkpoint.size if self.checkpoint is not None else 0
        if self.tree.size <= done:
            return None
        return max(0.0, self.checkpoint_interval - (time.monotonic() - self._last_cp))

    def _fail(self, batch: list[_Pending], why: str) -> None:
        self.failures += len(batch)
        self.last_error = why
        fields = {"event": "signlog_failed", "error": why, "entries": len(batch)}
        log.error("signing log write failed", extra={"fields": fields})
        for p in batch:
            p.future.set_exception(LogUnavailable(why))

    def _write(self, batch: list[_Pending]) -> None:
        if self.broken is not None:
            self._fail(batch, self.broken)
            return
        try:
            if self._pos >= self.segment_bytes:
                self._rotate()
        except OSError as e:
            self._fail(batch, f"cannot start a new log segment: {e.strerror or e}")
            return
        start = self._pos
        datas = []
        for i, p in enumerate(batch):
            p.entry["index"] = self.tree.size + i
            datas.append(encode(p.entry))
        blob = b"".join(frame(d) for d in datas)
        try:
            _write_all(self._fd, blob)
        except OSError as e:
            why = f"cannot write the signing log: {e.strerror or e}"
            try:  # no half entry may stay behind: the next batch starts where this one did
                os.ftruncate(self._fd, start)
            except OSError as e2:
                self.broken = f"{why}, and cannot cut it back: {e2.strerror or e2}"
            self._fail(batch, why)
            return
        self._pos = start + len(blob)
        try:
            os.fsync(self._fd)
        except OSError as e:
            # After a failed fsync the kernel may have dropped the pages: what is on disk is
            # unknown, so nothing more is written until a restart reads the log again.
            self.broken = f"cannot make the signing log durable: {e.strerror or e}"
            self._fail(batch, self.broken)
            return
        offset = start
        for p, data in zip(batch, datas, strict=True):
            index = self._add(data, offset, p.entry)
            offset += _LEN.size + len(data) + merkle.HASH_SIZE
            when = p.entry.get("time")
            self._times = (self._times[0] or when, when)
            p.future.set_result(index)
        self.appended += len(batch)
        self.flushes += 1
        self.last_error = None

    def _rotate(self) -> None:
        n = self._segments[-1][1] + 1
        path = self.root / segment_name(n)
        fd = _append_fd(path, os.O_EXCL)
        try:
            _fsync_dir(self.root)
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(self._fd)  # every batch in it was fsynced when written
        self._fd, self._pos = fd, 0
        self._segments.append((self.tree.size, n))
        fields = {"event": "signlog_segment", "file": segment_name(n), "first": self.tree.size}
        log.info("signing log segment", extra={"fields": fields})

    def _write_checkpoint(self, waiters: list[concurrent.futures.Future[Checkpoint]]) -> None:
        size = self.tree.size
        cp = self.checkpoint
        if cp is None or cp.size < size:
            cp = Checkpoint.sign(self._sign, self.origin, size, self.tree.root(size), int(time.time() * 1000))
            start = os.fstat(self._cp_fd).st_size
            try:
                _write_all(self._cp_fd, frame(encode(cp.to_json())))
                os.fsync(self._cp_fd)
            except OSError as e:
                why = f"cannot write a signing log checkpoint: {e.strerror or e}"
                with contextlib.suppress(OSError):
                    os.ftruncate(self._cp_fd, start)
                self.last_error = why
                fields = {"event": "signlog_failed", "error": why, "entries": 0}
                log.error("signing log checkpoint failed", extra={"fields": fields})
                for w in waiters:
                    w.set_exception(LogUnavailable(why))
                self._last_cp = time.monotonic()  # try again at the next interval, not at once
                return
            self.checkpoints.append(cp)
            self.checkpoint = cp
        self._last_cp = time.monotonic()
        for w in waiters:
            w.set_result(cp)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _append_fd(path: Path, extra: int = 0) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | extra, 0o600)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
