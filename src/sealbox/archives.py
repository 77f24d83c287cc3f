"""Safe extraction, deterministic re-packing and in-place rewriting of tar and zip archives.

Every format that opens an archive (and the task runner) goes through here, under one set of
rules and limits. Extraction never trusts the archive:

* member names must be relative and clean: absolute paths, ``..`` components, NUL bytes
  and (in zips) backslashes are refused; ``./`` prefixes and ``.`` components are dropped;
* member paths are bounded: at most :data:`MAX_DEPTH` components, :data:`MAX_PATH_BYTES`
  bytes in all and 255 per component, so an extracted tree never nests deeper than the
  tools (and Python's recursion) can walk, and its paths stay far below ``PATH_MAX``;
* only regular files and directories are extracted. Hard links, device nodes, fifos and
  sockets are always refused. Symbolic links are refused too, unless the caller passes
  ``allow_symlinks=True`` (macOS bundles need them for frameworks); then a link must be
  relative, its target may only *start* with ``..`` components (``../../A/b``, never
  ``A/../b``), and the target must stay inside the extraction folder. Because no member
  may be written through a link (parents are checked with ``lstat`` and files are opened
  with ``O_NOFOLLOW | O_EXCL``) and ``..`` is only ever applied to real directories,
  no chain of such links can reach outside the folder;
* duplicate members are refused (a later member could otherwise replace a link);
* the member count and the total uncompressed size are bounded (defaults
  :data:`DEFAULT_MAX_MEMBERS`, :data:`DEFAULT_MAX_TOTAL`; each format may set its own), and
  past :data:`BOMB_MIN_SIZE` an archive may not unpack to more than :data:`MAX_RATIO` times
  its own size (a decompression bomb). The size is counted on
  the bytes actually decompressed, never taken from headers, and for tarballs the
  decompressed stream itself is bounded too, so oversized headers cannot exhaust memory;
* modes are reduced to ``0o755``/``0o644`` style permissions (no set-id, sticky or
  world-writable bits).

Zips signed in place (JARs, APKs) are not extracted: :func:`zip_members` checks one under the
same rules (names stricter still, as they are copied verbatim; sizes from the headers, which
:func:`rewrite_zip` then holds every member to while it copies the compressed bytes unchanged).

Every refusal raises :class:`~sealbox.errors.FormatRejected` with a one-line reason that
names the member (ASCII-escaped and shortened: reasons travel in response headers). Bytes
that do not parse as the archive they claim to be are refused the same way, whatever the
parser raised for them. Write errors that may not repeat (disk full) raise
:class:`~sealbox.errors.SigningFailed`. The caller owns ``dest`` and removes it (with
:func:`sealbox.fsutil.remove_tree`).
"""

from __future__ import annotations

import bz2
import contextlib
import datetime as dt
import errno
import gzip
import io
import itertools
import lzma
import os
import re
import stat
import struct
import tarfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, BinaryIO, Literal

from isal import igzip, isal_zlib

from .errors import FormatRejected, SigningFailed

__all__ = [
    "BOMB_MIN_SIZE",
    "DEFAULT_MAX_MEMBERS",
    "DEFAULT_MAX_TOTAL",
    "MAX_DEPTH",
    "MAX_EDITED",
    "MAX_PATH_BYTES",
    "MAX_RATIO",
    "PARSE_ERRORS",
    "Compression",
    "Editor",
    "ZipMember",
    "detect_tar_compression",
    "is_zip",
    "repack_tar",
    "repack_zip",
    "rewrite_zip",
    "safe_extract_tar",
    "safe_extract_zip",
    "zip_members",
]

#: default bound on the total uncompressed size of one archive (4 GiB)
DEFAULT_MAX_TOTAL = 4 * 1024**3
#: past BOMB_MIN_SIZE, an archive unpacking to more than MAX_RATIO times its size is a bomb
#: (code and resources compress a few times, not hundreds)
MAX_RATIO = 200
BOMB_MIN_SIZE = 64 * 1024**2
#: default bound on the number of members of one archive
DEFAULT_MAX_MEMBERS = 50_000
#: bound on the components of a member's path (deep bundles nest a few dozen)
MAX_DEPTH = 128
#: bound on a member's path in UTF-8 bytes (macOS's own PATH_MAX; Linux allows 4096)
MAX_PATH_BYTES = 1024
MAX_NAME_BYTES = 255
_SHOWN = 80  # characters of a member name quoted in a reason
_MAX_MTIME = 1 << 34  # year 2514: later times are not worth keeping

Compression = Literal["gz", "bz2", "xz", ""]
#: the level of the gzip a repacked tarball gets (ISA-L's levels: 0 to 3)
GZIP_LEVEL = isal_zlib.ISAL_DEFAULT_COMPRESSION

_CHUNK = 1 << 20
_HEADER_ALLOWANCE = 8192  # decompressed header bytes allowed per member (tar headers, pax records)
_MAGIC: tuple[tuple[bytes, Compression], ...] = (
    (b"\x1f\x8b", "gz"),
    (b"BZh", "bz2"),
    (b"\xfd7zXZ\x00", "xz"),
)
_FILE_MODE_MASK = 0o755


