"""Windows file rules: which names may be Authenticode-signed, which kind of file the bytes are
(PE, MSI, CAB, security catalog, APPX/MSIX package, PowerShell script), and whether a file is
already signed.

Shared by the Authenticode signer (:mod:`sealbox.formats.authenticode`, which re-exports these)
and the task runner, which applies them to zip members on build workers without importing the
signer and its key handling.
"""

from __future__ import annotations

import codecs
import fnmatch
import os
import struct
import zipfile
from pathlib import Path, PurePosixPath
from typing import Literal

from .archives import PARSE_ERRORS
from .errors import FormatRejected

__all__ = [
    "ALLOWED_EXTENSIONS",
    "BLOCKLIST",
    "KIND_EXTENSIONS",
    "OID_CTL",
    "OLE_MAGIC",
    "PE_MSI_EXTENSIONS",
    "Kind",
    "authenticode_kind",
    "check_pe",
    "der_header",
    "is_msi_bytes",
    "is_pe_bytes",
    "is_signable_name",
    "is_signed",
    "name_problem",
    "name_rejection",
    "pe_cert_table",
    "read_head",
]

#: extensions of PE and MSI files: what the task runner signs (single files, zip members)
PE_MSI_EXTENSIONS = (".exe", ".dll", ".sys", ".msi")
#: extensions (of the uploaded filename) the server's Authenticode formats accept; which kind
#: of file it is, is decided by the bytes (:func:`authenticode_kind`), never by the name
ALLOWED_EXTENSIONS = (*PE_MSI_EXTENSIONS, ".cab", ".cat", ".appx", ".msix", ".ps1", ".psm1", ".psd1")

#: what Authenticode signs here, as told by the bytes
Kind = Literal["PE", "MSI", "CAB", "catalog", "APPX", "script"]
#: the extension osslsigncode gets a kind under (to sign an MSI, to verify any kind: it tells
#: scripts by the name alone; .ps1, .psm1 and .psd1 are signed alike: one comment syntax and SIP)
KIND_EXTENSIONS: dict[Kind, str] = {
    "PE": ".exe",
    "MSI": ".msi",
    "CAB": ".cab",
    "catalog": ".cat",
    "APPX": ".msix",
    "script": ".ps1",
}
#: names already signed by Microsoft that must never be re-signed (fnmatch, case-insensitive)
BLOCKLIST = ("msvc*.dll", "d3dcompiler_42.dll", "d3dcompiler_43.dll", "d3dx9_42.dll", "d3dx9_43.dll")

OLE_MAGIC = bytes.fromhex("d0cf11e0a1b11ae1")
_MSI_SIGNATURE_STREAM = "\x05DigitalSignature".encode("utf-16-le")
_CERT_TABLE = 4  # index of IMAGE_DIRECTORY_ENTRY_SECURITY
_HEAD = 64 * 1024  # every header we parse must lie in the first 64 KiB


def _basename(filename: str) -> str:
    return PurePosixPath(filename.replace("\\", "/")).name


def name_problem(filename: str, extensions: tuple[str, ...] = ALLOWED_EXTENSIONS) -> str | None:
    """What is wrong with the name (the name itself not repeated), or None."""
    lower = _basename(filename).lower()
    if not lower.endswith(extensions):
        return f"does not end in {', '.join(extensions)}"
    for pattern in BLOCKLIST:
        if fnmatch.fnmatchcase(lower, pattern):
            return f"is on the blocklist of Microsoft-signed files ({pattern})"
    return None


def name_rejection(filename: str) -> str | None:
    """Why the task runner will not Authenticode-sign ``filename`` (a PE or MSI name), or None."""
    problem = name_problem(filename, PE_MSI_EXTENSIONS)
    return None if problem is None else f"'{_basename(filename)}' {problem}"


def is_signable_name(filename: str) -> bool:
    """True if the name has a PE or MSI extension and is not blocklisted (``msvc*.dll`` ...):
    the task runner's rule for single files and zip members."""
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


# -- which kind of file: CAB, security catalog, APPX/MSIX, script --------------------------------
_CAB_MAGIC = b"MSCF"
_OID_SIGNED_DATA = bytes.fromhex("06092a864886f70d010702")  # 1.2.840.113549.1.7.2
#: szOID_CTL (certificate trust list): the content type of a catalog and of its signature
OID_CTL = bytes.fromhex("06092b0601040182370a01")  # 1.3.6.1.4.1.311.10.1
_APPX_PARTS = ("AppxManifest.xml", "AppxBlockMap.xml", "[Content_Types].xml")
_ZIP_MAGIC = b"PK\3\4"
# C0 controls a text script may hold: tab, line feed, vertical tab, form feed, carriage return
_TEXT_CONTROLS = frozenset("\t\n\v\f\r")


