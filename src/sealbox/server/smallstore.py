"""The rows behind the content store (:mod:`.storage`): small inputs and results in one
SQLite database (WAL), so a small job creates no file.

Only :class:`.storage.Storage` uses this module; it decides what is kept here (content held in
memory) and wraps what is read back. Creating files is most of the cost of a small job on a
journaling file system; a row in a WAL-mode database costs an append. Commits are atomic, so a
crash never exposes half a result; ``synchronous=NORMAL`` may lose the last commits on power
loss, never consistency (a lost result is simply signed again).
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS inputs (
    sha1 TEXT PRIMARY KEY, filename TEXT NOT NULL, data BLOB NOT NULL, touched REAL NOT NULL);
CREATE TABLE IF NOT EXISTS results (
    fmt TEXT NOT NULL, sha1 TEXT NOT NULL, digest TEXT NOT NULL, data BLOB NOT NULL,
    touched REAL NOT NULL, PRIMARY KEY (fmt, sha1));
"""


class RowStore:
    """Inputs (sha1 -> filename, bytes) and results ((fmt, sha1) -> digest, bytes), with their
    last use."""

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
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            self._db = db
        return self._db

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
        with self._lock:
            db = self._conn()
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
                db.execute("ROLLBACK")
                raise

    def write_input(self, sha1: str, filename: str, data: bytes, now: float) -> None:
        with self._lock:
            self._conn().execute(
                "INSERT OR REPLACE INTO inputs VALUES (?, ?, ?, ?)", (sha1, filename, data, now)
            )

    def read_result(self, fmt: str, sha1: str) -> tuple[str, bytes, float] | None:
        """(digest, bytes, last use) of a result, if held."""
        with self._lock:
            row = (
                self._conn()
                .execute("SELECT digest, data, touched FROM results WHERE fmt = ? AND sha1 = ?", (fmt, sha1))
                .fetchone()
            )
        return (row[0], bytes(row[1]), row[2]) if row else None

    def has_input(self, sha1: str) -> bool:
        with self._lock:
            return self._conn().execute("SELECT 1 FROM inputs WHERE sha1 = ?", (sha1,)).fetchone() is not None

    def read_input(self, sha1: str) -> tuple[str, bytes] | None:
        """(filename, bytes) of a held input; a row that does not hash to its key is deleted."""
        with self._lock:
            row = self._conn().execute("SELECT filename, data FROM inputs WHERE sha1 = ?", (sha1,)).fetchone()
        if row is None:
            return None
        data = bytes(row[1])
        if hashlib.sha1(data, usedforsecurity=False).hexdigest() != sha1:
            self.delete_input(sha1)  # a corrupt copy must never be signed
            return None
        return str(row[0]), data

    def touch(self, fmt: str, sha1: str, now: float) -> None:
        """Mark a result, and its input, as used now."""
        with self._lock:
            db = self._conn()
            db.execute("UPDATE results SET touched = ? WHERE fmt = ? AND sha1 = ?", (now, fmt, sha1))
            db.execute("UPDATE inputs SET touched = ? WHERE sha1 = ?", (now, sha1))

    def delete_input(self, sha1: str) -> None:
        with self._lock:
            self._conn().execute("DELETE FROM inputs WHERE sha1 = ?", (sha1,))

    def delete_older(self, cutoff: float) -> int:
        """Delete rows last used before ``cutoff``; returns how many."""
        with self._lock:
            db = self._conn()
            removed = db.execute("DELETE FROM inputs WHERE touched < ?", (cutoff,)).rowcount
            removed += db.execute("DELETE FROM results WHERE touched < ?", (cutoff,)).rowcount
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return int(removed)
