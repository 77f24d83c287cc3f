"""Removing a tree that may hold anything: every cleanup in sealbox goes through here.

:func:`remove_tree` never raises and never recurses. It works on directory file
descriptors and names relative to them (``unlinkat``/``rmdir`` with ``dir_fd``), so a
tree deeper than the recursion limit or with paths far beyond ``PATH_MAX`` (a hostile
archive's leftovers) goes as easily as a flat one, and it holds one descriptor at a time
however deep the tree is. Entries it cannot remove (a folder without permissions it
cannot fix, an I/O error) are skipped and returned, so a caller logs them and goes on.
"""

from __future__ import annotations

import fcntl
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import BinaryIO

from .errors import ConfigError

__all__ = ["read_bounded", "read_small", "read_small_text", "remove_tree", "short_name", "utf8_text"]

#: how many entries :func:`remove_tree` lists when some could not be removed
MAX_REPORTED = 20
_SHOWN = 200  # characters of a deep path shown in a report
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


@dataclass
class _Level:
    """A directory being emptied: its name in its parent, identity, and subfolders to visit."""

    name: str
    dev: int
    ino: int
    subdirs: list[str] | None = None
    kept: bool = False  # something below it could not be removed


@dataclass
class _Report:
    top: str
    left: list[str] = field(default_factory=list)
    more: int = 0

    def add(self, levels: list[_Level], name: str | None, error: OSError | str) -> None:
        if len(self.left) >= MAX_REPORTED:
            self.more += 1
            return
        # levels[0] is the top itself: without levels, the entry is the top
        parts = [lv.name for lv in levels[1:]] + ([name] if name is not None and levels else [])
        rel = "/".join(parts)
        if len(rel) > _SHOWN:  # a hostile tree can be thousands of levels deep
            rel = f"{rel[: _SHOWN // 2]}...{rel[-_SHOWN // 2 :]} ({len(parts)} levels deep)"
        why = error if isinstance(error, str) else (error.strerror or type(error).__name__)
        self.left.append(f"{os.path.join(self.top, rel) if rel else self.top}: {why}")

    def result(self) -> list[str]:
        return self.left + ([f"... and {self.more} more"] if self.more else [])


def remove_tree(path: Path | str) -> list[str]:
    """Remove ``path`` (a file, a link or a whole folder) and everything under it.

    Never raises, never follows a symbolic link, never recurses. Folders it may not enter
    or change are made accessible first (they are ours). Returns what was left, one line
    per entry (``path: reason``, at most :data:`MAX_REPORTED` of them): empty when all is
    gone, including when ``path`` did not exist."""
    top = os.fspath(path)
    report = _Report(top)
    parent, name = os.path.split(top.rstrip("/") or "/")
    try:
        parent_fd = os.open(parent or ".", _DIR_FLAGS & ~os.O_NOFOLLOW)
    except FileNotFoundError:
        return []
    except OSError as e:
        report.add([], None, e)
        return report.result()
    try:
        _remove_at(parent_fd, name, report)
    except Exception as e:  # the promise is: never raises
        report.add([], None, f"{type(e).__name__}: {e}")
    finally:
        os.close(parent_fd)
    return report.result()