def _cab_problem(head: bytes, size: int) -> str | None:
    """What is wrong with a cabinet's CFHEADER (MSCF), or None."""
    if len(head) < 36:
        return "truncated CAB: the header is cut off"
    cabinet, files_at = struct.unpack_from("<I4xI", head, 8)
    minor, major, folders, files = struct.unpack_from("<BBHH", head, 24)
    if (major, minor) != (1, 3):
        return f"malformed CAB: version {major}.{minor}, not 1.3"
    if cabinet > size:
        return f"truncated CAB: the header says {cabinet} bytes, the file has {size}"
    if not folders or not files or not 36 <= files_at < cabinet:
        return f"malformed CAB: {folders} folders, {files} files, file table at {files_at}"
    return None


def der_header(data: bytes, at: int) -> tuple[int, int, int]:
    """(tag, offset of the contents, length of the contents) of the DER element at ``at``."""
    if at + 2 > len(data):
        raise ValueError("cut off")
    tag, first = data[at], data[at + 1]
    if first < 0x80:
        return tag, at + 2, first
    n = first & 0x7F
    if not 1 <= n <= 4 or at + 2 + n > len(data):
        raise ValueError("bad length")
    return tag, at + 2 + n, int.from_bytes(data[at + 2 : at + 2 + n], "big")


def _is_pkcs7_signed(head: bytes) -> bool:
    """True if ``head`` starts a DER ContentInfo of type SignedData (as osslsigncode tells a catalog)."""
    try:
        tag, body, _ = der_header(head, 0)
    except ValueError:
        return False
    return tag == 0x30 and head[body : body + len(_OID_SIGNED_DATA)] == _OID_SIGNED_DATA


def _catalog_problem(head: bytes, size: int) -> str | None:
    """What is wrong with a DER SignedData that should hold a certificate trust list, or None."""
    try:
        _, body, length = der_header(head, 0)
        if body + length > size:
            return f"truncated catalog: its DER says {body + length} bytes, the file has {size}"
        if body + length < size:
            return f"malformed catalog: {size - body - length} bytes after its DER"
        tag, at, _ = der_header(head, body + len(_OID_SIGNED_DATA))  # [0] EXPLICIT
        tag2, at, _ = der_header(head, at)  # SignedData
        if (tag, tag2) != (0xA0, 0x30):
            return "malformed catalog: no SignedData"
        for expected in (0x02, 0x31):  # version, digestAlgorithms
            tag, inner, n = der_header(head, at)
            if tag != expected:
                return "malformed catalog: unexpected SignedData layout"
            at = inner + n
        tag, at, _ = der_header(head, at)  # encapContentInfo
    except ValueError as e:
        return f"malformed catalog: bad DER ({e})"
    if tag != 0x30 or head[at : at + len(OID_CTL)] != OID_CTL:
        return "a PKCS#7 SignedData whose content is not a catalog (certificate trust list)"
    return None


def _appx_problem(path: Path) -> str | None:
    """What keeps a zip from being an APPX/MSIX package osslsigncode signs, or None."""
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
    except (*PARSE_ERRORS, OSError) as e:  # (NotImplementedError: a version zipfile cannot read)
        return f"malformed zip (APPX/MSIX package): {e}"
    missing = [p for p in _APPX_PARTS if p not in names]
    if missing:
        return f"a zip, not an APPX/MSIX package (no {', '.join(missing)})"
    return None


def _is_script_text(path: Path) -> bool:
    """True if the file is text a script can be: UTF-8 (a BOM or not) or UTF-16LE with its BOM,
    without NUL or other control characters but line breaks and tabs."""
    with path.open("rb") as f:
        first = f.read(2)
        f.seek(0)
        decoder = codecs.getincrementaldecoder("utf-16-le" if first == b"\xff\xfe" else "utf-8")()
        try:
            while chunk := f.read(1 << 20):
                text = decoder.decode(chunk)
                if any(c < " " and c not in _TEXT_CONTROLS for c in text) or "\x7f" in text:
                    return False
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return False
    return True


def authenticode_kind(path: Path) -> Kind:
    """Which kind of file Authenticode signs ``path`` as, told by its bytes alone.

    Raises :class:`FormatRejected` naming what is malformed, or saying it is none of them."""
    head, size = read_head(path)
    if is_msi_bytes(head):
        return "MSI"
    if is_pe_bytes(head):
        pe_cert_table(head, size)  # raises naming the inconsistency
        return "PE"
    problem: str | None
    if head[:4] == _CAB_MAGIC:
        kind: Kind = "CAB"
        problem = _cab_problem(head, size)
    elif _is_pkcs7_signed(head):
        kind, problem = "catalog", _catalog_problem(head, size)  # its header lies in the head
    elif head[:4] == _ZIP_MAGIC:
        kind, problem = "APPX", _appx_problem(path)
    elif size and _is_script_text(path):
        return "script"
    else:
        raise FormatRejected(
            "not a PE, MSI, CAB, catalog, APPX/MSIX package or PowerShell script (no MZ/PE, OLE, "
            "MSCF, PKCS#7 or zip header, and not UTF-8 or UTF-16 text)"
        )
    if problem is not None:
        raise FormatRejected(problem)
    return kind