class _Oversized(Exception):
    """The decompressed stream passed its bound."""


# -- detection -------------------------------------------------------------------------


def detect_tar_compression(path: Path) -> Compression | None:
    """The compression of a tarball from its magic bytes: ``gz``, ``bz2``, ``xz``, ``""``
    for an uncompressed tar (``ustar`` magic), or None when it is none of these.

    A compressed file is only recognised by its compression magic; whether a tar is inside
    shows when it is extracted."""
    try:
        with path.open("rb") as f:
            head = f.read(512)
    except OSError as e:
        raise SigningFailed(f"cannot read {path.name}: {e.strerror}") from None
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    if len(head) == 512 and head[257:262] == b"ustar":
        return ""
    return None


def is_zip(path: Path) -> bool:
    """True if ``path`` starts like a zip archive (local file header or empty archive)."""
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except OSError as e:
        raise SigningFailed(f"cannot read {path.name}: {e.strerror}") from None
    return head in (b"PK\x03\x04", b"PK\x05\x06")


# -- member names and links --------------------------------------------------------------


def shown(name: str | PurePosixPath) -> str:
    """``name`` quoted for a one-line reason: ASCII only (control and non-ASCII characters
    escaped), at most :data:`_SHOWN` characters of it, with the full length when cut."""
    text = str(name)
    if len(text) <= _SHOWN:
        return ascii(text)
    return f"{text[:_SHOWN]!a}... ({len(text)} characters)"


def _clean_name(raw: str, what: str) -> PurePosixPath | None:
    """The member's relative path, None for the archive root itself (``.`` or ``./``)."""
    if not raw or "\x00" in raw:
        raise FormatRejected(f"{what} has an empty or NUL-containing name")
    if raw.startswith("/"):
        raise FormatRejected(f"{what} {shown(raw)}: absolute paths are not allowed")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise FormatRejected(f"{what} {shown(raw)}: '..' in member names is not allowed")
    if not parts:
        return None
    _check_path(parts, raw, what)
    return PurePosixPath(*parts)


def _check_path(parts: list[str], raw: str, what: str) -> None:
    """Bound nesting and length before anything is created (depth first: it names the attack)."""
    if len(parts) > MAX_DEPTH:
        raise FormatRejected(f"{what} {shown(raw)} is nested {len(parts)} levels deep (at most {MAX_DEPTH})")
    size = len(os.fsencode("/".join(parts)))
    if size > MAX_PATH_BYTES:
        raise FormatRejected(f"{what} {shown(raw)}: path is {size} bytes long (at most {MAX_PATH_BYTES})")
    if size > MAX_NAME_BYTES and any(len(os.fsencode(p)) > MAX_NAME_BYTES for p in parts):
        raise FormatRejected(f"{what} {shown(raw)}: a name in its path is over {MAX_NAME_BYTES} bytes")


def _check_symlink(rel: PurePosixPath, target: str, what: str) -> None:
    name = shown(rel)
    if not target or "\x00" in target:
        raise FormatRejected(f"{what} {name}: empty symbolic link target")
    if len(os.fsencode(target)) > MAX_PATH_BYTES:
        raise FormatRejected(f"{what} {name}: symbolic link target over {MAX_PATH_BYTES} bytes")
    if target.startswith("/"):
        raise FormatRejected(f"{what} {name}: symbolic link to an absolute path {shown(target)}")
    parts = [p for p in target.split("/") if p not in ("", ".")]
    ups = 0
    for i, p in enumerate(parts):
        if p != "..":
            if ".." in parts[i:]:
                raise FormatRejected(
                    f"{what} {name}: symbolic link target {shown(target)} has '..' after a name"
                )
            break
        ups += 1
    if ups > len(rel.parts) - 1:
        raise FormatRejected(f"{what} {name}: symbolic link {shown(target)} points outside the archive")