def _remove_at(parent_fd: int, name: str, report: _Report) -> None:
    try:
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    except OSError as e:
        report.add([], None, e)
        return
    if not stat.S_ISDIR(st.st_mode):
        _in_writable(parent_fd, False, lambda: os.unlink(name, dir_fd=parent_fd), [], name, report)
        return
    opened = _open_dir(parent_fd, name)
    if isinstance(opened, OSError):
        report.add([], None, opened)
        return
    fd: int | None = opened
    levels = [_Level(name, st.st_dev, st.st_ino)]
    try:
        # Depth first with one open descriptor: down into a subfolder by name, back up by
        # "..", which is always the real parent (checked against the inode we came from).
        while levels:
            assert fd is not None
            level = levels[-1]
            if level.subdirs is None:
                level.subdirs = _clear_files(fd, levels, report)
            if level.subdirs:
                sub = level.subdirs.pop()
                sub_fd = _open_dir(fd, sub)
                if isinstance(sub_fd, OSError):
                    if not isinstance(sub_fd, FileNotFoundError):
                        level.kept = True
                        report.add(levels, sub, sub_fd)
                    continue
                os.close(fd)
                fd = sub_fd
                sub_st = os.fstat(fd)
                levels.append(_Level(sub, sub_st.st_dev, sub_st.st_ino))
                continue
            done = levels.pop()
            below = parent_fd
            if levels:
                up = os.open("..", _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = below = up
                up_st = os.fstat(up)
                if (up_st.st_dev, up_st.st_ino) != (levels[-1].dev, levels[-1].ino):
                    report.add(levels, done.name, "the tree was moved while it was being removed")
                    return
            if not done.kept:
                rmdir = partial(os.rmdir, done.name, dir_fd=below)
                done.kept = not _in_writable(below, bool(levels), rmdir, levels, done.name, report)
            if done.kept and levels:
                levels[-1].kept = True
    finally:
        if fd is not None and fd != parent_fd:
            os.close(fd)


def _open_dir(dir_fd: int, name: str) -> int | OSError:
    """A descriptor for the folder ``name`` in ``dir_fd``; one we may not read is made
    readable first (it is ours: a hostile archive or a tool may have left it mode 000)."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except PermissionError as e:
        try:
            os.chmod(name, 0o700, dir_fd=dir_fd)
            return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        except OSError:
            return e
    except OSError as e:
        return e


def _clear_files(fd: int, levels: list[_Level], report: _Report) -> list[str]:
    """Remove everything but folders in ``fd``; returns the names of its subfolders."""
    subdirs: list[str] = []
    try:
        with os.scandir(fd) as entries:
            names = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
    except OSError as e:
        levels[-1].kept = True
        report.add(levels, None, e)
        return subdirs
    for name, is_dir in names:
        if is_dir:
            subdirs.append(name)
        elif not _in_writable(fd, True, partial(os.unlink, name, dir_fd=fd), levels, name, report):
            levels[-1].kept = True
    return subdirs


def _in_writable(
    dir_fd: int, ours: bool, op: Callable[[], None], levels: list[_Level], name: str, report: _Report
) -> bool:
    """Run ``op`` (an unlink or rmdir in ``dir_fd``); True once ``name`` is gone. Removing
    needs write permission on the folder, which a tool may have dropped: if the folder is
    ``ours`` (inside the tree), it gets it back once."""
    try:
        op()
        return True
    except FileNotFoundError:
        return True
    except PermissionError as e:
        if ours:
            try:
                os.chmod(dir_fd, 0o700)
                op()
                return True
            except FileNotFoundError:
                return True
            except OSError:
                pass
        report.add(levels, name, e)
    except OSError as e:
        report.add(levels, name, e)
    return False


def private(path: str, flags: int) -> int:
    """An ``open(..., opener=private)`` that creates files 0600, whatever the umask says."""
    return os.open(path, flags, 0o600)


def take_lock(path: Path, in_use: str) -> BinaryIO:
    """Hold an exclusive lock on ``path`` (created 0600) for the life of the process; a second
    holder gets ``ConfigError(in_use)`` at once."""
    f = open(path, "ab", opener=private)  # noqa: SIM115 - held for the life of the server
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise ConfigError(in_use) from None
    return f


#: the most a small text file given to a command (a token, a public key, credentials) may hold
SMALL_TEXT = 64 * 1024


def read_small(path: Path, limit: int = SMALL_TEXT) -> bytes:
    """The bytes of a small file (a key, a secret, a token): OSError if it cannot be read,
    ConfigError naming it if it holds more than ``limit`` bytes (a device or a big file is not
    read whole: /dev/zero given for a key must not take the memory)."""
    with path.open("rb") as f:
        return read_bounded(f, str(path), limit)


def read_bounded(f: BinaryIO, what: str, limit: int = SMALL_TEXT) -> bytes:
    """What ``f`` (named ``what`` in errors) holds, if that is at most ``limit`` bytes (it is
    read no further); ConfigError otherwise."""
    data = f.read(limit + 1)
    if len(data) > limit:
        raise ConfigError(f"{what} holds more than {limit} bytes: not the small file expected")
    return data


def read_small_text(path: Path, limit: int = SMALL_TEXT) -> str:
    """The text of a small file a command is given (a token, a public key, credentials), read
    as UTF-8. Raises OSError if it cannot be read, and ConfigError naming it if it is not such
    a file: not UTF-8, or over ``limit`` bytes (a device or a big file is not read whole)."""
    return utf8_text(read_small(path, limit), str(path))


def utf8_text(data: bytes, what: str) -> str:
    """``data`` (from ``what``) as UTF-8 text; ConfigError saying where it is not."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} is not UTF-8 text (byte {e.start})") from None


def short_name(name: str, most: int) -> str:
    """``name`` cut to at most ``most`` bytes as the file system counts them (a file name may
    hold 255 bytes, not characters: a cut inside a character is still those bytes)."""
    return os.fsdecode(os.fsencode(name)[:most])
