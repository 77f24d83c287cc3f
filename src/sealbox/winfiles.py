"""Windows file rules: which names may be Authenticode-signed, PE and MSI recognition, and
whether a file is already signed.

Shared by the Authenticode signer (:mod:`sealbox.formats.authenticode`, which re-exports these)
and the task runner, which applies them to zip members on build workers without importing the
signer and its key handling.
"""

from __future__ import annotations

import fnmatch
import os
import struct
from pathlib import Path, PurePosixPath

from .errors import FormatRejected

__all__ = [
    "ALLOWED_EXTENSIONS",
    "BLOCKLIST",
    "OLE_MAGIC",
    "check_pe",
    "is_msi_bytes",
    "is_pe_bytes",
    "is_signable_name",
    "is_signed",
    "name_problem",
    "name_rejection",
    "pe_cert_table",
    "read_head",
]

#: extensions (of the uploaded filename) Authenticode signs
ALLOWED_EXTENSIONS = (".exe", ".dll", ".sys", ".msi")
#: names already signed by Microsoft that must never be re-signed (fnmatch, case-insensitive)
BLOCKLIST = ("msvc*.dll", "d3dcompiler_42.dll", "d3dcompiler_43.dll", "d3dx9_42.dll", "d3dx9_43.dll")

OLE_MAGIC = bytes.fromhex("d0cf11e0a1b11ae1")
_MSI_SIGNATURE_STREAM = "\x05DigitalSignature".encode("utf-16-le")
_CERT_TABLE = 4  # index of IMAGE_DIRECTORY_ENTRY_SECURITY
_HEAD = 64 * 1024  # every header we parse must lie in the first 64 KiB


def _basename(filename: str) -> str:
    return PurePosixPath(filename.replace("\\", "/")).name


def name_problem(filename: str) -> str | None:
    """What is wrong with the name (the name itself not repeated), or None."""
    lower = _basename(filename).lower()
    if not lower.endswith(ALLOWED_EXTENSIONS):
        return f"does not end in {', '.join(ALLOWED_EXTENSIONS)}"
    for pattern in BLOCKLIST:
        if fnmatch.fnmatchcase(lower, pattern):
            return f"is on the blocklist of Microsoft-signed files ({pattern})"
    return None


def name_rejection(filename: str) -> str | None:
    """Why ``filename`` may not be Authenticode-signed, or None if it may."""
    problem = name_problem(filename)
    return None if problem is None else f"'{_basename(filename)}' {problem}"


def is_signable_name(filename: str) -> bool:
    """True if the name has a signable extension and is not blocklisted (``msvc*.dll`` ...)."""
    return name_rejection(filename) is None


def is_pe_bytes(head: bytes) -> bool:
    """True if ``head`` (the first bytes of a file, at least up to ``e_lfanew + 4``) is a PE image."""
    if len(head) < 0x40 or head[:2] != b"MZ":
        return False
    (lfanew,) = struct.unpack_from("<I", head, 0x3C)
    return lfanew + 4 <= len(head) and head[lfanew : lfanew + 4] == b"PE\0\0"


def is_msi_bytes(head: bytes) -> bool:
    """True if ``head`` starts with an OLE compound-file header of a sane version (MSI container)."""
    if len(head) < 512 or head[:8] != OLE_MAGIC:
        return False
    major, order, shift = struct.unpack_from("<HHH", head, 26)
    return order == 0xFFFE and (major, shift) in ((3, 9), (4, 12))


def pe_cert_table(head: bytes, size: int) -> tuple[int, int]:
    """Validate a PE's headers against the file size; return the certificate table (offset, size).

    Raises :class:`FormatRejected` naming the first inconsistency.
    """
    if not is_pe_bytes(head):
        raise FormatRejected("not a PE file (no MZ header with a PE signature at e_lfanew)")
    (lfanew,) = struct.unpack_from("<I", head, 0x3C)
    coff = lfanew + 4
    opt = coff + 20
    if opt + 2 > len(head):
        raise FormatRejected("truncated PE: COFF header cut off")
    (nsections,) = struct.unpack_from("<H", head, coff + 2)
    (opt_size,) = struct.unpack_from("<H", head, coff + 16)
    if not 1 <= nsections <= 96:
        raise FormatRejected(f"malformed PE: {nsections} sections")
    (magic,) = struct.unpack_from("<H", head, opt)
    if magic == 0x10B:
        count_at, dirs_at = opt + 92, opt + 96
    elif magic == 0x20B:
        count_at, dirs_at = opt + 108, opt + 112
    else:
        raise FormatRejected(f"malformed PE: unknown optional header magic 0x{magic:x}")
    if dirs_at > opt + opt_size or opt + opt_size > len(head):
        raise FormatRejected("truncated PE: optional header cut off")
    (ndirs,) = struct.unpack_from("<I", head, count_at)
    cert_off = cert_size = 0
    if ndirs > _CERT_TABLE and dirs_at + 8 * (_CERT_TABLE + 1) <= opt + opt_size:
        cert_off, cert_size = struct.unpack_from("<II", head, dirs_at + 8 * _CERT_TABLE)
    table = opt + opt_size
    if table + 40 * nsections > len(head):
        raise FormatRejected("truncated PE: section table cut off")
    for i in range(nsections):
        raw_size, raw_ptr = struct.unpack_from("<II", head, table + 40 * i + 16)
        if raw_size and raw_ptr + raw_size > size:
            name = head[table + 40 * i : table + 40 * i + 8].rstrip(b"\0").decode("ascii", "replace")
            raise FormatRejected(
                f"truncated PE: section {name!r} ends at byte {raw_ptr + raw_size}, the file has {size}"
            )
    if cert_size and (cert_off < table + 40 * nsections or cert_off + cert_size > size):
        raise FormatRejected("malformed PE: the certificate table lies outside the file")
    return cert_off, cert_size


def check_pe(path: Path) -> None:
    """Raise :class:`FormatRejected` unless ``path`` is a whole, well-formed PE file."""
    pe_cert_table(*read_head(path))


def read_head(path: Path) -> tuple[bytes, int]:
    """The first 64 KiB of ``path`` (every header the rules read lies there) and its size."""
    with path.open("rb") as f:
        return f.read(_HEAD), os.fstat(f.fileno()).st_size


def is_signed(path: Path) -> bool:
    """True if ``path`` already carries an Authenticode signature.

    PE: the certificate-table directory entry is non-empty. MSI: the compound file has a
    ``\\x05DigitalSignature`` stream (found by its UTF-16 directory name). Anything else: False.
    """
    head, size = read_head(path)
    if is_pe_bytes(head):
        try:
            return pe_cert_table(head, size)[1] != 0
        except FormatRejected:
            return False
    if is_msi_bytes(head):
        with path.open("rb") as f:
            tail = b""
            while chunk := f.read(1 << 20):
                if _MSI_SIGNATURE_STREAM in tail + chunk:
                    return True
                tail = chunk[-len(_MSI_SIGNATURE_STREAM) :]
    return False
