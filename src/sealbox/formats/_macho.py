"""Apple code signatures checked without the library that made them.

Parses Mach-O files (thin and fat, 32/64-bit) down to ``LC_CODE_SIGNATURE``, the SuperBlob
and its CodeDirectories; recomputes every code-page hash and the special slots (Info.plist,
requirements, CodeResources, entitlements); checks a bundle's sealed resources
(``_CodeSignature/CodeResources``) against its files, nested code by its cdhash; and verifies
the CMS signature over the primary CodeDirectory with ``openssl cms -verify`` against a CA
file, checking that its signed CDHashes attribute names every CodeDirectory and that the
signer certificate has the code-signing EKU. An RFC 3161 token in the CMS is checked with
``openssl ts -verify`` when a TSA root is given.

What it cannot check: Apple's designated-requirement language and Gatekeeper's policy
(``codesign --verify``/``spctl`` exist only on macOS).
"""

from __future__ import annotations

import functools
import hashlib
import mmap
import os
import plistlib
import re
import stat
import struct
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from .base import child_env

__all__ = [
    "BUNDLE_SUFFIXES",
    "MachOFormatError",
    "Report",
    "Slice",
    "TreeVerifier",
    "is_macho_head",
    "path_identifier",
    "read_slices",
]

FAT_MAGIC, FAT_MAGIC_64 = 0xCAFEBABE, 0xCAFEBABF
MH_MAGIC, MH_MAGIC_64 = 0xFEEDFACE, 0xFEEDFACF
LC_SEGMENT, LC_SEGMENT_64 = 0x1, 0x19
LC_ID_DYLIB = 0xD
LC_CODE_SIGNATURE = 0x1D
MH_EXECUTE = 2

CSMAGIC_EMBEDDED_SIGNATURE = 0xFADE0CC0
CSMAGIC_CODEDIRECTORY = 0xFADE0C02
CSMAGIC_BLOBWRAPPER = 0xFADE0B01
CSSLOT_CODEDIRECTORY = 0
CSSLOT_INFOSLOT = 1
CSSLOT_RESOURCEDIR = 3
CSSLOT_ALTERNATE = range(0x1000, 0x1005)
CSSLOT_SIGNATURESLOT = 0x10000
CS_ADHOC = 0x2
CS_RUNTIME = 0x10000

_HASHES = {1: ("sha1", 20), 2: ("sha256", 32), 3: ("sha256", 20), 4: ("sha384", 48)}
#: directories whose names end so are bundles (signed as a whole, with CodeResources)
BUNDLE_SUFFIXES = (".app", ".framework", ".bundle", ".plugin", ".xpc", ".appex")
_MAX_FAT_ARCHS = 32  # Java class files also start with 0xcafebabe (then a version >= 45)
_MAX_DEPTH = 16  # nested bundles inside bundles
_OID_CDHASHES = "1.2.840.113635.100.9.1"
_OID_TIMESTAMP_TOKEN = "1.2.840.113549.1.9.16.2.14"  # noqa: S105 - an OID
_OPENSSL_TIMEOUT = 60


class MachOFormatError(ValueError):
    """The bytes are not a well-formed Mach-O, or its signature structure is malformed."""


class _Bad(ValueError):
    """A check failed (the message says which)."""


# -- Mach-O structure ----------------------------------------------------------------------------
_P = ParamSpec("_P")
_R = TypeVar("_R")


