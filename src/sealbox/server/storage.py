"""Content-addressed storage on disk.

    unsigned/<sha1>            an input (uploaded, or a previous output kept for chaining)
    unsigned/<sha1>.fn         its original filename
    signed/<fmt>/<sha1>        the result of signing input <sha1> with <fmt>
    signed/<fmt>/<sha1>.sha1   the SHA-1 of that result (written first)
    failed/<fmt>/<sha1>        why that job failed ("permanent" or "transient" + reason)
    tmp/                       uploads and job scratch, renamed into place atomically

Every file appears by ``os.replace`` from ``tmp/``, so a crash never exposes half a file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..hashing import hash_file


@dataclass(frozen=True)
class Failure:
    permanent: bool
    reason: str
    when: float


class Storage:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.unsigned = root / "unsigned"
        self.signed = root / "signed"
        self.failed = root / "failed"
        self.tmp = root / "tmp"
        for d in (self.unsigned, self.signed, self.failed, self.tmp):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Leftovers of a crash are never served: start from an empty scratch area. Remembered
        # failures go too: they may depend on a config that has changed since.
        shutil.rmtree(self.failed, ignore_errors=True)
        self.failed.mkdir(mode=0o700)
        for leftover in self.tmp.iterdir():
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)

    # -- scratch ------------------------------------------------------------------------------
    def temp_file(self) -> tuple[int, Path]:
        fd, name = tempfile.mkstemp(dir=self.tmp, prefix="up-")
        return fd, Path(name)

    def temp_dir(self) -> Path:
        return Path(tempfile.mkdtemp(dir=self.tmp, prefix="job-"))

    def _write_atomic(self, path: Path, data: bytes) -> None:
        fd, tmp = self.temp_file()
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    # -- inputs -------------------------------------------------------------------------------
    def input_path(self, sha1: str) -> Path:
        return self.unsigned / sha1

    def has_input(self, sha1: str) -> bool:
        return (self.unsigned / sha1).is_file() and (self.unsigned / f"{sha1}.fn").is_file()

    def input_filename(self, sha1: str) -> str | None:
        try:
            return (self.unsigned / f"{sha1}.fn").read_text("utf-8")
        except OSError:
            return None

    def add_input(self, sha1: str, filename: str, src: Path) -> None:
        """Move a verified upload into place (``src`` must be in ``tmp/``).

        The name is written first and the data renamed in last: ``has_input`` needs both."""
        (self.unsigned / f"{sha1}.fn").write_bytes(filename.encode("utf-8"))
        os.replace(src, self.unsigned / sha1)

    def link_input(self, sha1: str, filename: str, src: Path) -> None:
        """Keep a copy of ``src`` as input ``sha1`` (used to remember outputs for chaining)."""
        if self.has_input(sha1):
            return
        fd, tmp = self.temp_file()
        os.close(fd)
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        self.add_input(sha1, filename, tmp)

    def drop_input(self, sha1: str) -> None:
        (self.unsigned / sha1).unlink(missing_ok=True)
        (self.unsigned / f"{sha1}.fn").unlink(missing_ok=True)

    # -- results ------------------------------------------------------------------------------
    def result_path(self, fmt: str, sha1: str) -> Path:
        return self.signed / fmt / sha1

    def result(self, fmt: str, sha1: str) -> tuple[Path, str] | None:
        """The result file and its SHA-1, if both are there and whole; refreshes their age."""
        path = self.signed / fmt / sha1
        meta = self.signed / fmt / f"{sha1}.sha1"
        try:
            digest, _, size = meta.read_text("ascii").strip().partition(" ")
            st = path.stat()
            if st.st_size != int(size):
                # Torn by a power loss (results are renamed into place but not fsynced):
                # drop it so the job runs again instead of serving a broken file.
                path.unlink(missing_ok=True)
                return None
            now = time.time()
            if now - st.st_mtime > 60:  # keep it alive, without a write per GET
                os.utime(path, (now, now))
                os.utime(meta, (now, now))
        except (OSError, ValueError):
            return None
        return path, digest

    def add_result(self, fmt: str, sha1: str, output: Path) -> str:
        """Publish ``output`` (in ``tmp/``) as the result; returns its SHA-1.

        The metadata (digest and size) goes first, then the result is renamed into place:
        a reader never sees a result without its metadata, and ``result`` refuses a file
        whose size does not match, so no fsync is needed on the hot path.
        """
        folder = self.signed / fmt
        folder.mkdir(exist_ok=True, mode=0o700)
        digest = hash_file(output)
        size = output.stat().st_size
        self._write_atomic(folder / f"{sha1}.sha1", f"{digest} {size}".encode())
        os.replace(output, folder / sha1)
        return digest

    # -- failures -----------------------------------------------------------------------------
    def failure(self, fmt: str, sha1: str, transient_ttl: float) -> Failure | None:
        path = self.failed / fmt / sha1
        try:
            kind, _, reason = path.read_text("utf-8").partition("\n")
            when = path.stat().st_mtime
        except OSError:
            return None
        permanent = kind == "permanent"
        if not permanent and time.time() - when > transient_ttl:
            path.unlink(missing_ok=True)
            return None
        return Failure(permanent, reason, when)

    def add_failure(self, fmt: str, sha1: str, permanent: bool, reason: str) -> None:
        folder = self.failed / fmt
        folder.mkdir(exist_ok=True, mode=0o700)
        self._write_atomic(folder / sha1, f"{'permanent' if permanent else 'transient'}\n{reason}".encode())

    def clear_failure(self, fmt: str, sha1: str) -> None:
        (self.failed / fmt / sha1).unlink(missing_ok=True)

    # -- cleanup ------------------------------------------------------------------------------
    def cleanup(self, max_age: float) -> int:
        """Delete inputs, results and failures older than ``max_age``; returns the count."""
        cutoff = time.time() - max_age
        removed = 0
        folders = [self.unsigned, self.tmp]
        for base in (self.signed, self.failed):
            folders.extend(p for p in base.iterdir() if p.is_dir())
        for folder in folders:
            for entry in folder.iterdir():
                with contextlib.suppress(OSError):
                    if entry.lstat().st_mtime < cutoff:
                        if entry.is_dir():
                            shutil.rmtree(entry, ignore_errors=True)
                        else:
                            entry.unlink()
                        removed += 1
        return removed