class _Writer:
    """Creates members under ``dest`` without ever following a link and counts bytes."""

    def __init__(self, dest: Path, max_total: int, max_members: int, kind: str, packed_size: int) -> None:
        self.dest = dest
        self.max_total = max_total
        # Past BOMB_MIN_SIZE, unpacking to more than MAX_RATIO times the archive is a bomb.
        self.ratio_limit = max(BOMB_MIN_SIZE, MAX_RATIO * packed_size)
        self.max_members = max_members
        self.kind = kind
        self.total = 0
        self.names: list[str] = []
        self._seen: set[PurePosixPath] = set()
        self._dirs: list[tuple[Path, int, float | None]] = []
        # Folders known to be real: nothing replaces a member once made (links and files are
        # created exclusively, folders never removed), so each is checked once, not per member.
        self._real: set[PurePosixPath] = {PurePosixPath()}
        dest.mkdir(parents=True, exist_ok=True)

    def _count_member(self, rel: PurePosixPath, is_dir: bool) -> None:
        if rel in self._seen:
            if is_dir and (self.dest / rel).is_dir() and not (self.dest / rel).is_symlink():
                return
            raise FormatRejected(f"{self.kind} member {shown(rel)} appears twice")
        self._seen.add(rel)
        self.names.append(str(rel))
        if len(self.names) > self.max_members:
            raise FormatRejected(f"{self.kind} has more than {self.max_members} members")

    def _parent(self, rel: PurePosixPath) -> Path:
        """Make (or check) the real directories leading to ``rel``; never through a link."""
        if rel.parent in self._real:
            return self.dest / rel.parent
        current, sofar = self.dest, PurePosixPath()
        for part in rel.parts[:-1]:
            current, sofar = current / part, sofar / part
            if sofar in self._real:
                continue
            try:
                st = os.lstat(current)
            except FileNotFoundError:
                os.mkdir(current, 0o755)
            else:
                if not stat.S_ISDIR(st.st_mode):
                    kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "a file"
                    raise FormatRejected(f"{self.kind} member {shown(rel)} lies under {kind}")
            self._real.add(sofar)
        return current

    def directory(self, rel: PurePosixPath, mode: int, mtime: float | None) -> None:
        self._count_member(rel, True)
        parent = self._parent(rel)
        path = parent / rel.name
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            os.mkdir(path, 0o755)
        else:
            if not stat.S_ISDIR(st.st_mode):
                raise FormatRejected(f"{self.kind} directory {shown(rel)} clashes with another member")
        self._real.add(rel)
        self._dirs.append((path, (mode & _FILE_MODE_MASK) | 0o700, _mtime(mtime)))

    def file(self, rel: PurePosixPath, src: IO[bytes], mode: int, mtime: float | None) -> None:
        self._count_member(rel, False)
        path = self._parent(rel) / rel.name
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(path, flags, 0o600)
        except FileExistsError:
            raise FormatRejected(f"{self.kind} member {shown(rel)} clashes with another member") from None
        with os.fdopen(fd, "wb") as out:
            while chunk := src.read(_CHUNK):
                self.total += len(chunk)
                if self.total > self.max_total:
                    raise FormatRejected(
                        f"{self.kind} unpacks to more than {self.max_total} bytes (at member {shown(rel)})"
                    )
                if self.total > self.ratio_limit:
                    raise FormatRejected(
                        f"{self.kind} unpacks to over {MAX_RATIO} times its size (at member {shown(rel)}): "
                        "a decompression bomb"
                    )
                out.write(chunk)
            out.flush()  # before the time is set; by descriptor: no path lookups per member
            os.fchmod(fd, (mode & _FILE_MODE_MASK) | 0o600)
            if (when := _mtime(mtime)) is not None:
                os.utime(fd, (when, when))

    def symlink(self, rel: PurePosixPath, target: str) -> None:
        self._count_member(rel, False)
        parent = self._parent(rel)
        try:
            os.symlink(target, parent / rel.name)
        except FileExistsError:
            raise FormatRejected(f"{self.kind} member {shown(rel)} clashes with another member") from None

    def finish(self) -> list[str]:
        for path, mode, mtime in reversed(self._dirs):
            os.chmod(path, mode)
            if mtime is not None:
                os.utime(path, (mtime, mtime))
        return self.names


#: what the parsers (tarfile, zipfile, the decompressors, struct) raise for bytes that are not
#: the archive they claim to be; OSError is told apart by :func:`_os_error`
PARSE_ERRORS = (
    tarfile.TarError,
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    EOFError,
    zlib.error,
    lzma.LZMAError,
    struct.error,
    ValueError,  # also UnicodeDecodeError (names), gzip.BadGzipFile is an OSError
    NotImplementedError,  # e.g. an unsupported zip compression method
)


def _malformed(kind: str, e: BaseException) -> FormatRejected:
    text = str(e) or type(e).__name__
    if len(text) > 200:
        text = text[:200] + "..."
    return FormatRejected(f"input is not a valid {kind}: {ascii(text)[1:-1]}")


def _mtime(value: float | None) -> float | None:
    """A member's time if the system can set it (headers may hold anything, even NaN)."""
    if value is None or not 0 <= value < _MAX_MTIME:  # NaN fails both comparisons
        return None
    return float(value)


def _os_error(kind: str, e: OSError) -> Exception:
    """A refusal for what the archive's bytes caused, else a failure that may not repeat."""
    if isinstance(e, gzip.BadGzipFile) or e.errno is None:  # bad data, not a system error (bz2 has no errno)
        return _malformed(kind, e)
    if e.errno in (errno.ENAMETOOLONG, errno.EILSEQ, errno.EINVAL, errno.ELOOP):
        return FormatRejected(f"{kind}: cannot create a member: {e.strerror}")
    return SigningFailed(f"{kind}: cannot extract: {e.strerror or e}")


# -- tar -------------------------------------------------------------------------------


class _BoundedReader:
    """A read-only stream that fails once more than ``limit`` bytes have been read."""

    def __init__(self, raw: io.BufferedIOBase | BinaryIO, limit: int) -> None:
        self._raw = raw
        self._left = limit

    def read(self, size: int = -1) -> bytes:
        if size < 0 or size > self._left:
            size = self._left + 1
        data = self._raw.read(size)
        self._left -= len(data)
        if self._left < 0:
            raise _Oversized
        return data


def _decompressor(raw: BinaryIO, compression: Compression) -> io.BufferedIOBase | BinaryIO:
    if compression == "gz":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if compression == "bz2":
        return bz2.BZ2File(raw, "rb")
    if compression == "xz":
        return lzma.LZMAFile(raw, "rb")
    return raw


