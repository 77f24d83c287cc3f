"""Content-addressed storage: on disk for durability, indexed in memory for speed.

    unsigned/<sha1>            an input (uploaded, or a previous output kept for chaining)
                               with its original filename as metadata "fn"
    signed/<fmt>/<sha1>        the result of signing input <sha1> with <fmt>, with
                               metadata "sha1": "<sha1 of that result> <size>"
    small.sqlite3              small jobs signed by the worker processes: their inputs and
                               results as rows (see :mod:`.smallstore`)
    tmp/                       uploads and job scratch, renamed into place atomically
    lock                       held while a server uses the folder

Metadata is an extended attribute (``user.sealbox.<name>``) set before the file is renamed
into place, so file and metadata appear together; on a file system without user xattrs
it is a sidecar file ``<file>.<name>``, written first. Creating files is the costly part
of a small job, which is why the attribute is preferred.

Every file appears by ``os.replace`` from ``tmp/``, so a crash never exposes half a file.
Results seen since start-up are indexed in memory (small ones with their bytes), so a
poll for a fresh result costs no disk access. Failures live only in memory: they may
depend on a config that changes with the next start.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import os
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..errors import ConfigError
from ..hashing import hash_file
from .smallstore import SmallStore

#: Results up to this size are kept in memory, up to CACHE_BYTES in all.
CACHED_RESULT_MAX = 256 * 1024
CACHE_BYTES = 64 * 1024 * 1024
INDEX_ENTRIES = 100_000
FAILURE_ENTRIES = 100_000
XATTR = "user.sealbox."
TOUCH_EVERY = 60.0  # refresh a result's age on disk at most this often


@dataclass(frozen=True)
class Failure:
    permanent: bool
    reason: str
    when: float


@dataclass
class Result:
    """A published result: its SHA-1 and size, its file (None in the small store) and its
    bytes when small."""

    path: Path | None
    digest: str
    size: int
    body: bytes | None = None
    touched: float = 0.0


class Storage:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.unsigned = root / "unsigned"
        self.signed = root / "signed"
        self.tmp = root / "tmp"
        for d in (self.unsigned, self.signed, self.tmp):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock_file = self._take_lock(root / "lock")
        # Leftovers of a crash are never served: start from an empty scratch area.
        for leftover in self.tmp.iterdir():
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
        shutil.rmtree(root / "failed", ignore_errors=True)  # kept on disk by earlier versions
        self._serial = itertools.count()
        self.xattrs = self._xattrs_work()
        self._mutex = threading.Lock()  # jobs publish from worker threads
        self._index: OrderedDict[tuple[str, str], Result] = OrderedDict()
        self._cached_bytes = 0
        self._failures: OrderedDict[tuple[str, str], Failure] = OrderedDict()
        self.small = SmallStore(root / "small.sqlite3")

    @staticmethod
    def _take_lock(path: Path) -> BinaryIO:
        f = open(path, "ab")  # noqa: SIM115 - held for the life of the server
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise ConfigError(f"{path.parent} is in use by another sealbox server") from None
        return f

    def close(self) -> None:
        self.small.close()
        self._lock_file.close()

    def _xattrs_work(self) -> bool:
        probe = self.tmp / "xattr-probe"
        try:
            probe.write_bytes(b"")
            os.setxattr(probe, XATTR + "probe", b"1")
            return os.getxattr(probe, XATTR + "probe") == b"1"
        except (OSError, AttributeError):  # ENOTSUP, or no xattr support at all
            return False
        finally:
            probe.unlink(missing_ok=True)

    def _publish(self, tmp: Path, final: Path, meta: dict[str, str]) -> None:
        """Rename ``tmp`` to ``final`` with its metadata already in place."""
        for name, value in meta.items():
            if self.xattrs:
                os.setxattr(tmp, XATTR + name, value.encode("utf-8"))
            else:
                self._write_atomic(final.with_name(f"{final.name}.{name}"), value.encode("utf-8"))
        os.replace(tmp, final)

    def _meta(self, path: Path, name: str) -> str | None:
        if self.xattrs:
            try:
                return os.getxattr(path, XATTR + name).decode("utf-8")
            except FileNotFoundError:
                return None  # no file, so no sidecar worth a second lookup (the common miss)
            except OSError:
                pass  # no attribute: maybe written where attributes did not work
        try:
            return path.with_name(f"{path.name}.{name}").read_text("utf-8")
        except OSError:
            return None

    # -- scratch ------------------------------------------------------------------------------
    def temp_path(self, prefix: str = "t") -> Path:
        """A fresh name in ``tmp/`` (the server holds the folder's lock, so its processes
        are the only writers: pid and counter are enough)."""
        return self.tmp / f"{prefix}-{os.getpid()}-{next(self._serial)}"

    def temp_file(self) -> tuple[Path, BinaryIO]:
        path = self.temp_path("up")
        return path, open(path, "xb")

    def temp_dir(self) -> Path:
        path = self.temp_path("job")
        path.mkdir(mode=0o700)
        return path

    def _write_atomic(self, path: Path, data: bytes | bytearray) -> None:
        self._place(data, lambda tmp: os.replace(tmp, path))

    def _place(self, data: bytes | bytearray, move: Callable[[Path], None]) -> None:
        """Write ``data`` to a fresh temp file and ``move`` it into place; no leftover on failure."""
        tmp = self.temp_path()
        try:
            with open(tmp, "xb") as f:
                f.write(data)
            move(tmp)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    # -- inputs -------------------------------------------------------------------------------
    def input_path(self, sha1: str) -> Path:
        return self.unsigned / sha1

    def has_input(self, sha1: str) -> bool:
        if self.small.input_filename(sha1) is not None:
            return True
        return self._meta(self.unsigned / sha1, "fn") is not None and (self.unsigned / sha1).is_file()

    def input_filename(self, sha1: str) -> str | None:
        return self._meta(self.unsigned / sha1, "fn") or self.small.input_filename(sha1)

    def small_input(self, sha1: str) -> tuple[str, bytes] | None:
        """(filename, bytes) of an input held in the small store."""
        return self.small.input(sha1)

    def add_input(self, sha1: str, filename: str, src: Path) -> None:
        """Move a verified upload into place (``src`` must be in ``tmp/``)."""
        self._publish(src, self.unsigned / sha1, {"fn": filename})

    def add_input_bytes(self, sha1: str, filename: str, data: bytes | bytearray) -> None:
        """Store a verified upload that was small enough to stay in memory."""
        self._place(data, lambda tmp: self._publish(tmp, self.unsigned / sha1, {"fn": filename}))

    def link_input(self, sha1: str, filename: str, src: Path) -> None:
        """Keep a copy of ``src`` as input ``sha1`` (used to remember outputs for chaining)."""
        if self.has_input(sha1):
            return
        tmp = self.temp_path()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        self.add_input(sha1, filename, tmp)

    def drop_input(self, sha1: str) -> None:
        self.small.drop_input(sha1)
        (self.unsigned / sha1).unlink(missing_ok=True)
        (self.unsigned / f"{sha1}.fn").unlink(missing_ok=True)

    # -- results ------------------------------------------------------------------------------
    def result(self, fmt: str, sha1: str) -> Result | None:
        """The result of (fmt, sha1) if it is there and whole; refreshes its age on disk."""
        key = (fmt, sha1)
        with self._mutex:
            found = self._index.get(key)
            if found is not None:
                self._index.move_to_end(key)
        now = time.time()
        if found is not None:
            if now - found.touched < TOUCH_EVERY:
                return found
            try:  # keep it alive on disk, without a write per GET
                if found.path is None:
                    self.small.touch(fmt, sha1, now)
                else:
                    self._touch(found.path, now)
                found.touched = now
                return found
            except OSError:
                pass  # gone from disk (removed by hand?): ask the disk what is left
        found = self._load_result(fmt, sha1, now)
        with self._mutex:
            if found is None:
                self._forget(key)
            else:
                self._remember(key, found)
        return found

    def _load_result(self, fmt: str, sha1: str, now: float) -> Result | None:
        held = self.small.result(fmt, sha1)
        if held is not None:
            digest, body, touched = held
            if now - touched > TOUCH_EVERY:
                self.small.touch(fmt, sha1, now)
            return Result(None, digest, len(body), body, now)
        path = self.signed / fmt / sha1
        meta = self._meta(path, "sha1")
        if meta is None:
            return None
        try:
            digest, _, size = meta.strip().partition(" ")
            st = path.stat()
            if st.st_size != int(size):
                # Torn by a power loss (results are renamed into place but not fsynced):
                # drop it so the job runs again instead of serving a broken file.
                path.unlink(missing_ok=True)
                return None
            if now - st.st_mtime > TOUCH_EVERY:  # keep it alive, without a write per GET
                self._touch(path, now)
        except (OSError, ValueError):
            return None
        return Result(path, digest, st.st_size, touched=now)

    def _touch(self, path: Path, now: float) -> None:
        os.utime(path, (now, now))
        if not self.xattrs:
            os.utime(path.with_name(f"{path.name}.sha1"), (now, now))

    def add_result(self, fmt: str, sha1: str, output: Path) -> Result:
        """Publish ``output`` (in ``tmp/``) as the result of (fmt, sha1).

        The metadata (digest and size) goes first, then the result is renamed into place:
        a reader never sees a result without its metadata, and ``result`` refuses a file
        whose size does not match, so no fsync is needed on the hot path.
        """
        folder = self.signed / fmt
        folder.mkdir(exist_ok=True, mode=0o700)
        size = output.stat().st_size
        body = output.read_bytes() if size <= CACHED_RESULT_MAX else None
        digest = hash_file(output) if body is None else _sha1(body)
        self._publish(output, folder / sha1, {"sha1": f"{digest} {size}"})
        found = Result(folder / sha1, digest, size, body, time.time())
        self.remember(fmt, sha1, found)
        return found

    def add_small_job(
        self, fmt: str, sha1: str, filename: str, data: bytes, output: bytes, output_is_input: bool
    ) -> Result:
        """Publish a small job signed by a worker process: input, result (and, for formats
        whose output replaces the file, the output as a further input) in one commit."""
        digest = _sha1(output)
        now = time.time()
        self.small.put_job(fmt, sha1, filename, data, digest, output, output_is_input, now)
        found = Result(None, digest, len(output), output, now)
        self.remember(fmt, sha1, found)
        return found

    def remember(self, fmt: str, sha1: str, found: Result) -> None:
        """Index a published result, so polls for it need no disk access."""
        with self._mutex:
            self._remember((fmt, sha1), found)

    def _remember(self, key: tuple[str, str], found: Result) -> None:
        self._forget(key)
        self._index[key] = found
        if found.body is not None:
            self._cached_bytes += found.size
        while len(self._index) > INDEX_ENTRIES or self._cached_bytes > CACHE_BYTES:
            self._forget(next(iter(self._index)))

    def _forget(self, key: tuple[str, str]) -> None:
        old = self._index.pop(key, None)
        if old is not None and old.body is not None:
            self._cached_bytes -= old.size

    # -- failures -----------------------------------------------------------------------------
    def failure(self, fmt: str, sha1: str, transient_ttl: float, now: float | None = None) -> Failure | None:
        key = (fmt, sha1)
        with self._mutex:
            found = self._failures.get(key)
            if found is None:
                return None
            if not found.permanent and (now or time.time()) - found.when > transient_ttl:
                del self._failures[key]  # forgotten: may be retried
                return None
            return found

    def add_failure(self, fmt: str, sha1: str, permanent: bool, reason: str) -> None:
        with self._mutex:
            self._failures.pop((fmt, sha1), None)
            self._failures[(fmt, sha1)] = Failure(permanent, reason, time.time())
            while len(self._failures) > FAILURE_ENTRIES:
                self._failures.popitem(last=False)

    def clear_failure(self, fmt: str, sha1: str) -> None:
        with self._mutex:
            self._failures.pop((fmt, sha1), None)

    # -- cleanup ------------------------------------------------------------------------------
    def cleanup(self, max_age: float) -> int:
        """Delete inputs and results older than ``max_age``; returns the count."""
        cutoff = time.time() - max_age
        removed = 0
        folders = [self.unsigned, self.tmp]
        folders.extend(p for p in self.signed.iterdir() if p.is_dir())
        for folder in folders:
            for entry in folder.iterdir():
                with contextlib.suppress(OSError):
                    if entry.lstat().st_mtime < cutoff:
                        if entry.is_dir():
                            shutil.rmtree(entry, ignore_errors=True)
                        else:
                            entry.unlink()
                        removed += 1
        removed += self.small.cleanup(cutoff)
        with self._mutex:
            # The next lookup goes to disk, which knows what is left.
            self._index.clear()
            self._cached_bytes = 0
            stale = [k for k, f in self._failures.items() if f.when < cutoff]
            for k in stale:
                del self._failures[k]
        return removed


def _sha1(data: bytes) -> str:
    return hashlib.sha1(data, usedforsecurity=False).hexdigest()
