"""Safe extraction and deterministic re-packing of tar and zip archives.

Every format that opens an archive (and the task runner) goes through here. Extraction
never trusts the archive:

* member names must be relative and clean: absolute paths, ``..`` components, NUL bytes
  and (in zips) backslashes are refused; ``./`` prefixes and ``.`` components are dropped;
* only regular files and directories are extracted. Hard links, device nodes, fifos and
  sockets are always refused. Symbolic links are refused too, unless the caller passes
  ``allow_symlinks=True`` (macOS bundles need them for frameworks); then a link must be
  relative, its target may only *start* with ``..`` components (``../../A/b``, never
  ``A/../b``), and the target must stay inside the extraction folder. Because no member
  may be written through a link (parents are checked with ``lstat`` and files are opened
  with ``O_NOFOLLOW | O_EXCL``) and ``..`` is only ever applied to real directories,
  no chain of such links can reach outside the folder;
* duplicate members are refused (a later member could otherwise replace a link);
* the member count and the total uncompressed size are bounded. The size is counted on
  the bytes actually decompressed, never taken from headers, and for tarballs the
  decompressed stream itself is bounded too, so oversized headers cannot exhaust memory;
* modes are reduced to ``0o755``/``0o644`` style permissions (no set-id, sticky or
  world-writable bits).

Every refusal raises :class:`~sealbox.errors.FormatRejected` with a one-line reason that
names the member. Write errors that may not repeat (disk full) raise
:class:`~sealbox.errors.SigningFailed`. The caller owns ``dest`` and removes it.
"""

from __future__ import annotations

import bz2
import datetime as dt
import errno
import gzip
import io
import lzma
import os
import stat
import struct
import tarfile
import time
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO, BinaryIO, Literal

from .errors import FormatRejected, SigningFailed

__all__ = [
    "DEFAULT_MAX_MEMBERS",
    "DEFAULT_MAX_TOTAL",
    "Compression",
    "detect_tar_compression",
    "is_zip",
    "repack_tar",
    "repack_zip",
    "safe_extract_tar",
    "safe_extract_zip",
]

#: default bound on the total uncompressed size of one archive (4 GiB)
DEFAULT_MAX_TOTAL = 4 * 1024**3
MAX_RATIO = 200
BOMB_MIN_SIZE = 64 * 1024**2
#: default bound on the number of members of one archive
DEFAULT_MAX_MEMBERS = 50_000

Compression = Literal["gz", "bz2", "xz", ""]

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


def _clean_name(raw: str, what: str) -> PurePosixPath | None:
    """The member's relative path, None for the archive root itself (``.`` or ``./``)."""
    if not raw or "\x00" in raw:
        raise FormatRejected(f"{what} has an empty or NUL-containing name")
    if raw.startswith("/"):
        raise FormatRejected(f"{what} {raw!r}: absolute paths are not allowed")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise FormatRejected(f"{what} {raw!r}: '..' in member names is not allowed")
    if not parts:
        return None
    return PurePosixPath(*parts)