def safe_extract_tar(
    path: Path,
    dest: Path,
    *,
    max_total: int = DEFAULT_MAX_TOTAL,
    max_members: int = DEFAULT_MAX_MEMBERS,
    allow_symlinks: bool = False,
    compressions: tuple[Compression, ...] = ("gz", "bz2", "xz", ""),
) -> list[str]:
    """Extract a (possibly compressed) tarball into ``dest`` under the rules of this module.

    ``compressions`` lists what is accepted (``""`` = uncompressed tar). Returns the clean
    relative names of the members in archive order."""
    compression = detect_tar_compression(path)
    if compression is None or compression not in compressions:
        wanted = ", ".join(f"tar.{c}" if c else "tar" for c in compressions)
        got = "not a tarball" if compression is None else f"a tar.{compression}" if compression else "a tar"
        raise FormatRejected(f"input must be a tarball ({wanted}); it is {got}")
    writer = _Writer(dest, max_total, max_members, "tarball", path.stat().st_size)
    stream_limit = max_total + _HEADER_ALLOWANCE * (max_members + 1)
    try:
        with path.open("rb") as raw, _decompressor(raw, compression) as plain:
            bounded = _BoundedReader(plain, stream_limit)
            with tarfile.open(fileobj=bounded, mode="r|") as tf:  # type: ignore[call-overload]
                _extract_tar_members(tf, writer, allow_symlinks)
            # Read to the end so the compressor's own check (gzip CRC, xz/bz2 checksums) runs:
            # tarfile stops at the end-of-archive blocks and would never see a corrupt stream.
            while bounded.read(_CHUNK):
                pass
    except _Oversized:
        raise FormatRejected(f"tarball unpacks to more than {stream_limit} bytes") from None
    except PARSE_ERRORS as e:
        raise _malformed("tarball", e) from None
    except OSError as e:
        if isinstance(e, FileNotFoundError) and not path.exists():
            raise SigningFailed(f"input {path.name} disappeared") from None
        raise _os_error("tarball", e) from None
    return writer.finish()


def _extract_tar_members(tf: tarfile.TarFile, writer: _Writer, allow_symlinks: bool) -> None:
    empty = True
    for member in tf:
        empty = False
        rel = _clean_name(member.name, "tarball member")
        if rel is None:
            if not member.isdir():
                raise FormatRejected(f"tarball member {shown(member.name)} is not a directory")
            continue
        what = f"tarball member {shown(rel)}"
        if member.isdir():
            writer.directory(rel, member.mode, member.mtime)
        elif member.isreg():
            src = tf.extractfile(member)
            if src is None:  # pragma: no cover - isreg() members always have data
                raise FormatRejected(f"{what}: no data")
            writer.file(rel, src, member.mode, member.mtime)
        elif member.issym():
            if not allow_symlinks:
                raise FormatRejected(f"{what} is a symbolic link (links are not allowed)")
            _check_symlink(rel, member.linkname, "tarball member")
            writer.symlink(rel, member.linkname)
        elif member.islnk():
            raise FormatRejected(f"{what} is a hard link (links are not allowed)")
        elif member.isdev():
            raise FormatRejected(f"{what} is a device or fifo (not allowed)")
        else:
            raise FormatRejected(f"{what} has unsupported type {member.type!r}")
    if empty:
        raise FormatRejected("tarball is empty")


def _tar_members(src_dir: Path) -> Iterator[tuple[str, Path]]:
    """(archive name, path) of everything under ``src_dir``, sorted, parents first."""
    stack = [src_dir]
    out: list[tuple[str, Path]] = []
    while stack:
        d = stack.pop()
        for entry in os.scandir(d):
            p = Path(entry.path)
            out.append((p.relative_to(src_dir).as_posix(), p))
            if entry.is_dir(follow_symlinks=False):
                stack.append(p)
    out.sort(key=lambda item: item[0].split("/"))
    yield from out


def repack_tar(src_dir: Path, out_path: Path, compression: Compression = "gz") -> None:
    """Pack everything under ``src_dir`` into a tarball at ``out_path``.

    Members are sorted by path, named relative to ``src_dir`` (no ``./`` prefix), owned by
    root (uid/gid 0, ``root``/``root``), keep their mtimes and permission bits (set-id and
    sticky bits dropped), and symbolic links stay links. A gzip header carries no time or
    name, so the same tree always gives the same bytes."""
    try:
        with (
            out_path.open("xb") as raw,
            _compressor(raw, compression) as comp,
            tarfile.open(fileobj=comp, mode="w", format=tarfile.PAX_FORMAT) as tf,
        ):
            for name, p in _tar_members(src_dir):
                _add_tar_member(tf, name, p)
    except OSError as e:
        raise SigningFailed(f"cannot write {out_path.name}: {e.strerror or e}") from None


