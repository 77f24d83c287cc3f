"""The rows behind the content store (:mod:`.storage`): small inputs and results in one
SQLite database (WAL), so a small job creates no file.

Only :class:`.storage.Storage` uses this module; it decides what is kept here (content held in
memory) and wraps what is read back. Creating files is most of the cost of a small job on a
journaling file system; a row in a WAL-mode database costs an append. Commits are atomic, so a
crash never exposes half a result; ``synchronous=NORMAL`` may lose the last commits on power
loss, never consistency (a lost result is simply signed again).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("sealbox.storage")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS inputs (
    sha1 TEXT PRIMARY KEY, filename TEXT NOT NULL, data BLOB NOT NULL, touched REAL NOT NULL);
CREATE TABLE IF NOT EXISTS results (
    fmt TEXT NOT NULL, sha1 TEXT NOT NULL, digest TEXT NOT NULL, data BLOB NOT NULL,
    touched REAL NOT NULL, PRIMARY KEY (fmt, sha1));
"""


class RowStoreError(OSError):
    """The database could not be read or written (a full disk: ``errno.ENOSPC``; else
    ``errno.EIO``). An :class:`OSError`, as a file store's failure would be: a job that cannot
    publish its result fails as retryable, never as an internal error."""


class RowStore:
    """Inputs (sha1 -> filename, bytes) and results ((fmt, sha1) -> digest, bytes), with their
    last use. Every method raises :class:`RowStoreError` where SQLite fails.

    A database SQLite finds damaged, or not a database at all (a disk fault, a copy taken of
    a live file), is moved aside with its ``-wal`` and ``-shm`` as soon as that shows, and a
    new one is made at the next use: its rows are a cache of signatures (one lost is signed
    again when asked), so neither a start nor every later small job fails for it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()  # one connection, shared by the loop and job threads

    def _conn(self) -> sqlite3.Connection:
        # Opened on first use, so a connection is never carried across the workers' fork.
        if self._db is None:
            # Created 0600 first: SQLite gives its -wal and -shm files the database's mode.
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.executescript(_SCHEMA)
            except BaseException:
                db.close()
                raise
            self._db = db
        return self._db

    @contextlib.contextmanager
    def _using(self) -> Iterator[sqlite3.Connection]:
        """The connection, under the lock; SQLite's errors as :class:`RowStoreError`."""
        with self._lock:
            try:
                yield self._conn()
            except sqlite3.Error as e:
                name = getattr(e, "sqlite_errorname", "")
                if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
                    self._move_aside(str(e))
                why = f"{self.path.name}: {e}"
                raise RowStoreError(errno.ENOSPC if name == "SQLITE_FULL" else errno.EIO, why) from None

    def _move_aside(self, why: str) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None
        aside = f"{self.path.name}.damaged-{time.time_ns()}"
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.replace(f"{self.path}{suffix}", self.path.with_name(aside + suffix))
        fields = {"event": "store_rows_damaged", "path": str(self.path), "error": why, "moved_to": aside}
        log.warning("store database damaged: moved aside", extra={"fields": fields})

    def check(self) -> None:
        """Open the database and close it again, at start-up (the signing workers fork later:
        no connection may cross the fork): a leftover that is not a database goes now."""
        with contextlib.suppress(RowStoreError), self._using():
            pass  # (a failure that is not damage, no room say, is for the first use to report)
        self.close()

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def write(
        self,
        fmt: str,
        sha1: str,
        filename: str,
        data: bytes | None,
        digest: str,
        output: bytes,
        also_input: bool,
        now: float,
    ) -> None:
        """One commit for a signed job: its input (``data``; None: kept as a file), its result,
        and when ``also_input`` the output as an input that signs to itself with ``fmt``."""
        with self._using() as db:
            db.execute("BEGIN")
            try:
                if data is not None:
                    db.execute(
                        "INSERT OR REPLACE INTO inputs VALUES (?, ?, ?, ?)", (sha1, filename, data, now)
                    )
                db.execute(
                    "INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?)", (fmt, sha1, digest, output, now)
                )
                if also_input and digest != sha1:
                    db.execute(
                        "INSERT OR IGNORE INTO inputs VALUES (?, ?, ?, ?)", (digest, filename, output, now)
                    )
                    db.execute(
                        "INSERT OR IGNORE INTO results VALUES (?, ?, ?, ?, ?)",
                        (fmt, digest, digest, output, now),
                    )
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:  # (SQLite ends it itself when a commit fails for want of room)
                    db.execute("ROLLBACK")
                raise

    def write_input(self, sha1: str, filename: str, data: bytes, now: float) -> None:
        with self._using() as db:
            db.execute("INSERT OR REPLACE INTO inputs VALUES (?, ?, ?, ?)", (sha1, filename, data, now))

    def read_result(self, fmt: str, sha1: str) -> tuple[str, bytes, float] | None:
        """(digest, bytes, last use) of a result, if held."""
        with self._using() as db:
            row = db.execute(
                "SELECT digest, data, touched FROM results WHERE fmt = ? AND sha1 = ?", (fmt, sha1)
            ).fetchone()
        return (row[0], bytes(row[1]), row[2]) if row else None

    def has_input(self, sha1: str) -> bool:
        with self._using() as db:
            return db.execute("SELECT 1 FROM inputs WHERE sha1 = ?", (sha1,)).fetchone() is not None

    def read_input(self, sha1: str) -> tuple[str, bytes] | None:
        """(filename, bytes) of a held input; a row that does not hash to its key is deleted."""
        with self._using() as db:
            row = db.execute("SELECT filename, data FROM inputs WHERE sha1 = ?", (sha1,)).fetchone()
        if row is None:
            return None
        data = bytes(row[1])
        if hashlib.sha1(data, usedforsecurity=False).hexdigest() != sha1:
            self.delete_input(sha1)  # a corrupt copy must never be signed
            return None
        return str(row[0]), data

    def touch(self, fmt: str, sha1: str, now: float) -> None:
        """Mark a result, and its input, as used now."""
        with self._using() as db:
            db.execute("UPDATE results SET touched = ? WHERE fmt = ? AND sha1 = ?", (now, fmt, sha1))
            db.execute("UPDATE inputs SET touched = ? WHERE sha1 = ?", (now, sha1))

    def delete_input(self, sha1: str) -> None:
        with self._using() as db:
            db.execute("DELETE FROM inputs WHERE sha1 = ?", (sha1,))

    def delete_older(self, cutoff: float) -> int:
        """Delete rows last used before ``cutoff``; returns how many."""
        with self._using() as db:
            removed = db.execute("DELETE FROM inputs WHERE touched < ?", (cutoff,)).rowcount
            removed += db.execute("DELETE FROM results WHERE touched < ?", (cutoff,)).rowcount
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return int(removed)