def _structural(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """A read past the data (``struct.error``) is malformed input too, whatever check missed it."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return fn(*args, **kwargs)
        except struct.error as e:
            raise MachOFormatError(f"structure cut off ({e})") from None

    return wrapper


def is_macho_head(head: bytes) -> bool:
    """True if ``head`` (at least 8 bytes) starts like a Mach-O (thin or fat)."""
    if len(head) < 8:
        return False
    (be,) = struct.unpack_from(">I", head)
    if be in (FAT_MAGIC, FAT_MAGIC_64):
        (count,) = struct.unpack_from(">I", head, 4)
        return 0 < int(count) <= _MAX_FAT_ARCHS
    (le,) = struct.unpack_from("<I", head)
    return le in (MH_MAGIC, MH_MAGIC_64) or be in (MH_MAGIC, MH_MAGIC_64)


@dataclass
class Slice:
    """One architecture of a Mach-O file: where it lies and what its load commands say."""

    offset: int
    size: int
    cputype: int
    filetype: int
    #: (dataoff, datasize) of LC_CODE_SIGNATURE, relative to the slice; None if unsigned
    signature: tuple[int, int] | None
    install_name: str | None
    embedded_info_plist: tuple[int, int] | None  # (offset, size) of __TEXT,__info_plist


@_structural
def read_slices(data: bytes | mmap.mmap) -> list[Slice]:
    """Every slice of a Mach-O file; raises :class:`MachOFormatError` on malformed structure."""
    if len(data) < 8:
        raise MachOFormatError("too short for a Mach-O file")
    (magic,) = struct.unpack_from(">I", data)
    if magic not in (FAT_MAGIC, FAT_MAGIC_64):
        return [_thin(data, 0, len(data))]
    (count,) = struct.unpack_from(">I", data, 4)
    if not 0 < count <= _MAX_FAT_ARCHS:
        raise MachOFormatError(f"universal binary with {count} architectures")
    entry = 32 if magic == FAT_MAGIC_64 else 20
    if 8 + count * entry > len(data):
        raise MachOFormatError("universal binary header cut off")
    slices = []
    spans: list[tuple[int, int]] = []
    for i in range(count):
        at = 8 + i * entry
        if magic == FAT_MAGIC_64:
            _cpu, _sub, offset, size, _align, _res = struct.unpack_from(">iiQQII", data, at)
        else:
            _cpu, _sub, offset, size, _align = struct.unpack_from(">iiIII", data, at)
        if offset < 8 + count * entry or offset + size > len(data) or size == 0:
            raise MachOFormatError(f"architecture {i} lies outside the file")
        if any(offset < end and start < offset + size for start, end in spans):
            raise MachOFormatError(f"architecture {i} overlaps another")
        spans.append((offset, offset + size))
        slices.append(_thin(data, offset, size))
    return slices


def _thin(data: bytes | mmap.mmap, base: int, size: int) -> Slice:
    if size < 28:
        raise MachOFormatError("Mach-O header cut off")
    (le,) = struct.unpack_from("<I", data, base)
    (be,) = struct.unpack_from(">I", data, base)
    if le in (MH_MAGIC, MH_MAGIC_64):
        order, magic = "<", le
    elif be in (MH_MAGIC, MH_MAGIC_64):
        order, magic = ">", be
    else:
        raise MachOFormatError("no Mach-O header magic")
    header = 32 if magic == MH_MAGIC_64 else 28
    cputype, _sub, filetype, ncmds, sizeofcmds = struct.unpack_from(order + "iiIII", data, base + 4)
    if header + sizeofcmds > size or ncmds > sizeofcmds // 8:
        raise MachOFormatError("load commands run past the end of the Mach-O")
    signature = install_name = plist = None
    at, end = base + header, base + header + sizeofcmds
    for _ in range(ncmds):
        if at + 8 > end:
            raise MachOFormatError("load commands cut off")
        cmd, cmdsize = struct.unpack_from(order + "II", data, at)
        if cmdsize < 8 or at + cmdsize > end:
            raise MachOFormatError(f"load command 0x{cmd:x} has a bad size")
        if cmd == LC_CODE_SIGNATURE:
            if cmdsize < 16 or signature is not None:
                raise MachOFormatError("malformed or repeated LC_CODE_SIGNATURE")
            dataoff, datasize = struct.unpack_from(order + "II", data, at + 8)
            if dataoff + datasize > size or dataoff < header + sizeofcmds:
                raise MachOFormatError("the code signature lies outside the Mach-O")
            signature = (dataoff, datasize)
        elif cmd == LC_ID_DYLIB and cmdsize >= 24:
            (name_off,) = struct.unpack_from(order + "I", data, at + 8)
            if 24 <= name_off < cmdsize:
                raw = bytes(data[at + name_off : at + cmdsize]).split(b"\0", 1)[0]
                install_name = raw.decode("utf-8", "replace")
        elif cmd in (LC_SEGMENT, LC_SEGMENT_64):
            plist = _info_plist_section(data, order, cmd == LC_SEGMENT_64, at, cmdsize, size) or plist
        at += cmdsize
    return Slice(base, size, cputype, filetype, signature, install_name, plist)


def _info_plist_section(
    data: bytes | mmap.mmap, order: str, is64: bool, at: int, cmdsize: int, size: int
) -> tuple[int, int] | None:
    if is64:
        seg_fmt, sect_fmt = order + "16s4Q2i2I", order + "16s16s2Q7I"
    else:
        seg_fmt, sect_fmt = order + "16s4I2i2I", order + "16s16s9I"
    seg_size, sect_size = struct.calcsize(seg_fmt), struct.calcsize(sect_fmt)
    if cmdsize < 8 + seg_size:
        return None
    segname, *_rest, nsects, _flags = struct.unpack_from(seg_fmt, data, at + 8)
    if segname.rstrip(b"\0") != b"__TEXT" or 8 + seg_size + nsects * sect_size > cmdsize:
        return None
    for i in range(nsects):
        fields = struct.unpack_from(sect_fmt, data, at + 8 + seg_size + i * sect_size)
        if fields[0].rstrip(b"\0") == b"__info_plist":
            sect_bytes, offset = fields[3], fields[4]
            if offset + sect_bytes > size:
                raise MachOFormatError("__info_plist lies outside the Mach-O")
            return offset, sect_bytes
    return None


def path_identifier(name: str) -> str:
    """rcodesign's identifier for a file name: the name without its last extension,
    unless that extension is numeric (``libfoo.1.dylib`` -> ``libfoo.1``)."""
    stem, dot, ext = name.rpartition(".")
    return stem if dot and stem and not ext.isdigit() else name


# -- SuperBlob and CodeDirectory -------------------------------------------------------------------


@dataclass
class CodeDirectory:
    slot: int
    blob: bytes
    flags: int
    hash_offset: int
    identifier: str
    n_special: int
    n_code: int
    code_limit: int
    hash_size: int
    hash_type: int
    page_shift: int

    def slot_hash(self, index: int) -> bytes:
        """The hash stored for code page ``index`` (negative: special slot ``-index``)."""
        at = self.hash_offset + index * self.hash_size
        return self.blob[at : at + self.hash_size]

    def digest(self, data: bytes | memoryview) -> bytes:
        name, size = _HASHES[self.hash_type]
        return hashlib.new(name, data).digest()[:size]

    @property
    def cdhash(self) -> bytes:
        """The CodeDirectory's own hash, truncated to 20 bytes (what CMS CDHashes list)."""
        return self.digest(self.blob)[:20]


@_structural
def parse_superblob(sig: bytes) -> dict[int, bytes]:
    """Blob type -> blob bytes (header included) of an embedded-signature SuperBlob."""
    if len(sig) < 12:
        raise MachOFormatError("code signature cut off")
    magic, length, count = struct.unpack_from(">III", sig)
    if magic != CSMAGIC_EMBEDDED_SIGNATURE:
        raise MachOFormatError(f"code signature has magic 0x{magic:08x}, not a SuperBlob")
    if length > len(sig) or 12 + 8 * count > length:
        raise MachOFormatError("SuperBlob length is inconsistent")
    blobs: dict[int, bytes] = {}
    for i in range(count):
        kind, offset = struct.unpack_from(">II", sig, 12 + 8 * i)
        if offset + 8 > length:
            raise MachOFormatError(f"blob {kind:#x} lies outside the SuperBlob")
        _m, blob_len = struct.unpack_from(">II", sig, offset)
        if blob_len < 8 or offset + blob_len > length or kind in blobs:
            raise MachOFormatError(f"blob {kind:#x} is malformed or repeated")
        blobs[kind] = sig[offset : offset + blob_len]
    return blobs


@_structural
def parse_code_directory(slot: int, blob: bytes) -> CodeDirectory:
    if len(blob) < 44:
        raise MachOFormatError("CodeDirectory cut off")
    magic, length, version, flags, hash_offset, ident_offset, n_special, n_code, code_limit = (
        struct.unpack_from(">9I", blob)
    )
    hash_size, hash_type, _platform, page_shift = struct.unpack_from(">4B", blob, 36)
    if magic != CSMAGIC_CODEDIRECTORY:
        raise MachOFormatError(f"slot {slot:#x} is not a CodeDirectory")
    if version >= 0x20300 and len(blob) >= 64:
        (limit64,) = struct.unpack_from(">Q", blob, 56)
        code_limit = limit64 or code_limit
    if hash_type not in _HASHES or _HASHES[hash_type][1] != hash_size:
        raise MachOFormatError(f"CodeDirectory with unknown hash type {hash_type} / size {hash_size}")
    if hash_offset < n_special * hash_size or hash_offset + n_code * hash_size > length:
        raise MachOFormatError("CodeDirectory hash slots lie outside it")
    if not 0 < ident_offset < length:
        raise MachOFormatError("CodeDirectory identifier lies outside it")
    identifier = blob[ident_offset:length].split(b"\0", 1)[0].decode("utf-8", "replace")
    return CodeDirectory(
        slot,
        blob,
        flags,
        hash_offset,
        identifier,
        n_special,
        n_code,
        code_limit,
        hash_size,
        hash_type,
        page_shift,
    )


@_structural
def existing_identifier(data: bytes | mmap.mmap) -> str | None:
    """The identifier in an existing code signature (ld64 writes an ad-hoc one naming the output
    file, for arm64 at least), else the dylib install name's file name; None if neither."""
    slices = read_slices(data)
    for sl in slices:
        if sl.signature is not None:
            off, size = sl.signature
            blobs = parse_superblob(bytes(data[sl.offset + off : sl.offset + off + size]))
            if CSSLOT_CODEDIRECTORY in blobs:
                ident = parse_code_directory(CSSLOT_CODEDIRECTORY, blobs[CSSLOT_CODEDIRECTORY]).identifier
                if ident:
                    return ident
    for sl in slices:
        if sl.install_name:
            return path_identifier(sl.install_name.rsplit("/", 1)[-1]) or None
    return None


# -- minimal DER reading (the CMS signer's attributes) ------------------------------------------


@dataclass(frozen=True)
class _Der:
    tag: int
    head: int  # where the element starts
    start: int  # where its content starts
    end: int


def _element(der: bytes, at: int, limit: int) -> _Der:
    if at + 2 > limit:
        raise _Bad("CMS: DER element cut off")
    tag, first = der[at], der[at + 1]
    start = at + 2
    if first < 0x80:
        length = first
    else:
        n = first & 0x7F
        if not 0 < n <= 4 or start + n > limit:
            raise _Bad("CMS: bad DER length")
        length = int.from_bytes(der[start : start + n], "big")
        start += n
    if start + length > limit:
        raise _Bad("CMS: DER element runs past its parent")
    return _Der(tag, at, start, start + length)


def _children(der: bytes, parent: _Der) -> list[_Der]:
    out, at = [], parent.start
    while at < parent.end:
        child = _element(der, at, parent.end)
        out.append(child)
        at = child.end
    return out


def _oid(raw: bytes) -> str:
    if not raw:
        raise _Bad("CMS: empty OID")
    first = min(raw[0] // 40, 2)
    parts, value = [first, raw[0] - 40 * first], 0
    for b in raw[1:]:
        value = (value << 7) | (b & 0x7F)
        if not b & 0x80:
            parts.append(value)
            value = 0
    return ".".join(map(str, parts))


@dataclass
class _SignerInfo:
    signed: dict[str, list[bytes]]  # attribute OID -> DER of each value
    unsigned: dict[str, list[bytes]]
    signature: bytes


def _attributes(der: bytes, node: _Der) -> dict[str, list[bytes]]:
    out: dict[str, list[bytes]] = {}
    for attr in _children(der, node):
        parts = _children(der, attr) if attr.tag == 0x30 else []
        if len(parts) != 2 or parts[0].tag != 0x06 or parts[1].tag != 0x31:
            raise _Bad("CMS: malformed attribute")
        values = [der[v.head : v.end] for v in _children(der, parts[1])]
        out.setdefault(_oid(der[parts[0].start : parts[0].end]), []).extend(values)
    return out


def _signer_infos(der: bytes) -> list[_SignerInfo]:
    """The SignerInfos of a DER ContentInfo holding SignedData."""
    top = _element(der, 0, len(der))
    info = _children(der, top) if top.tag == 0x30 else []
    if len(info) != 2 or info[1].tag != 0xA0:
        raise _Bad("CMS: not a ContentInfo")
    signed_data = _children(der, info[1])
    fields = _children(der, signed_data[0]) if signed_data and signed_data[0].tag == 0x30 else []
    if not fields or fields[-1].tag != 0x31:
        raise _Bad("CMS: SignedData without signerInfos")
    out = []
    for si in _children(der, fields[-1]):
        signed: dict[str, list[bytes]] = {}
        unsigned: dict[str, list[bytes]] = {}
        signature = b""
        for part in _children(der, si) if si.tag == 0x30 else []:
            if part.tag == 0xA0:
                signed = _attributes(der, part)
            elif part.tag == 0xA1:
                unsigned = _attributes(der, part)
            elif part.tag == 0x04:
                signature = der[part.start : part.end]
        out.append(_SignerInfo(signed, unsigned, signature))
    return out


def _octets(value: bytes) -> bytes:
    node = _element(value, 0, len(value))
    if node.tag != 0x04:
        raise _Bad("CMS: attribute value is not an OCTET STRING")
    return value[node.start : node.end]


# -- the verifier ------------------------------------------------------------------------------


@dataclass
class Report:
    """What a verification covered."""

    macho_files: int = 0
    slices: int = 0
    bundles: int = 0
    executables: int = 0
    hardened: int = 0  # executables with the hardened-runtime flag
    timestamps: int = 0  # slices whose CMS carries an RFC 3161 token
    timestamps_verified: int = 0

    def summary(self) -> str:
        ts = f"{self.timestamps} timestamped ({self.timestamps_verified} checked with openssl ts -verify)"
        return (
            f"{self.macho_files} Mach-O ({self.slices} slices), {self.bundles} bundles; "
            f"hardened runtime on {self.hardened}/{self.executables} executables; {ts}"
        )


def _digest(name: str, size: int, data: bytes | memoryview) -> bytes:
    return hashlib.new(name, data).digest()[:size]


class TreeVerifier:
    """Checks signed Mach-O files and bundles against ``ca_file`` (see the module docstring).

    Its methods raise :class:`ValueError` naming the first check that failed."""

    def __init__(self, ca_file: Path, tsa_ca_file: Path | None = None) -> None:
        self.ca_file = ca_file
        self.tsa_ca_file = tsa_ca_file
        self.report = Report()
        self._tmp = Path(tempfile.mkdtemp(prefix="sbmacho"))
        self._rules: dict[str, re.Pattern[str]] = {}

    def close(self) -> None:
        for p in self._tmp.iterdir():
            p.unlink()
        self._tmp.rmdir()

    def __enter__(self) -> TreeVerifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- entry points ------------------------------------------------------------------------
    def verify_tree(self, root: Path) -> Report:
        """Every bundle and every bare Mach-O under ``root`` (links are not followed)."""
        found = False
        stack = [root]
        while stack:
            d = stack.pop()
            for entry in sorted(os.scandir(d), key=lambda e: e.name):
                p = Path(entry.path)
                label = p.relative_to(root).as_posix()
                if entry.is_symlink():
                    continue
                if entry.is_dir():
                    if entry.name.endswith(BUNDLE_SUFFIXES):
                        self._bundle(p, label, 0)
                        found = True
                    else:
                        stack.append(p)
                elif entry.is_file() and _head_is_macho(p):
                    self._macho(p, label, None, None)
                    found = True
        if not found:
            raise ValueError("no bundle or Mach-O file in the tree")
        return self.report

    def verify_file(self, path: Path) -> Report:
        """One bare Mach-O file."""
        self._macho(path, path.name, None, None)
        return self.report

    # -- Mach-O --------------------------------------------------------------------------------
    def _macho(self, path: Path, label: str, info_plist: bytes | None, resources: bytes | None) -> set[bytes]:
        """Verify every slice; return the cdhash candidates of the first slice."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise _Bad(f"{label}: missing") from None
        if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
            raise _Bad(f"{label}: not a regular, non-empty file")
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            try:
                slices = read_slices(mm)
            except MachOFormatError as e:
                raise _Bad(f"{label}: {e}") from None
            cdhashes: set[bytes] = set()
            executable = hardened = False
            for i, sl in enumerate(slices):
                where = f"{label} (slice {i})" if len(slices) > 1 else label
                cds = self._slice(mm, sl, where, info_plist, resources)
                if i == 0:
                    # CodeResources names nested code by a 20-byte hash of its preferred CodeDirectory
                    cdhashes = {hashlib.sha256(cd.blob).digest()[:20] for cd in cds} | {
                        cd.cdhash for cd in cds
                    }
                if sl.filetype == MH_EXECUTE:
                    hardened = (hardened or not executable) and bool(cds[0].flags & CS_RUNTIME)
                    executable = True
        self.report.executables += executable
        self.report.hardened += hardened
        self.report.macho_files += 1
        self.report.slices += len(slices)
        return cdhashes

    def _slice(
        self, mm: mmap.mmap, sl: Slice, label: str, info_plist: bytes | None, resources: bytes | None
    ) -> list[CodeDirectory]:
        if sl.signature is None:
            raise _Bad(f"{label}: not signed (no LC_CODE_SIGNATURE)")
        off, size = sl.signature
        sig = bytes(mm[sl.offset + off : sl.offset + off + size])
        try:
            blobs = parse_superblob(sig)
            slots = [CSSLOT_CODEDIRECTORY, *CSSLOT_ALTERNATE]
            cds = [parse_code_directory(k, blobs[k]) for k in slots if k in blobs]
        except MachOFormatError as e:
            raise _Bad(f"{label}: {e}") from None
        if not cds or cds[0].slot != CSSLOT_CODEDIRECTORY:
            raise _Bad(f"{label}: no primary CodeDirectory")
        if any(sig[struct.unpack_from(">I", sig, 4)[0] :]):
            raise _Bad(f"{label}: bytes after the signature's SuperBlob are not zero padding")
        if len({(cd.identifier, cd.flags) for cd in cds}) != 1:
            raise _Bad(f"{label}: the CodeDirectories disagree on identifier or flags")
        if cds[0].flags & CS_ADHOC:
            raise _Bad(f"{label}: ad-hoc signature (no signing identity)")
        embedded = None
        if info_plist is None and sl.embedded_info_plist is not None:
            p_off, p_size = sl.embedded_info_plist
            embedded = bytes(mm[sl.offset + p_off : sl.offset + p_off + p_size])
        sealed_plist = info_plist if info_plist is not None else embedded
        with memoryview(mm) as whole, whole[sl.offset : sl.offset + sl.size] as view:
            for cd in cds:
                self._code_pages(cd, view, off, label)
                self._special_slots(cd, blobs, sealed_plist, resources, label)
        covered = set(slots) | {CSSLOT_SIGNATURESLOT} | set(range(1, cds[0].n_special + 1))
        extra = sorted(set(blobs) - covered)
        if extra:
            raise _Bad(f"{label}: signature blob {extra[0]:#x} is not covered by the CodeDirectory")
        self._cms(blobs.get(CSSLOT_SIGNATURESLOT), cds, label)
        return cds

    @staticmethod
    def _code_pages(cd: CodeDirectory, view: memoryview, sig_offset: int, label: str) -> None:
        name, size = _HASHES[cd.hash_type]
        if cd.code_limit != sig_offset:
            raise _Bad(
                f"{label}: the {name} CodeDirectory covers {cd.code_limit} bytes, not up to the signature"
            )
        page = 1 << cd.page_shift if cd.page_shift else cd.code_limit
        pages = -(-cd.code_limit // page)
        if cd.n_code != pages:
            raise _Bad(f"{label}: the {name} CodeDirectory has {cd.n_code} page hashes for {pages} pages")
        for i in range(pages):
            with view[i * page : min((i + 1) * page, cd.code_limit)] as chunk:
                ok = _digest(name, size, chunk) == cd.slot_hash(i)
            if not ok:
                raise _Bad(f"{label}: code page {i} (bytes {i * page}..) does not match its {name} hash")

    @staticmethod
    def _special_slots(
        cd: CodeDirectory,
        blobs: dict[int, bytes],
        info_plist: bytes | None,
        resources: bytes | None,
        label: str,
    ) -> None:
        names = {
            1: "Info.plist",
            2: "requirements",
            3: "CodeResources",
            5: "entitlements",
            7: "DER entitlements",
        }
        if resources is not None and cd.n_special < CSSLOT_RESOURCEDIR:
            raise _Bad(f"{label}: the signature does not seal the bundle's Info.plist and CodeResources")
        for k in range(1, cd.n_special + 1):
            stored = cd.slot_hash(-k)
            expected = (
                info_plist if k == CSSLOT_INFOSLOT else resources if k == CSSLOT_RESOURCEDIR else blobs.get(k)
            )
            what = names.get(k, f"special slot {k}")
            if expected is None:
                if any(stored):
                    raise _Bad(f"{label}: the signature seals a {what} that is not there")
            elif not any(stored):
                raise _Bad(f"{label}: the {what} is not sealed by the signature")
            elif cd.digest(expected) != stored:
                raise _Bad(f"{label}: the {what} does not match its hash in the signature")

    # -- CMS -------------------------------------------------------------------------------------
    def _cms(self, wrapper: bytes | None, cds: list[CodeDirectory], label: str) -> None:
        if wrapper is None or len(wrapper) <= 8:
            raise _Bad(f"{label}: no CMS signature (ad-hoc signed)")
        (magic,) = struct.unpack_from(">I", wrapper)
        if magic != CSMAGIC_BLOBWRAPPER:
            raise _Bad(f"{label}: the CMS slot holds blob 0x{magic:08x}")
        body = wrapper[8:]
        top = _element(body, 0, len(body))
        der = body[: top.end]  # the wrapper may be padded
        infos = _signer_infos(der)
        if len(infos) != 1:
            raise _Bad(f"{label}: the CMS has {len(infos)} signers, expected 1")
        (si,) = infos
        (self._tmp / "cms.der").write_bytes(der)
        (self._tmp / "cd.bin").write_bytes(cds[0].blob)
        argv = [
            "openssl", "cms", "-verify", "-binary", "-inform", "DER", "-in", str(self._tmp / "cms.der"),
            "-content", str(self._tmp / "cd.bin"), "-CAfile", str(self.ca_file), "-purpose", "any",
            "-signer", str(self._tmp / "signer.pem"), "-out", os.devnull,
        ]  # fmt: skip
        res = _openssl(argv)
        if res.returncode != 0:
            raise _Bad(f"{label}: openssl cms -verify: {_last(res)}")
        signer = x509.load_pem_x509_certificate((self._tmp / "signer.pem").read_bytes())
        try:
            ekus = signer.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            ekus = None
        if ekus is None or ExtendedKeyUsageOID.CODE_SIGNING not in ekus:
            raise _Bad(f"{label}: the signer certificate has no code-signing extended key usage")
        # The CMS signs the primary CodeDirectory only; its CDHashes attribute binds the others.
        values = si.signed.get(_OID_CDHASHES)
        if not values:
            raise _Bad(f"{label}: the CMS has no CDHashes attribute")
        try:
            listed = plistlib.loads(_octets(values[0])).get("cdhashes")
        except (plistlib.InvalidFileException, ValueError, AttributeError) as e:
            raise _Bad(f"{label}: unreadable CDHashes attribute: {e}") from None
        if listed != [cd.cdhash for cd in cds]:
            raise _Bad(f"{label}: the signed CDHashes do not match the CodeDirectories")
        tokens = si.unsigned.get(_OID_TIMESTAMP_TOKEN, [])
        if tokens:
            self.report.timestamps += 1
            if self.tsa_ca_file is not None:
                self._timestamp(tokens[0], si.signature, label)

    def _timestamp(self, token: bytes, signature: bytes, label: str) -> None:
        """The token's message imprint covers the SignerInfo's signature value."""
        (self._tmp / "token.der").write_bytes(token)
        (self._tmp / "signature.bin").write_bytes(signature)
        assert self.tsa_ca_file is not None
        argv = [
            "openssl", "ts", "-verify", "-token_in", "-in", str(self._tmp / "token.der"),
            "-data", str(self._tmp / "signature.bin"), "-CAfile", str(self.tsa_ca_file),
        ]  # fmt: skip
        res = _openssl(argv)
        if res.returncode != 0 or b"Verification: OK" not in res.stdout:
            raise _Bad(f"{label}: openssl ts -verify of the timestamp: {_last(res)}")
        self.report.timestamps_verified += 1

    # -- bundles ---------------------------------------------------------------------------------
    def _bundle(self, d: Path, label: str, depth: int) -> set[bytes]:
        """Verify a bundle folder; return the cdhash candidates of its main executable."""
        if depth > _MAX_DEPTH:
            raise _Bad(f"{label}: bundles nested more than {_MAX_DEPTH} deep")
        if _real_dir(d / "Versions"):
            return self._framework(d, label, depth)
        if _real_dir(d / "Contents"):
            return self._bundle_root(d / "Contents", f"{label}/Contents", depth)
        return self._bundle_root(d, label, depth)

    def _framework(self, d: Path, label: str, depth: int) -> set[bytes]:
        """A versioned framework: every version is a bundle; the rest are links into Versions."""
        current = d / "Versions" / "Current"
        if not current.is_symlink():
            raise _Bad(f"{label}: Versions/Current is not a symbolic link")
        main: set[bytes] | None = None
        for entry in sorted(os.scandir(d / "Versions"), key=lambda e: e.name):
            if entry.is_symlink():
                _check_inside(Path(entry.path), d, label)
            elif entry.is_dir():
                got = self._bundle_root(Path(entry.path), f"{label}/Versions/{entry.name}", depth)
                if entry.name == os.readlink(current).rstrip("/"):
                    main = got
            else:
                raise _Bad(f"{label}: Versions/{entry.name} is not sealed by any signature")
        with os.scandir(d) as entries:
            for entry in entries:
                if entry.name != "Versions":
                    if not entry.is_symlink():
                        raise _Bad(f"{label}: {entry.name} is not sealed by any signature")
                    _check_inside(Path(entry.path), d, label)
        if main is None:
            raise _Bad(f"{label}: Versions/Current does not name a version folder")
        return main

    def _bundle_root(self, root: Path, label: str, depth: int) -> set[bytes]:
        """A bundle's signed folder (``X.app/Contents``, ``X.framework/Versions/A``...);
        ``label`` names it in messages."""
        info_path = root / "Info.plist"
        if not _real_file(info_path):
            info_path = root / "Resources" / "Info.plist"
        if not _real_file(info_path):
            raise _Bad(f"{label}: no Info.plist")
        info_bytes = info_path.read_bytes()
        try:
            info = plistlib.loads(info_bytes)
        except Exception as e:  # plistlib raises expat, value and type errors on bad input
            raise _Bad(f"{label}: unreadable Info.plist: {e}") from None
        exe_name = info.get("CFBundleExecutable") if isinstance(info, dict) else None
        if not isinstance(exe_name, str) or not exe_name or "/" in exe_name:
            raise _Bad(f"{label}: Info.plist names no CFBundleExecutable")
        exe = root / "MacOS" / exe_name if root.name == "Contents" else root / exe_name
        seal_path = root / "_CodeSignature" / "CodeResources"
        if not _real_file(seal_path):
            raise _Bad(f"{label}: not signed (no _CodeSignature/CodeResources)")
        resources = seal_path.read_bytes()
        main = self._macho(exe, f"{label}/{exe.relative_to(root).as_posix()}", info_bytes, resources)
        try:
            seal = plistlib.loads(resources)
        except Exception as e:  # plistlib raises expat, value and type errors on bad input
            raise _Bad(f"{label}: unreadable CodeResources: {e}") from None
        files2, rules2 = seal.get("files2"), seal.get("rules2")
        if not isinstance(files2, dict) or not isinstance(rules2, dict):
            raise _Bad(f"{label}: CodeResources has no files2/rules2")
        self._sealed_files(root, files2, label, depth)
        legacy = seal.get("files", {})
        for rel, entry in legacy.items() if isinstance(legacy, dict) else ():
            digest = entry.get("hash") if isinstance(entry, dict) else entry
            p = root / rel
            if isinstance(digest, bytes) and _real_file(p) and _sha1(p.read_bytes()) != digest:
                raise _Bad(f"{label}: {rel} does not match its hash in CodeResources (files)")
        self._unsealed(root, exe, files2, rules2, label)
        self.report.bundles += 1
        return main

    def _sealed_files(self, root: Path, files2: dict[str, Any], label: str, depth: int) -> None:
        for rel, raw in files2.items():
            parts = rel.split("/")
            if not rel or rel.startswith("/") or ".." in parts:
                raise _Bad(f"{label}: CodeResources names {rel!r}, outside the bundle")
            p, where = root / rel, f"{label}/{rel}"
            entry = raw if isinstance(raw, dict) else {"hash": raw}
            if "cdhash" in entry:
                if _real_dir(p):
                    found = self._bundle(p, where, depth + 1)
                elif _real_file(p):
                    found = self._macho(p, where, None, None)
                else:
                    raise _Bad(f"{where}: nested code named in CodeResources is missing")
                if entry["cdhash"] not in found:
                    raise _Bad(f"{where}: nested code does not match its cdhash in CodeResources")
            elif "symlink" in entry:
                if not p.is_symlink() or os.readlink(p) != entry["symlink"]:
                    raise _Bad(f"{where}: symbolic link differs from CodeResources")
            else:
                if not _real_file(p):
                    if entry.get("optional") and not os.path.lexists(p):
                        continue
                    raise _Bad(f"{where}: sealed file is missing")
                data = p.read_bytes()
                want = entry.get("hash2")
                got = hashlib.sha256(data).digest() if want is not None else _sha1(data)
                if got != (want if want is not None else entry.get("hash")):
                    raise _Bad(f"{where}: resource does not match its hash in CodeResources")
                if is_macho_head(data[:8]):  # notarization: no unsigned code, even among resources
                    self._macho(p, where, None, None)

    def _unsealed(
        self, root: Path, exe: Path, files2: dict[str, Any], rules2: dict[str, Any], label: str
    ) -> None:
        """Every file and link under ``root`` is sealed, omitted by a rule, or the signature itself."""
        stack = [root]
        while stack:
            d = stack.pop()
            with os.scandir(d) as entries:  # closed at once when an unsealed file stops the walk
                for entry in entries:
                    p = Path(entry.path)
                    rel = p.relative_to(root).as_posix()
                    # a stapled notarization ticket is Contents/CodeResources: outside the seal by design
                    if rel in ("_CodeSignature", "CodeResources") or p == exe or rel in files2:
                        continue
                    if self._rule(rules2, rel).get("omit"):
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(p)
                    else:
                        raise _Bad(f"{label}/{rel}: not sealed in CodeResources (added after signing?)")

    def _rule(self, rules: dict[str, Any], rel: str) -> dict[str, Any]:
        """The highest-weight rule whose pattern matches ``rel`` (Apple's resource rules)."""
        best: tuple[float, dict[str, Any]] = (-1.0, {})
        for pattern, value in rules.items():
            compiled = self._rules.get(pattern)
            if compiled is None:
                compiled = self._rules[pattern] = re.compile(pattern)
            if compiled.search(rel):
                rule = value if isinstance(value, dict) else {}
                weight = float(rule.get("weight", 1))
                if weight > best[0]:
                    best = (weight, rule)
        return best[1]


def _sha1(data: bytes) -> bytes:
    return hashlib.sha1(data).digest()  # noqa: S324 - Apple's format still lists SHA-1 hashes


def _real_dir(p: Path) -> bool:
    return p.is_dir() and not p.is_symlink()


def _real_file(p: Path) -> bool:
    return p.is_file() and not p.is_symlink()


def _check_inside(link: Path, top: Path, label: str) -> None:
    target = os.readlink(link)
    resolved = os.path.normpath(os.path.join(link.parent, target))
    if target.startswith("/") or not Path(resolved).is_relative_to(top):
        raise _Bad(f"{label}: link {link.name} -> {target} points outside the framework")


def _head_is_macho(p: Path) -> bool:
    with p.open("rb") as f:
        return is_macho_head(f.read(8))


def _openssl(argv: list[str]) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=False,
            env=child_env(),
            timeout=_OPENSSL_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        raise _Bad(f"{argv[0]} {argv[1]} timed out") from None


def _last(res: subprocess.CompletedProcess[bytes]) -> str:
    lines = [ln for ln in (res.stderr + res.stdout).decode(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:300] if lines else f"exit status {res.returncode}"