def _compressor(raw: BinaryIO, compression: Compression) -> io.BufferedIOBase | BinaryIO:
    if compression == "gz":
        # ISA-L's deflate at its default level: on an app bundle's tree 16x faster than zlib's
        # level 6 (4 against 68 ms for 1.7 MiB, most of a macapp job), the output 10% larger;
        # any gzip reads it
        # (igzip.py has no annotations)
        return igzip.IGzipFile(  # type: ignore[no-untyped-call]
            filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=GZIP_LEVEL
        )
    if compression == "bz2":
        return bz2.BZ2File(raw, "wb")
    if compression == "xz":
        return lzma.LZMAFile(raw, "wb")
    return raw


def _add_tar_member(tf: tarfile.TarFile, name: str, p: Path) -> None:
    st = os.lstat(p)
    info = tarfile.TarInfo(name)
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mtime = int(st.st_mtime)
    info.mode = stat.S_IMODE(st.st_mode) & 0o777
    if stat.S_ISDIR(st.st_mode):
        info.type = tarfile.DIRTYPE
        tf.addfile(info)
    elif stat.S_ISLNK(st.st_mode):
        info.type = tarfile.SYMTYPE
        info.linkname = os.readlink(p)
        tf.addfile(info)
    elif stat.S_ISREG(st.st_mode):
        info.size = st.st_size
        with p.open("rb") as f:
            tf.addfile(info, f)
    else:
        raise SigningFailed(f"cannot pack {shown(name)}: not a file, folder or symbolic link")


# -- zip -------------------------------------------------------------------------------


def _zip_type(info: zipfile.ZipInfo) -> int:
    """The Unix file type bits of a member (0 when the archive did not record them)."""
    if info.create_system == 3:  # Unix
        return stat.S_IFMT(info.external_attr >> 16)
    return 0


def safe_extract_zip(
    path: Path,
    dest: Path,
    *,
    max_total: int = DEFAULT_MAX_TOTAL,
    max_members: int = DEFAULT_MAX_MEMBERS,
    allow_symlinks: bool = False,
) -> list[str]:
    """Extract a zip into ``dest`` under the rules of this module; also refuses encrypted
    members and names containing backslashes. Returns the clean member names in order."""
    if not is_zip(path):
        raise FormatRejected("input is not a zip archive")
    declared = _zip_declared_count(path)
    if declared is not None and declared > max_members:
        raise FormatRejected(f"zip has more than {max_members} members ({declared})")
    size = path.stat().st_size
    writer = _Writer(dest, max_total, max_members, "zip", size)
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            if len(infos) > max_members:
                raise FormatRejected(f"zip has more than {max_members} members")
            for info in infos:
                # zipfile trusts the directory's offsets (a negative one fails as EINVAL)
                if not 0 <= info.header_offset <= size - 30:
                    raise FormatRejected(
                        f"input is not a valid zip: member {shown(info.filename)} starts at offset "
                        f"{info.header_offset}, outside the {size}-byte file"
                    )
                _extract_zip_member(zf, info, writer, allow_symlinks)
    except PARSE_ERRORS as e:
        raise _malformed("zip", e) from None
    except OSError as e:
        raise _os_error("zip", e) from None
    return writer.finish()