def _check_symlink(rel: PurePosixPath, target: str, what: str) -> None:
    if not target or "\x00" in target:
        raise FormatRejected(f"{what} {str(rel)!r}: empty symbolic link target")
    if target.startswith("/"):
        raise FormatRejected(f"{what} {str(rel)!r}: symbolic link to an absolute path {target!r}")
    parts = [p for p in target.split("/") if p not in ("", ".")]
    ups = 0
    for i, p in enumerate(parts):
        if p != "..":
            if ".." in parts[i:]:
                raise FormatRejected(
                    f"{what} {str(rel)!r}: symbolic link target {target!r} has '..' after a name"
                )
            break
        ups += 1
    if ups > len(rel.parts) - 1:
        raise FormatRejected(f"{what} {str(rel)!r}: symbolic link {target!r} points outside the archive")


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
        dest.mkdir(parents=True, exist_ok=True)

    def _count_member(self, rel: PurePosixPath, is_dir: bool) -> None:
        if rel in self._seen:
            if is_dir and (self.dest / rel).is_dir() and not (self.dest / rel).is_symlink():
                return
            raise FormatRejected(f"{self.kind} member {str(rel)!r} appears twice")
        self._seen.add(rel)
        self.names.append(str(rel))
        if len(self.names) > self.max_members:
            raise FormatRejected(f"{self.kind} has more than {self.max_members} members")

    def _parent(self, rel: PurePosixPath) -> Path:
        """Make (or check) the real directories leading to ``rel``; never through a link."""
        current = self.dest
        for part in rel.parts[:-1]:
            current = current / part
            try:
                st = os.lstat(current)
            except FileNotFoundError:
                os.mkdir(current, 0o755)
                continue
            if not stat.S_ISDIR(st.st_mode):
                kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "a file"
                raise FormatRejected(f"{self.kind} member {str(rel)!r} lies under {kind}")
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
                raise FormatRejected(f"{self.kind} directory {str(rel)!r} clashes with another member")
        self._dirs.append((path, (mode & _FILE_MODE_MASK) | 0o700, mtime))

    def file(self, rel: PurePosixPath, src: IO[bytes], mode: int, mtime: float | None) -> None:
        self._count_member(rel, False)
        path = self._parent(rel) / rel.name
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(path, flags, 0o600)
        except FileExistsError:
            raise FormatRejected(f"{self.kind} member {str(rel)!r} clashes with another member") from None
        with os.fdopen(fd, "wb") as out:
            while chunk := src.read(_CHUNK):
                self.total += len(chunk)
                if self.total > self.max_total:
                    raise FormatRejected(
                        f"{self.kind} unpacks to more than {self.max_total} bytes (at member {str(rel)!r})"
                    )
                if self.total > self.ratio_limit:
                    raise FormatRejected(
                        f"{self.kind} unpacks to over {MAX_RATIO} times its size (at member {str(rel)!r}): "
                        "a decompression bomb"
                    )
                out.write(chunk)
        os.chmod(path, (mode & _FILE_MODE_MASK) | 0o600)
        if mtime is not None:
            os.utime(path, (mtime, mtime))

    def symlink(self, rel: PurePosixPath, target: str) -> None:
        self._count_member(rel, False)
        parent = self._parent(rel)
        try:
            os.symlink(target, parent / rel.name)
        except FileExistsError:
            raise FormatRejected(f"{self.kind} member {str(rel)!r} clashes with another member") from None

    def finish(self) -> list[str]:
        for path, mode, mtime in reversed(self._dirs):
            os.chmod(path, mode)
            if mtime is not None:
                os.utime(path, (mtime, mtime))
        return self.names


def _os_error(kind: str, e: OSError) -> Exception:
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
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, lzma.LZMAError, zlib.error) as e:
        raise FormatRejected(f"input is not a valid tarball: {e or type(e).__name__}") from None
    except OSError as e:
        if isinstance(e, FileNotFoundError) and not path.exists():
            raise SigningFailed(f"input {path.name} disappeared") from None
        if compression == "bz2" and e.errno is None:  # bz2 reports corrupt data as a bare OSError
            raise FormatRejected(f"input is not a valid tarball: {e}") from None
        raise _os_error("tarball", e) from None
    return writer.finish()


def _extract_tar_members(tf: tarfile.TarFile, writer: _Writer, allow_symlinks: bool) -> None:
    empty = True
    for member in tf:
        empty = False
        rel = _clean_name(member.name, "tarball member")
        if rel is None:
            if not member.isdir():
                raise FormatRejected(f"tarball member {member.name!r} is not a directory")
            continue
        what = f"tarball member {str(rel)!r}"
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
        return gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6)
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
        raise SigningFailed(f"cannot pack {name!r}: not a file, folder or symbolic link")


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
    writer = _Writer(dest, max_total, max_members, "zip", path.stat().st_size)
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            if len(infos) > max_members:
                raise FormatRejected(f"zip has more than {max_members} members")
            for info in infos:
                _extract_zip_member(zf, info, writer, allow_symlinks)
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        EOFError,
        zlib.error,
        lzma.LZMAError,
        NotImplementedError,
    ) as e:
        raise FormatRejected(f"input is not a valid zip: {e or type(e).__name__}") from None
    except OSError as e:
        raise _os_error("zip", e) from None
    return writer.finish()


def _zip_declared_count(path: Path) -> int | None:
    """The member count the end-of-central-directory record declares, read before
    :mod:`zipfile` loads the whole central directory into memory (None if not found)."""
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
            if count != 0xFFFF or at < 20 or tail[at - 20 : at - 16] != b"PK\x06\x07":
                return count
            # zip64: the locator just before the record gives the zip64 end record's offset
            offset: int = struct.unpack_from("<Q", tail, at - 20 + 8)[0]
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
        raise FormatRejected(f"zip member {info.filename!r}: backslashes in names are not allowed")
    rel = _clean_name(info.filename, "zip member")
    if rel is None:
        if not info.is_dir():
            raise FormatRejected(f"zip member {info.filename!r} is not a directory")
        return
    what = f"zip member {str(rel)!r}"
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
                    raise SigningFailed(f"cannot pack {name!r}: not a file, folder or symbolic link")
    except OSError as e:
        raise SigningFailed(f"cannot write {out_path.name}: {e.strerror or e}") from None


def _zip_date(mtime: float) -> tuple[int, int, int, int, int, int]:
    t = time.localtime(max(mtime, 315532800))  # zip dates start in 1980
    return (t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec)
