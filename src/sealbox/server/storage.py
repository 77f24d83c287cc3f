"""The content store: inputs and results by SHA-1, each a blob kept as a row or as a file.

    unsigned/<sha1>            an input kept as a file (uploaded, or a previous output kept
                               for chaining), with its original filename as metadata "fn"
    signed/<fmt>/<sha1>        a result kept as a file: input <sha1> signed with <fmt>, with
                               metadata "sha1": "<sha1 of that result> <size>"
    small.sqlite3              inputs and results kept as rows (:mod:`.smallstore`)
    tmp/                       uploads and job scratch, renamed into place atomically
    lock                       held while a server uses the folder

Callers see one interface (:class:`Storage`: ``get_input``, ``put_input``, ``result``,
``put_result``, ``drop_input``) and never which backend holds a blob. Where a blob goes follows
where it is: content held in memory (only small content ever is: uploads spool to a file past
:data:`sealbox.wire.SMALL_FILE`, and the signing workers take no more) becomes a row, in one
commit with its job; a file is renamed into place. Lookups ask the rows first, then the files.

File metadata is an extended attribute (``user.sealbox.<name>``) set before the file is renamed
into place, so file and metadata appear together; on a file system without user xattrs it is a
sidecar file ``<file>.<name>``, written first. Creating files is the costly part of a small job,
which is why the attribute is preferred, and small jobs use rows.

Every file appears by ``os.replace`` from ``tmp/``, so a crash never exposes half a file.
Results seen since start-up are indexed in memory (small ones with their bytes), so a
poll for a fresh result costs no disk access. Failures live only in memory: they may
depend on a config that changes with the next start.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import itertools
import logging
import os
import shutil
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from ..errors import SigningFailed
from ..fsutil import MAX_REPORTED, private, remove_tree, take_lock
from ..hashing import hash_file, hash_stream
from ..wire import SMALL_FILE
from .smallstore import RowStore, RowStoreError

log = logging.getLogger("sealbox.storage")
_T = TypeVar("_T")

#: Fresh results up to SMALL_FILE are kept in memory, up to CACHE_BYTES in all.
CACHE_BYTES = 64 * 1024 * 1024
INDEX_ENTRIES = 100_000
FAILURE_ENTRIES = 100_000
XATTR = "user.sealbox."
TOUCH_EVERY = 60.0  # refresh a result's age on disk at most this often
GONE = "the input is no longer on the server; upload it again"
#: the content of an input whose bytes were not kept: a path that can never exist, so a read
#: fails (a signer must never sign other bytes than the upload's)
NOT_KEPT = Path("/dev/null/sealbox-not-kept")


class InputGone(SigningFailed):
    """The input left the store before its job read it (removed, or dropped as corrupt). Nothing
    is then known about the content, so nothing is remembered: a poll answers a plain 404 and
    the client uploads it again."""


@dataclass(frozen=True)
class Failure:
    permanent: bool
    reason: str
    when: float


@dataclass
class Blob:
    """Content: its bytes when held in memory (small), else its file."""

    content: bytes | Path
    size: int

    @classmethod
    def of(cls, content: bytes | Path) -> Blob:
        return cls(content, len(content) if isinstance(content, bytes) else content.stat().st_size)

    @property
    def body(self) -> bytes | None:
        """The bytes, when held in memory."""
        return self.content if isinstance(self.content, bytes) else None

    def open(self) -> BinaryIO:
        """A binary reader of the content, wherever it is."""
        if isinstance(self.content, bytes):
            return io.BytesIO(self.content)
        return self.content.open("rb")


@dataclass(kw_only=True)
class Input(Blob):
    """Content to sign: it hashes to ``sha1``, and ``filename`` is the name of *some* upload of it."""

    sha1: str
    filename: str
    #: hash states over the content taken on its way in (hashlib names), so no one reads it again
    digests: Mapping[str, Any] = field(default_factory=dict)
    #: known to hash to ``sha1`` (an upload, a row read back); a stored file is not until
    #: :meth:`Storage.checked` has hashed it
    checked: bool = True

    @property
    def kept(self) -> bool:
        """False when only ``digests`` were kept (a big upload for a format that signs its
        SHA-256 alone): ``content`` is then :data:`NOT_KEPT`, which no one can read."""
        return self.content != NOT_KEPT


@dataclass(kw_only=True)
class Result(Blob):
    """A published result, ready to send: its SHA-1 is ``digest``; ``content`` is its bytes when
    held in memory, else its file."""

    digest: str
    #: kept as a row (else as a file): where its age is refreshed
    in_row: bool = False
    touched: float = 0.0


class Storage:
    """The content store of one data folder (see the module's docstring). ``xattrs``: whether
    file metadata goes in extended attributes (default: if the file system has them)."""

    def __init__(self, root: Path, xattrs: bool | None = None) -> None:
        self.root = root
        self.tmp = root / "tmp"
        self._serial = itertools.count()
        files = _Files(root, self.temp_path)
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        for d in (files.unsigned, files.signed, self.tmp):
            d.mkdir(exist_ok=True, mode=0o700)
        self._lock_file = take_lock(root / "lock", f"{root} is in use by another sealbox server")
        self._clear_scratch()
        tightened = make_private(root, self.tmp)
        if tightened:
            log.warning(
                "store modes tightened",
                extra={"fields": {"event": "store_private", "path": str(root), "tightened": tightened}},
            )
        files.xattrs = files.probe_xattrs() if xattrs is None else xattrs
        self._files = files
        self._rows = RowStore(root / "small.sqlite3")
        self._rows.check()
        self._mutex = threading.Lock()  # jobs publish from worker threads
        self._index: OrderedDict[tuple[str, str], Result] = OrderedDict()
        self._cached_bytes = 0
        self._failures: OrderedDict[tuple[str, str], Failure] = OrderedDict()

    @property
    def xattrs(self) -> bool:
        """Whether file metadata is kept in extended attributes (else in sidecar files)."""
        return self._files.xattrs

    def _clear_scratch(self) -> None:
        """Leftovers of a crash are never served: start from an empty scratch area. Whatever
        is there (a hostile archive's tree, thousands deep; folders without permissions;
        fifos) goes, or is logged and skipped: leftovers never stop a start."""
        removed, kept = 0, []
        try:
            leftovers = [*self.tmp.iterdir(), self.root / "failed"]  # failed/: earlier versions
        except OSError as e:
            leftovers, kept = [], [f"{self.tmp}: {e.strerror}"]
        for leftover in filter(os.path.lexists, leftovers):
            left = remove_tree(leftover)
            kept += left
            removed += not left
        if removed:
            log.info("scratch cleared", extra={"fields": {"event": "scratch_cleared", "removed": removed}})
        if kept:
            log.warning(
                "leftovers kept",
                extra={
                    "fields": {"event": "leftovers_kept", "path": str(self.tmp), "kept": kept[:MAX_REPORTED]}
                },
            )

    def close(self) -> None:
        self._rows.close()
        self._lock_file.close()

    # -- scratch ------------------------------------------------------------------------------
    def temp_path(self, prefix: str = "t") -> Path:
        """A fresh name in ``tmp/`` (the server holds the folder's lock, so its processes
        are the only writers: pid and counter are enough)."""
        return self.tmp / f"{prefix}-{os.getpid()}-{next(self._serial)}"

    def temp_file(self) -> tuple[Path, BinaryIO]:
        path = self.temp_path("up")
        return path, open(path, "xb", opener=private)

    def temp_dir(self) -> Path:
        path = self.temp_path("job")
        path.mkdir(mode=0o700)
        return path

    @contextlib.contextmanager
    def on_disk(self, blob: Blob) -> Iterator[Path]:
        """A file with ``blob``'s content, for a signer (signers read a path): its own file, or
        for the while, its bytes written to scratch."""
        if isinstance(blob.content, Path):
            yield blob.content
            return
        path = self.temp_path("in")
        try:
            with open(path, "xb", opener=private) as f:
                f.write(blob.content)
            yield path
        finally:
            path.unlink(missing_ok=True)

    # -- inputs -------------------------------------------------------------------------------
    def has_input(self, sha1: str) -> bool:
        return self._rows_or(False, self._rows.has_input, sha1) or self._files.has_input(sha1)

    def get_input(self, sha1: str) -> Input | None:
        """The input ``sha1``, if held: a row's bytes (checked as read: a corrupt row is
        dropped), or a file (checked by :meth:`checked` before it is signed)."""
        held = self._rows_or(None, self._rows.read_input, sha1)
        if held is not None:
            filename, data = held
            return Input(data, len(data), sha1=sha1, filename=filename)
        return self._files.read_input(sha1)

    def put_input(self, item: Input) -> Input:
        """Store ``item`` (bytes, or a file in ``tmp/``, which is moved); the stored input."""
        if isinstance(item.content, bytes):
            self._rows.write_input(item.sha1, item.filename, item.content, time.time())
            return item
        path = self._files.put_input(item.sha1, item.filename, item.content)
        return dataclasses.replace(item, content=path)

    def checked(self, item: Input) -> Input:
        """``item``, known to hash to its SHA-1. A stored file no one has hashed since it
        arrived is hashed now (and its SHA-256 kept for the signer), in one pass; a corrupt one
        is dropped: a corrupt copy must never be signed. Reads the file: never on the loop."""
        if not item.kept:
            return item  # its digests were taken as it arrived
        if isinstance(item.content, Path) and not item.content.is_file():
            raise InputGone(GONE)
        if item.checked:
            return item
        try:
            with item.open() as f:
                states = hash_stream(f, ("sha1", "sha256"))
        except FileNotFoundError:
            raise InputGone(GONE) from None
        if states["sha1"].hexdigest() != item.sha1:
            self.drop_input(item.sha1)
            raise InputGone("stored input was corrupt and has been dropped; upload it again")
        return dataclasses.replace(item, digests={"sha256": states["sha256"]}, checked=True)

    def drop_input(self, sha1: str) -> None:
        self._rows_or(None, self._rows.delete_input, sha1)
        self._files.drop_input(sha1)

    def _rows_or(self, default: _T, call: Callable[..., _T], *args: Any) -> _T:
        """``call(*args)`` on the rows, or ``default`` where the database fails (logged): a
        lookup that cannot be answered is a miss, so the content is signed again and only
        publishing its result (which must write) fails, as retryable."""
        try:
            return call(*args)
        except RowStoreError as e:
            log.warning("store database", extra={"fields": {"event": "store_rows_failed", "error": str(e)}})
            return default

    # -- results ------------------------------------------------------------------------------
    def result(self, fmt: str, sha1: str) -> Result | None:
        """The result of (fmt, sha1) if it is there and whole; refreshes its age."""
        key = (fmt, sha1)
        with self._mutex:
            found = self._index.get(key)
            if found is not None:
                self._index.move_to_end(key)
        now = time.time()
        if found is not None:
            if now - found.touched < TOUCH_EVERY:
                return found
            try:  # keep it alive, without a write per GET
                if found.in_row:
                    self._rows_or(None, self._rows.touch, fmt, sha1, now)
                else:
                    self._files.touch_result(fmt, sha1, now)
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
        held = self._rows_or(None, self._rows.read_result, fmt, sha1)
        if held is None:
            return self._files.read_result(fmt, sha1, now)
        digest, body, touched = held
        if now - touched > TOUCH_EVERY:
            self._rows_or(None, self._rows.touch, fmt, sha1, now)
        return Result(body, len(body), digest=digest, in_row=True, touched=now)

    def put_result(
        self, fmt: str, item: Input, output: Blob, also_input: bool, digest: str | None = None
    ) -> Result:
        """Publish ``output`` as the result of signing ``item`` with ``fmt``, with ``item`` if
        it is held in memory (an upload is stored with its result; a row read back is
        refreshed). ``also_input`` (an output that replaces the file): keep the output as an
        input too, so chaining another format needs no upload, and as its own result with
        ``fmt``, so signing it again returns it unchanged. ``digest``: the output's SHA-1, when
        the caller took it already (the output is not read again for it)."""
        now = time.time()
        if isinstance(output.content, bytes):  # a signing worker's: rows, in one commit
            body = output.content
            digest = digest or _sha1(body)
            self._rows.write(fmt, item.sha1, item.filename, item.body, digest, body, also_input, now)
            found = Result(body, len(body), digest=digest, in_row=True, touched=now)
        else:
            if item.body is not None:
                self._rows.write_input(item.sha1, item.filename, item.body, now)
            found = self._files.put_result(fmt, item.sha1, output.content, output.size, now, digest)
            if also_input and found.digest != item.sha1:
                path = self._files.result_path(fmt, item.sha1)
                self._keep_as_input(fmt, found.digest, found.size, item.filename, path)
        with self._mutex:
            self._remember((fmt, item.sha1), found)
        return found

    def _keep_as_input(self, fmt: str, digest: str, size: int, filename: str, path: Path) -> None:
        """A file result (``digest``: its SHA-1, ``size`` bytes), kept as input ``digest`` and
        as its own result with ``fmt`` (same bytes, linked: results are never modified in
        place; not hashed again)."""
        if not self.has_input(digest):
            self._files.put_input(digest, filename, self._files.copy(path))
        if self.result(fmt, digest) is None:
            found = self._files.put_result(fmt, digest, self._files.copy(path), size, time.time(), digest)
            with self._mutex:
                self._remember((fmt, digest), found)

    def _remember(self, key: tuple[str, str], found: Result) -> None:
        """Index a result (under ``_mutex``), so polls for it need no disk access."""
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
        """Delete inputs and results older than ``max_age``, and scratch; returns the count."""
        cutoff = time.time() - max_age
        removed, kept = self._files.delete_older(cutoff)
        if kept:
            log.warning(
                "cleanup kept", extra={"fields": {"event": "cleanup_kept", "kept": kept[:MAX_REPORTED]}}
            )
        removed += self._rows.delete_older(cutoff)
        with self._mutex:
            # The next lookup goes to disk, which knows what is left.
            self._index.clear()
            self._cached_bytes = 0
            stale = [k for k, f in self._failures.items() if f.when < cutoff]
            for k in stale:
                del self._failures[k]
        return removed


class _Files:
    """The files behind :class:`Storage`: big content, and whatever a signing tool wrote."""

    def __init__(self, root: Path, temp_path: Callable[[str], Path]) -> None:
        self.unsigned = root / "unsigned"
        self.signed = root / "signed"
        self.tmp = root / "tmp"
        self.temp_path = temp_path
        self.xattrs = False

    def probe_xattrs(self) -> bool:
        probe = self.tmp / "xattr-probe"
        try:
            open(probe, "wb", opener=private).close()
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
        os.chmod(tmp, 0o600)  # a signing tool's output, or a copy, has the tool's own mode
        os.replace(tmp, final)

    def _write_atomic(self, path: Path, data: bytes) -> None:
        """Write ``data`` to a fresh temp file and rename it to ``path``; no leftover on failure."""
        tmp = self.temp_path("t")
        try:
            with open(tmp, "xb", opener=private) as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

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

    def copy(self, path: Path) -> Path:
        """A new name in ``tmp/`` for ``path``'s bytes: a link, or a copy across devices."""
        tmp = self.temp_path("t")
        try:
            os.link(path, tmp)
        except OSError:
            shutil.copyfile(path, tmp)
        return tmp

    # -- inputs -------------------------------------------------------------------------------
    def has_input(self, sha1: str) -> bool:
        return self._meta(self.unsigned / sha1, "fn") is not None and (self.unsigned / sha1).is_file()

    def read_input(self, sha1: str) -> Input | None:
        path = self.unsigned / sha1
        filename = self._meta(path, "fn")
        if filename is None:
            return None
        try:
            st = path.stat()
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        return Input(path, st.st_size, sha1=sha1, filename=filename, checked=False)

    def put_input(self, sha1: str, filename: str, src: Path) -> Path:
        """Move ``src`` (in ``tmp/``) into place as input ``sha1``; its new path."""
        final = self.unsigned / sha1
        try:
            self._publish(src, final, {"fn": filename})
        except BaseException:
            src.unlink(missing_ok=True)
            raise
        return final

    def drop_input(self, sha1: str) -> None:
        (self.unsigned / sha1).unlink(missing_ok=True)
        (self.unsigned / f"{sha1}.fn").unlink(missing_ok=True)

    # -- results ------------------------------------------------------------------------------
    def result_path(self, fmt: str, sha1: str) -> Path:
        return self.signed / fmt / sha1

    def read_result(self, fmt: str, sha1: str, now: float) -> Result | None:
        """A result file, if it is there and whole; refreshes its age when due."""
        path = self.result_path(fmt, sha1)
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
                self.touch_result(fmt, sha1, now)
        except (OSError, ValueError):
            return None
        return Result(path, st.st_size, digest=digest, touched=now)

    def touch_result(self, fmt: str, sha1: str, now: float) -> None:
        path = self.result_path(fmt, sha1)
        os.utime(path, (now, now))
        if not self.xattrs:
            os.utime(path.with_name(f"{path.name}.sha1"), (now, now))

    def put_result(
        self, fmt: str, sha1: str, output: Path, size: int | None, now: float, digest: str | None = None
    ) -> Result:
        """Publish ``output`` (in ``tmp/``) as the result of (fmt, sha1).

        The metadata (digest and size) goes first, then the result is renamed into place:
        a reader never sees a result without its metadata, and ``read_result`` refuses a file
        whose size does not match, so no fsync is needed on the hot path. A small result is
        read back (it is in the page cache) to be served from memory."""
        final = self.result_path(fmt, sha1)
        try:
            final.parent.mkdir(exist_ok=True, mode=0o700)
            if size is None:
                size = output.stat().st_size
            body = output.read_bytes() if size <= SMALL_FILE else None
            digest = digest or (hash_file(output) if body is None else _sha1(body))
            self._publish(output, final, {"sha1": f"{digest} {size}"})
        except BaseException:
            output.unlink(missing_ok=True)
            raise
        return Result(final if body is None else body, size, digest=digest, touched=now)

    # -- cleanup ------------------------------------------------------------------------------
    def delete_older(self, cutoff: float) -> tuple[int, list[str]]:
        """Delete inputs, results and scratch last changed before ``cutoff``: (how many, what
        could not be removed)."""
        removed = 0
        folders = [self.unsigned, self.tmp]
        folders.extend(p for p in self.signed.iterdir() if p.is_dir())
        kept: list[str] = []
        for folder in folders:
            with contextlib.suppress(OSError):
                for entry in folder.iterdir():
                    with contextlib.suppress(OSError):
                        if entry.lstat().st_mtime < cutoff:
                            left = remove_tree(entry)
                            kept += left
                            removed += not left
        return removed, kept


def make_private(root: Path, scratch: Path) -> int:
    """Tighten the store's modes (an older version, a copy or a restore may have left them
    loose): folders 0700, files 0600; only group and other bits are removed, symlinks are
    left alone, and ``scratch`` (emptied at start-up) is not entered. Iterative: a deep tree
    cannot exhaust the stack. The number of entries changed."""
    changed = 0
    stack = [root]
    while stack:
        folder = stack.pop()
        with contextlib.suppress(OSError):
            changed += _tighten(folder, os.stat(folder), 0o700)
            if folder == scratch:
                continue
            with os.scandir(folder) as entries:
                for entry in entries:
                    with contextlib.suppress(OSError):
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(Path(entry.path))
                        elif entry.is_file(follow_symlinks=False):
                            changed += _tighten(Path(entry.path), entry.stat(follow_symlinks=False), 0o600)
    return changed


def _tighten(path: Path, st: os.stat_result, allowed: int) -> int:
    mode = stat.S_IMODE(st.st_mode)
    if not mode & ~allowed:
        return 0
    os.chmod(path, mode & allowed)
    return 1


def _sha1(data: bytes) -> str:
    return hashlib.sha1(data, usedforsecurity=False).hexdigest()