def _zip_declared_count(path: Path) -> int | None:
    """The member count the end-of-central-directory record declares, read before
    :mod:`zipfile` loads the whole central directory into memory (None if not found).
    Refuses a record whose central directory cannot lie before it."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            start = max(0, size - (65535 + 22 + 20))
            f.seek(start)
            tail = f.read()
            at = tail.rfind(b"PK\x05\x06")
            if at < 0 or len(tail) < at + 22:
                return None
            count: int = struct.unpack_from("<H", tail, at + 10)[0]
            dir_size, dir_offset = struct.unpack_from("<II", tail, at + 12)
            if dir_offset != 0xFFFFFFFF and dir_offset + dir_size > start + at:  # not zip64
                raise FormatRejected(
                    f"input is not a valid zip: its central directory (offset {dir_offset}, "
                    f"{dir_size} bytes) would end past its end record at offset {start + at}"
                )
            if count != 0xFFFF or at < 20 or tail[at - 20 : at - 16] != b"PK\x06\x07":
                return count
            # zip64: the locator just before the record gives the zip64 end record's offset
            offset: int = struct.unpack_from("<Q", tail, at - 20 + 8)[0]
            if offset > size:  # (past 2**63 seek itself raises ValueError)
                return None
            f.seek(offset)
            rec = f.read(56)
            if len(rec) < 56 or not rec.startswith(b"PK\x06\x06"):
                return None
            total: int = struct.unpack_from("<Q", rec, 32)[0]
            return total
    except OSError as e:
        raise SigningFailed(f"cannot read {path.name}: {e.strerror}") from None


def _extract_zip_member(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, writer: _Writer, allow_symlinks: bool
) -> None:
    if "\\" in info.filename:
        raise FormatRejected(f"zip member {shown(info.filename)}: backslashes in names are not allowed")
    rel = _clean_name(info.filename, "zip member")
    if rel is None:
        if not info.is_dir():
            raise FormatRejected(f"zip member {shown(info.filename)} is not a directory")
        return
    what = f"zip member {shown(rel)}"
    if info.flag_bits & 0x1:
        raise FormatRejected(f"{what} is encrypted")
    ftype = _zip_type(info)
    mode = (info.external_attr >> 16) & 0o7777 if info.create_system == 3 else 0o644
    mtime = _zip_mtime(info)
    if info.is_dir() or ftype == stat.S_IFDIR:
        writer.directory(rel, mode or 0o755, mtime)
    elif ftype == stat.S_IFLNK:
        if not allow_symlinks:
            raise FormatRejected(f"{what} is a symbolic link (links are not allowed)")
        if info.file_size > 4096:
            raise FormatRejected(f"{what}: symbolic link target too long")
        with zf.open(info) as f:
            raw = f.read(4097)
        try:
            target = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise FormatRejected(f"{what}: symbolic link target is not UTF-8") from None
        _check_symlink(rel, target, "zip member")
        writer.symlink(rel, target)
    elif ftype in (0, stat.S_IFREG):
        with zf.open(info) as f:
            writer.file(rel, f, mode or 0o644, mtime)
    else:
        raise FormatRejected(f"{what} is a device, fifo or socket (not allowed)")


def _zip_mtime(info: zipfile.ZipInfo) -> float | None:
    try:
        return dt.datetime(*info.date_time).timestamp()
    except (ValueError, OverflowError):
        return None


def repack_zip(src_dir: Path, out_path: Path, names: list[str] | None = None) -> None:
    """Write everything under ``src_dir`` (or just ``names``, in that order, e.g. the list
    :func:`safe_extract_zip` returned) to a deflated zip at ``out_path``.

    Without ``names`` members are sorted. Permission bits are kept; symbolic links are
    stored as links (Unix mode ``0o120777``)."""
    members = [(n, src_dir / n) for n in names] if names is not None else list(_tar_members(src_dir))
    try:
        with zipfile.ZipFile(out_path, "x", compression=zipfile.ZIP_DEFLATED) as zf:
            for name, p in members:
                st = os.lstat(p)
                if stat.S_ISDIR(st.st_mode):
                    info = zipfile.ZipInfo.from_file(p, name + "/", strict_timestamps=False)
                    zf.writestr(info, b"")
                elif stat.S_ISLNK(st.st_mode):
                    info = zipfile.ZipInfo(name, date_time=_zip_date(st.st_mtime))
                    info.create_system = 3
                    info.external_attr = (stat.S_IFLNK | 0o777) << 16
                    zf.writestr(info, os.readlink(p).encode("utf-8"))
                elif stat.S_ISREG(st.st_mode):
                    info = zipfile.ZipInfo.from_file(p, name, strict_timestamps=False)
                    info.compress_type = zipfile.ZIP_DEFLATED
                    with p.open("rb") as src, zf.open(info, "w") as dst:
                        while chunk := src.read(_CHUNK):
                            dst.write(chunk)
                else:
                    raise SigningFailed(f"cannot pack {shown(name)}: not a file, folder or symbolic link")
    except OSError as e:
        raise SigningFailed(f"cannot write {out_path.name}: {e.strerror or e}") from None


def _zip_date(mtime: float) -> tuple[int, int, int, int, int, int]:
    t = time.localtime(max(mtime, 315532800))  # zip dates start in 1980
    return (t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec)


# -- zip rewrite: members copied, never extracted ---------------------------------------

#: bound on a member read whole to be edited by :func:`rewrite_zip` (a manifest)
MAX_EDITED = 64 * 1024**2
#: an edit of a member's plain bytes: the new bytes, or None to copy the member unchanged
Editor = Callable[[bytes], bytes | None]
_U32 = 0xFFFFFFFF
_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True)
class ZipMember:
    """A member of a zip checked by :func:`zip_members`, as :func:`rewrite_zip` copies it."""

    info: zipfile.ZipInfo
    #: the name as stored (the rewrite keeps it byte for byte)
    raw_name: bytes

    @property
    def name(self) -> str:
        return self.info.orig_filename

    @property
    def is_dir(self) -> bool:
        return self.name.endswith("/")


@contextlib.contextmanager
def _zip_refusals() -> Iterator[None]:
    """Whatever reading a malformed zip raises becomes a refusal saying so; an I/O error that
    is not about the bytes stays a failure that may not repeat."""
    try:
        yield
    except PARSE_ERRORS as e:
        raise _malformed("zip", e) from None
    except OSError as e:
        if e.errno is None:
            raise _malformed("zip", e) from None
        if e.errno in (errno.EINVAL, errno.EOVERFLOW):  # a seek to an offset read from the archive
            raise FormatRejected("input is not a valid zip: an offset lies outside the file") from None
        raise SigningFailed(f"zip: cannot rewrite: {e.strerror or e}") from None


def zip_members(
    path: Path, *, max_members: int = DEFAULT_MAX_MEMBERS, max_total: int = DEFAULT_MAX_TOTAL
) -> list[ZipMember]:
    """Check a zip whose members :func:`rewrite_zip` will copy as they are; its members in order.

    The rules of this module, from the headers: names (stricter: no ``.`` or empty components,
    drive letters, control characters or backslashes, since they are copied verbatim; depth and
    length bounded), no duplicates, encryption, links or other special files, only stored or
    deflated members, the member count, the declared total and its ratio to the archive's size
    bounded, no two members sharing bytes. The rewrite then holds each member to its headers."""
    with _zip_refusals():
        declared = _zip_declared_count(path)  # before zipfile loads the whole directory
        if declared is not None and declared > max_members:
            raise FormatRejected(f"zip has {declared} members, more than the limit of {max_members}")
        size = path.stat().st_size
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
        members = _check_copied_members(infos, size, max_members, max_total)
        _check_no_overlap(members)
        return members


def _check_copied_members(
    infos: list[zipfile.ZipInfo], size: int, max_members: int, max_total: int
) -> list[ZipMember]:
    if not infos:
        raise FormatRejected("empty zip archive: nothing to sign")
    if len(infos) > max_members:
        raise FormatRejected(f"zip has {len(infos)} members, more than the limit of {max_members}")
    bomb_at = max(BOMB_MIN_SIZE, MAX_RATIO * size)
    seen: set[str] = set()
    total = 0
    members: list[ZipMember] = []
    for info in infos:
        name = info.orig_filename
        # zipfile trusts the directory's offsets
        if not 0 <= info.header_offset <= size - 30:
            raise FormatRejected(
                f"input is not a valid zip: member {shown(name)} starts at offset "
                f"{info.header_offset}, outside the {size}-byte file"
            )
        _check_copied_name(name)
        if name in seen:
            raise FormatRejected(f"duplicate member {shown(name)}")
        seen.add(name)
        _check_copied_entry(info)
        total += info.file_size
        if total > max_total:
            raise FormatRejected(
                f"member {shown(name)} makes the archive expand beyond {max_total} bytes (zip bomb?)"
            )
        if total > bomb_at:
            raise FormatRejected(
                f"member {shown(name)} expands the archive to over {MAX_RATIO} times its size: a zip bomb"
            )
        members.append(ZipMember(info, name.encode("utf-8" if info.flag_bits & 0x800 else "cp437")))
    return members


def _check_copied_name(name: str) -> None:
    why = None
    parts = name.split("/")
    if parts[-1] == "":
        parts = parts[:-1]  # a directory entry
    if not name:
        why = "empty member name"
    elif any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        why = "control character in member name"
    elif "\\" in name:
        why = "backslash in member name"
    elif name.startswith("/") or _DRIVE.match(name):
        why = "absolute member path"
    elif any(part in ("", ".", "..") for part in parts):
        why = "'.', '..' or empty path component"
    if why:
        raise FormatRejected(f"unsafe member {shown(name)}: {why}")
    _check_path(parts, name, "zip member")


def _check_copied_entry(info: zipfile.ZipInfo) -> None:
    name = shown(info.orig_filename)
    if info.flag_bits & 0x41:
        raise FormatRejected(f"member {name} is encrypted")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise FormatRejected(f"member {name} uses unsupported compression method {info.compress_type}")
    ftype = _zip_type(info)
    if ftype not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise FormatRejected(
            f"member {name} is {'a symlink' if ftype == stat.S_IFLNK else 'not a regular file'}"
        )
    if info.orig_filename.endswith("/") and info.file_size:
        raise FormatRejected(f"directory member {name} has content")
    if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
        raise FormatRejected(f"stored member {name} has inconsistent sizes")


def _check_no_overlap(members: list[ZipMember]) -> None:
    """Entries must not share bytes (overlapping entries are the classic zip bomb trick)."""
    spans = sorted(
        (m.info.header_offset, m.info.header_offset + 30 + len(m.raw_name) + m.info.compress_size, m.name)
        for m in members
    )
    for (_, end, name), (start, _, other) in itertools.pairwise(spans):
        if start < end:
            raise FormatRejected(f"members {shown(name)} and {shown(other)} overlap")


def rewrite_zip(
    src: Path,
    dest: Path,
    members: Sequence[ZipMember],
    *,
    drop: Callable[[str], object] = lambda name: False,
    edit: Callable[[str], Editor | None] = lambda name: None,
    align: Callable[[str], int] | None = None,
) -> None:
    """Write ``members`` of the zip ``src`` (as :func:`zip_members` gave them) to ``dest``.

    Each member's compressed bytes are copied unchanged and checked on the way: its local
    header agrees with the central directory, it is not truncated, a deflate stream ends where
    the entry does and never inflates past the declared size, size and CRC are as declared.
    Extra fields, comments, data descriptors and prepended data are not copied. Members for
    which ``drop(name)`` is true are checked and left out; ``edit(name)`` may give an
    :data:`Editor` for a member, called with its plain bytes (at most :data:`MAX_EDITED`),
    whose result is written with the member's compression method. An output that would need
    zip64 (over 4 GiB or 65535 members) is refused. With ``align``, the data of each STORED
    member starts at a multiple of ``align(name)``, padded by Android's alignment extra field
    (what ``zipalign`` checks, and what apksig reads and keeps when it signs)."""
    with _zip_refusals():
        size = src.stat().st_size
        with src.open("rb") as f, dest.open("wb") as out:
            writer = _ZipCopier(out, align)
            for m in members:
                info = m.info
                chunks = _member_chunks(f, m, size)
                if drop(m.name):
                    for _ in chunks:
                        pass
                    continue
                editor = edit(m.name)
                if editor is None:
                    writer.add(m, info.CRC, info.compress_type, info.compress_size, info.file_size, chunks)
                    continue
                if info.file_size > MAX_EDITED:
                    raise FormatRejected(f"member {shown(m.name)} is larger than {MAX_EDITED} bytes")
                raw = b"".join(chunks)
                plain = zlib.decompress(raw, -15) if info.compress_type else raw
                new = editor(plain)
                if new is None:
                    writer.add(m, info.CRC, info.compress_type, len(raw), len(plain), [raw])
                else:
                    data = _deflate(new) if info.compress_type else new
                    writer.add(m, zlib.crc32(new), info.compress_type, len(data), len(new), [data])
            writer.finish()


#: Android's zip extra field saying to what multiple a member's data is aligned (apksig's)
ALIGNMENT_EXTRA_ID = 0xD935


class _ZipCopier:
    """Writes members without extra fields (but an alignment one), comments or data
    descriptors (no zip64)."""

    def __init__(self, f: IO[bytes], align: Callable[[str], int] | None = None) -> None:
        self._f = f
        self._align = align
        self._central: list[bytes] = []

    def _alignment_extra(self, m: ZipMember, method: int, offset: int) -> bytes:
        if self._align is None or method != zipfile.ZIP_STORED or m.is_dir:
            return b""
        multiple = self._align(m.name)
        data_start = offset + 30 + len(m.raw_name) + 6  # the extra field's smallest size
        padding = -data_start % multiple
        return struct.pack("<HHH", ALIGNMENT_EXTRA_ID, 2 + padding, multiple) + bytes(padding)

    def add(
        self, m: ZipMember, crc: int, method: int, csize: int, usize: int, chunks: Iterable[bytes]
    ) -> None:
        offset = self._f.tell()
        extra = self._alignment_extra(m, method, offset)
        if offset + 30 + len(m.raw_name) + len(extra) + csize > _U32 or len(self._central) >= 0xFFFF:
            raise FormatRejected("archive too large to sign (zip64 output is not supported)")
        y, mo, d, h, mi, s = m.info.date_time
        dos_date = ((max(y, 1980) - 1980) << 9) | (mo << 5) | d
        dos_time = (h << 11) | (mi << 5) | (s // 2)
        flags = m.info.flag_bits & 0x800
        common = struct.pack(
            "<HHHHIIIH", flags, method, dos_time, dos_date, crc, csize, usize, len(m.raw_name)
        )
        head = b"PK\x03\x04" + struct.pack("<H", 20) + common + struct.pack("<H", len(extra))
        self._f.write(head + m.raw_name + extra)
        for chunk in chunks:
            self._f.write(chunk)
        external = 0x10 if m.is_dir else 0
        self._central.append(
            b"PK\x01\x02"
            + struct.pack("<HH", 20, 20)
            + common
            + struct.pack("<HHHHII", 0, 0, 0, 0, external, offset)
            + m.raw_name
        )

    def finish(self) -> None:
        start = self._f.tell()
        for entry in self._central:
            self._f.write(entry)
        size = self._f.tell() - start
        n = len(self._central)
        self._f.write(b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, n, n, size, start, 0))


def _member_chunks(src: IO[bytes], m: ZipMember, file_size: int) -> Iterator[bytes]:
    """Yield the compressed bytes of ``m`` while checking its local header, size bound and CRC;
    the final checks run when the generator is exhausted, so always consume it fully."""
    info, name = m.info, shown(m.name)
    src.seek(info.header_offset)
    head = src.read(30)
    if len(head) < 30 or head[:4] != b"PK\x03\x04":
        raise FormatRejected(f"member {name}: bad local header")
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    if src.read(name_len) != m.raw_name:
        raise FormatRejected(f"member {name}: local and central names differ")
    data_start = info.header_offset + 30 + name_len + extra_len
    if data_start + info.compress_size > file_size:
        raise FormatRejected(f"member {name} is truncated")
    crc, produced, left, pos = 0, 0, info.compress_size, data_start
    inflater = zlib.decompressobj(-15) if info.compress_type == zipfile.ZIP_DEFLATED else None
    while left:
        src.seek(pos)  # the consumer may share the file position
        chunk = src.read(min(_CHUNK, left))
        if not chunk:
            raise FormatRejected(f"member {name} is truncated")
        left -= len(chunk)
        pos += len(chunk)
        if inflater is None:
            plain = chunk
        else:
            try:
                # never expand past the declared size (+1 to notice a lie)
                plain = inflater.decompress(chunk, info.file_size - produced + 1)
            except zlib.error as e:
                raise FormatRejected(f"member {name}: corrupt deflate data ({e})") from None
        produced += len(plain)
        if produced > info.file_size or (inflater is not None and inflater.unconsumed_tail):
            raise FormatRejected(f"member {name} expands beyond its declared size")
        crc = zlib.crc32(plain, crc)
        yield chunk
    if inflater is not None and (not inflater.eof or inflater.unused_data):
        raise FormatRejected(f"member {name}: deflate stream does not end where the entry does")
    if produced != info.file_size:
        raise FormatRejected(f"member {name}: size mismatch ({produced} != {info.file_size})")
    if crc != info.CRC:
        raise FormatRejected(f"member {name}: CRC mismatch")


def _deflate(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()
