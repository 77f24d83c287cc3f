"""APPX/MSIX packages signed in-process, byte for byte what ``osslsigncode sign`` (2.9,
``appx.c``) writes.

osslsigncode re-lays the zip out: the local records of every member but ``AppxSignature.p7x``,
in the order of their offsets, each written back from its parsed header (a data descriptor's
header fields zeroed, the descriptor rewritten with its signature, 64-bit sizes in a ZIP64
package) with its compressed data copied as is; then the new signature member (``PKCX`` and the
DER PKCS#7, deflated at level 8, no extra field, stamped with the local time); then the central
directory rebuilt from its parsed entries (the extra field reduced to the ZIP64 values) and the
end records (disk numbers 0). ``[Content_Types].xml`` gains ``<Override PartName=
"/AppxSignature.p7x" .../>`` before ``</Types>`` unless it has it, re-deflated (level 8).

The digest is the block map's hash (``HashMethod``: SHA-256, 384 or 512) of five parts, each
behind its tag, after ``APPX``: ``AXPC`` the local records as written (without the signature
member), ``AXCD`` the central directory and end records as they would be without the signature
member, ``AXCT`` ``[Content_Types].xml`` and ``AXBM`` ``AppxBlockMap.xml`` uncompressed, and
``AXCI`` ``AppxMetadata/CodeIntegrity.cat`` when there is one. It goes into an
``SpcIndirectDataContent`` of type ``SpcSipInfo`` (1.3.6.1.4.1.311.2.1.30: the APPX or, with an
``AppxMetadata/AppxBundleManifest.xml``, the bundle SIP's GUID), signed by :data:`._pe.Sign`.

Where osslsigncode's output would be broken this writes a sound one instead: a stored
``[Content_Types].xml`` stays stored (osslsigncode deflates it but leaves the method "stored"),
and offsets are those written (osslsigncode shifts the input's, wrong after a gap or an old
signature that was not the last member). Refused: what osslsigncode refuses (a zip comment, a
multi-disk archive, a missing data descriptor signature, a block map without a known hash
method, ...), local headers that disagree with the central directory, overlapping members, extra
fields other than the ZIP64 values (osslsigncode drops them from the central directory, so its
digest would not be the file's), and packages whose signature would lie past 4 GiB.
"""

from __future__ import annotations

import hashlib
import os
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..errors import FormatRejected
from ..hashing import copy_hashed
from ._cms import NULL, SEQUENCE, oid, tlv
from ._pe import SPC_INDIRECT_DATA, SPC_SIPINFO, Sign, sip_info, spc_indirect_data

__all__ = ["indirect_data", "sign_appx"]

_APPX_SIP = bytes.fromhex("4BDFC50A07CEE24DB76E23C839A09FD1")
_BUNDLE_SIP = bytes.fromhex("B3585F0FDEAA9A4BA43495742D92ECEB")

SIGNATURE_MEMBER = b"AppxSignature.p7x"
CONTENT_TYPES = b"[Content_Types].xml"
BLOCK_MAP = b"AppxBlockMap.xml"
_BUNDLE_MANIFEST = b"AppxMetadata/AppxBundleManifest.xml"
_CODE_INTEGRITY = b"AppxMetadata/CodeIntegrity.cat"
_CT_SIGNATURE = b'<Override PartName="/AppxSignature.p7x" ContentType="application/vnd.ms-appx.signature"/>'
_CT_CLOSE = b"</Types>"

#: the block map's HashMethod -> (hashlib name, DER of the algorithm's OID)
_HASH_METHODS = {
    b"http://www.w3.org/2001/04/xmlenc#sha256": ("sha256", oid("2.16.840.1.101.3.4.2.1")),
    b"http://www.w3.org/2001/04/xmldsig-more#sha384": ("sha384", oid("2.16.840.1.101.3.4.2.2")),
    b"http://www.w3.org/2001/04/xmlenc#sha512": ("sha512", oid("2.16.840.1.101.3.4.2.3")),
}

_LOCAL, _CENTRAL, _DESCRIPTOR = b"PK\3\4", b"PK\1\2", b"PK\7\x08"
_END, _END64, _LOCATOR64 = b"PK\5\6", b"PK\6\6", b"PK\6\7"
_STORED, _DEFLATED = 0, 8
_HAS_DESCRIPTOR = 0x0008
_U16, _U32 = 0xFFFF, 0xFFFFFFFF
_METADATA_LIMIT = 256 << 20  # [Content_Types].xml, the block map and the catalog are read whole


@dataclass
class _Member:
    """One member: its central directory entry and its local header, as read."""

    index: int  # in the central directory, for reasons (never the name: client bytes)
    name: bytes
    central: tuple[int, ...]  # creator, viewer, flags, method, time, date
    crc: int
    csize: int
    usize: int
    extra_len: int
    comment: bytes
    disk: int
    attributes: tuple[int, int]  # internal, external
    offset: int
    zip64: tuple[bool, bool, bool, bool]  # usize, csize, offset, disk in the ZIP64 extra field
    local: tuple[int, ...] = ()  # version, flags, method, time, date
    local_extra: bytes = b""
    local_zip64: tuple[bool, bool] = (False, False)  # usize, csize in the local ZIP64 field
    data_at: int = 0


@dataclass
class _Zip:
    members: list[_Member]  # by offset
    #: the ZIP64 end record's version made by, needed, disk numbers, extensible data; the
    #: locator's disk numbers; or None for a package without ZIP64 end records
    zip64: tuple[int, int, int, int, bytes, int, int] | None
    #: which of the end record's counts, size and offset were 0xFFFF(FFFF): written so again
    saturated: tuple[bool, bool, bool, bool]

    def find(self, name: bytes) -> _Member | None:
        return next((m for m in self.members if m.name == name), None)

    def need(self, name: bytes) -> _Member:
        m = self.find(name)
        if m is None:
            raise FormatRejected(f"not an APPX/MSIX package: no {name.decode()}")
        return m


def _read(f: BinaryIO, n: int, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise FormatRejected(f"truncated APPX/MSIX package: {what} is cut off")
    return data


def _end_records(f: BinaryIO, size: int) -> tuple[_Zip, int, int]:
    """The end records: (the package less its members, where the central directory starts,
    how many entries it has)."""
    if size < 22:
        raise FormatRejected("truncated APPX/MSIX package: no end of central directory record")
    f.seek(size - 22)
    end = _read(f, 22, "the end of central directory record")
    if end[:4] != _END or end[20:22] != b"\0\0":
        raise FormatRejected(
            "malformed APPX/MSIX package: no end of central directory record in its last 22 bytes "
            "(a zip comment?)"
        )
    disk_entries, total, cd_size, cd_offset = struct.unpack_from("<HHII", end, 8)
    saturated = (disk_entries == _U16, total == _U16, cd_size == _U32, cd_offset == _U32)
    zip64 = None
    count = total
    if _U32 in (cd_size, cd_offset):
        if size < 42:
            raise FormatRejected("truncated APPX/MSIX package: no ZIP64 end of central directory locator")
        f.seek(size - 42)
        locator = _read(f, 20, "the ZIP64 locator")
        if locator[:4] != _LOCATOR64:
            raise FormatRejected("malformed APPX/MSIX package: no ZIP64 end of central directory locator")
        loc_disk, end64_at, disks = struct.unpack_from("<IQI", locator, 4)
        if end64_at >= size:
            raise FormatRejected(
                f"malformed APPX/MSIX package: the ZIP64 end record is at {end64_at}, past the end"
            )
        f.seek(end64_at)
        rec = _read(f, 56, "the ZIP64 end of central directory record")
        if rec[:4] != _END64:
            raise FormatRejected("malformed APPX/MSIX package: no ZIP64 end of central directory record")
        rec_size, made_by, needed, disk, cd_disk, disk_entries64, count, _, cd_offset = struct.unpack_from(
            "<QHHIIQQQQ", rec, 4
        )
        if not 44 <= rec_size <= 44 + _U16:
            raise FormatRejected(f"malformed APPX/MSIX package: ZIP64 end record of {rec_size} bytes")
        if disk > 1 or cd_disk != disk or disk_entries64 != count:
            raise FormatRejected("multi-disk zip: an APPX/MSIX package is one file")
        zip64 = (
            made_by,
            needed,
            disk,
            cd_disk,
            _read(f, rec_size - 44, "the ZIP64 end record"),
            loc_disk,
            disks,
        )
    if cd_offset >= size:
        raise FormatRejected(
            f"malformed APPX/MSIX package: the central directory is at {cd_offset}, past the end"
        )
    if not count:
        raise FormatRejected("malformed APPX/MSIX package: an empty central directory")
    return _Zip([], zip64, saturated), cd_offset, count


def _zip64_values(extra: bytes, wanted: tuple[bool, bool, bool, bool], what: str) -> list[int]:
    """The values a ZIP64 extra field holds for the ``wanted`` fields (usize, csize, offset,
    disk), read as osslsigncode reads them (the first field of the extra field, in order)."""
    if len(extra) <= 4 or extra[:2] != b"\1\0":
        raise FormatRejected(f"malformed APPX/MSIX package: {what} needs a ZIP64 extra field")
    (length,) = struct.unpack_from("<H", extra, 2)
    values, at = [], 4
    # osslsigncode wants the field long enough for every value up to the one it reads
    for need, (flag, width) in zip((8, 16, 24, 28), zip(wanted, (8, 8, 8, 4), strict=True), strict=True):
        if flag:
            if length < need or at + width > len(extra):
                raise FormatRejected(f"malformed APPX/MSIX package: {what} has a short ZIP64 extra field")
            values.append(int.from_bytes(extra[at : at + width], "little"))
            at += width
    return values


def _zip64_field(m: _Member, usize: int, csize: int, offset: int) -> bytes:
    """The ZIP64 extra field osslsigncode writes for ``m`` in the central directory."""
    values = b"".join(
        struct.pack(fmt, v)
        for flag, fmt, v in zip(
            m.zip64, ("<Q", "<Q", "<Q", "<I"), (usize, csize, offset, m.disk), strict=True
        )
        if flag
    )
    return struct.pack("<HH", 1, len(values)) + values if values else b""


def _central_entries(f: BinaryIO, at: int, count: int) -> list[_Member]:
    f.seek(at)
    members = []
    for i in range(count):
        what = f"central directory entry {i}"
        head = _read(f, 46, what)
        if head[:4] != _CENTRAL:
            raise FormatRejected(f"malformed APPX/MSIX package: {what} has no signature")
        fields = struct.unpack_from("<HHHHHHIIIHHHHHII", head, 4)
        crc, csize, usize, name_len, extra_len, comment_len, disk, internal, external, offset = fields[6:]
        name = _read(f, name_len, what)
        extra = _read(f, extra_len, what)
        comment = _read(f, comment_len, what)
        if not name or b"\0" in name:
            raise FormatRejected(f"malformed APPX/MSIX package: {what} has no usable name")
        wanted = (usize == _U32, csize == _U32, offset == _U32, disk == _U16)
        if any(wanted):
            values = iter(_zip64_values(extra, wanted, what))
            usize, csize, offset, disk = (
                next(values) if w else v for w, v in zip(wanted, (usize, csize, offset, disk), strict=True)
            )
        m = _Member(i, name, fields[:6], crc, csize, usize, extra_len, comment, disk, (internal, external),
                    offset, wanted)  # fmt: skip
        if _zip64_field(m, usize, csize, offset) != extra:
            raise FormatRejected(
                f"APPX/MSIX package whose {what} has extra fields besides its ZIP64 values: osslsigncode's "
                "layout drops them, so it cannot be signed"
            )
        members.append(m)
    return members


def _local_header(f: BinaryIO, m: _Member, zip64: bool, size: int) -> int:
    """Read ``m``'s local header (and data descriptor) into ``m``; return where its record ends."""
    what = f"the local header of central directory entry {m.index}"
    if m.offset >= size:
        raise FormatRejected(f"malformed APPX/MSIX package: {what} is at {m.offset}, past the end")
    f.seek(m.offset)
    head = _read(f, 30, what)
    if head[:4] != _LOCAL:
        raise FormatRejected(f"malformed APPX/MSIX package: {what} has no signature")
    version, flags, method, mtime, mdate, crc, csize, usize, name_len, extra_len = struct.unpack_from(
        "<HHHHHIIIHH", head, 4
    )
    name = _read(f, name_len, what)
    extra = _read(f, extra_len, what)
    data_at = m.offset + 30 + name_len + extra_len
    if data_at + m.csize > size:
        raise FormatRejected(
            f"truncated APPX/MSIX package: the data of central directory entry {m.index} is cut off"
        )
    descriptor = 0
    if flags & _HAS_DESCRIPTOR:
        descriptor = 24 if zip64 else 16
        f.seek(data_at + m.csize)
        dd = _read(f, descriptor, f"the data descriptor of central directory entry {m.index}")
        if dd[:4] != _DESCRIPTOR:
            raise FormatRejected(
                f"malformed APPX/MSIX package: the data descriptor of central directory entry {m.index} "
                "has no signature"
            )
        crc, csize, usize = struct.unpack_from("<IQQ" if zip64 else "<III", dd, 4)
    local_zip64 = (usize == _U32, csize == _U32)
    if any(local_zip64):
        values = iter(_zip64_values(extra, (*local_zip64, False, False), what))
        usize, csize = (next(values) if w else v for w, v in zip(local_zip64, (usize, csize), strict=True))
    if (name, method, crc, csize, usize) != (m.name, m.central[3], m.crc, m.csize, m.usize):
        raise FormatRejected(f"malformed APPX/MSIX package: {what} disagrees with the central directory")
    m.local, m.local_extra, m.local_zip64, m.data_at = (
        (version, flags, method, mtime, mdate),
        extra,
        local_zip64,
        data_at,
    )
    return int(data_at + m.csize + descriptor)


def _package(f: BinaryIO, size: int) -> _Zip:
    """Read and check a package's zip structure; raise :class:`FormatRejected` naming the
    first thing wrong."""
    z, cd_at, count = _end_records(f, size)
    members = sorted(_central_entries(f, cd_at, count), key=lambda m: m.offset)
    end = 0
    for m in members:
        if m.offset < end:
            raise FormatRejected(
                f"malformed APPX/MSIX package: central directory entry {m.index} overlaps the member before"
            )
        end = _local_header(f, m, z.zip64 is not None, size)
    if end > cd_at:
        raise FormatRejected("malformed APPX/MSIX package: the last member runs into the central directory")
    if len({m.name for m in members}) != len(members):
        raise FormatRejected("malformed APPX/MSIX package: two members have the same name")
    if sum(m.name != SIGNATURE_MEMBER for m in members) >= _U16:
        raise FormatRejected(
            f"APPX/MSIX package of {len(members)} members: osslsigncode counts them in 16 bits"
        )
    z.members = members
    return z


def _content(f: BinaryIO, m: _Member) -> bytes:
    """A (small) member's uncompressed bytes, as osslsigncode reads them."""
    what = f"central directory entry {m.index}"
    if max(m.csize, m.usize) > _METADATA_LIMIT:
        raise FormatRejected(f"APPX/MSIX package whose {what} ({m.usize} bytes) is too large to read")
    f.seek(m.data_at)
    raw = _read(f, m.csize, f"the data of {what}")
    if m.central[3] == _STORED:
        data = raw
    elif m.central[3] == _DEFLATED and m.usize:
        inflate = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            data = inflate.decompress(raw, m.usize)
        except zlib.error:
            data = b""
        if not inflate.eof:
            raise FormatRejected(f"malformed APPX/MSIX package: the data of {what} does not inflate")
    else:
        raise FormatRejected(f"APPX/MSIX package whose {what} uses compression method {m.central[3]}")
    if not data:
        raise FormatRejected(f"malformed APPX/MSIX package: {what} is empty")
    return data


def _hash_method(block_map: bytes) -> tuple[str, bytes]:
    """(hashlib name, DER OID) of the block map's ``HashMethod``, found as osslsigncode finds it."""
    text = block_map.split(b"\0", 1)[0]
    start = text.find(b"HashMethod")
    end = text.find(b">", start)
    quotes = [i for i in range(start, end) if text[i] == ord('"')] if start >= 0 and end >= 0 else []
    if len(quotes) < 2 or quotes[-1] - quotes[0] < 3:
        raise FormatRejected("malformed APPX/MSIX package: AppxBlockMap.xml has no HashMethod")
    method = _HASH_METHODS.get(text[quotes[0] + 1 : quotes[-1]])
    if method is None:
        raise FormatRejected(
            "APPX/MSIX package whose block map HashMethod is not SHA-256, SHA-384 or SHA-512"
        )
    return method


def _with_signature_type(types: bytes) -> bytes | None:
    """``[Content_Types].xml`` with the signature's content type added before ``</Types>``, or
    None if it has it."""
    text = types.split(b"\0", 1)[0]
    if _CT_SIGNATURE in text:
        return None
    at = text.find(_CT_CLOSE)
    if at < 0:
        raise FormatRejected("malformed APPX/MSIX package: [Content_Types].xml has no </Types>")
    return types[:at] + _CT_SIGNATURE + types[at:]


def _deflate(data: bytes) -> bytes:
    """Raw deflate as osslsigncode's: level 8, 15-bit window, memory level 8, default strategy."""
    return zlib.compress(data, 8, -zlib.MAX_WBITS)


def _u32(value: int, saturated: bool) -> int:
    if saturated:
        return _U32
    if value > _U32:
        raise FormatRejected("APPX/MSIX package too large to sign: an offset would not fit its 32-bit field")
    return value


def _local_record(m: _Member, crc: int, csize: int, usize: int, zip64: bool) -> tuple[bytes, bytes]:
    """``m``'s local header and data descriptor as osslsigncode writes them back."""
    version, flags, method, mtime, mdate = m.local
    described = flags & _HAS_DESCRIPTOR
    fields = (0, 0, 0) if described else (crc, _u32(csize, m.local_zip64[1]), _u32(usize, m.local_zip64[0]))
    header = _LOCAL + struct.pack(
        "<HHHHHIIIHH", version, flags, method, mtime, mdate, *fields, len(m.name), len(m.local_extra)
    )
    descriptor = (
        _DESCRIPTOR + struct.pack("<IQQ" if zip64 else "<III", crc, csize, usize) if described else b""
    )
    return header + m.name + m.local_extra, descriptor


def _central_record(m: _Member, crc: int, csize: int, usize: int, offset: int) -> bytes:
    """``m``'s central directory entry as osslsigncode writes it back."""
    creator, viewer, flags, method, mtime, mdate = m.central
    in_zip64_usize, in_zip64_csize, in_zip64_offset, in_zip64_disk = m.zip64
    return (
        _CENTRAL
        + struct.pack(
            "<HHHHHHIIIHHHHHII",
            creator,
            viewer,
            flags,
            method,
            mtime,
            mdate,
            crc,
            _u32(csize, in_zip64_csize),
            _u32(usize, in_zip64_usize),
            len(m.name),
            m.extra_len,
            len(m.comment),
            _U16 if in_zip64_disk else m.disk,
            *m.attributes,
            _u32(offset, in_zip64_offset),
        )
        + m.name
        + _zip64_field(m, usize, csize, offset)
        + m.comment
    )


def _end(z: _Zip, count: int, cd_size: int, cd_offset: int) -> bytes:
    """The end records after a central directory of ``count`` entries."""
    records = b""
    if z.zip64 is not None:
        made_by, needed, disk, cd_disk, extensible, locator_disk, disks = z.zip64
        records += _END64 + struct.pack(
            "<QHHIIQQQQ",
            44 + len(extensible),
            made_by,
            needed,
            disk,
            cd_disk,
            count,
            count,
            cd_size,
            cd_offset,
        )
        records += extensible + _LOCATOR64 + struct.pack("<IQI", locator_disk, cd_offset + cd_size, disks)
    disk_entries, total, size_saturated, offset_saturated = z.saturated
    return records + _END + struct.pack(
        "<HHHHIIH", 0, 0, _U16 if disk_entries else count, _U16 if total else count,
        _u32(cd_size, size_saturated), _u32(cd_offset, offset_saturated), 0,
    )  # fmt: skip


def indirect_data(digest: bytes, algorithm: bytes, *, bundle: bool = False) -> bytes:
    """The ``SpcIndirectDataContent`` of a package's digest (``APPX`` and the tagged hashes) as
    osslsigncode writes it: an ``SpcSipInfo`` of the APPX (or bundle) SIP, the block map's
    hash algorithm (``algorithm``: the DER of its OID)."""
    sip = sip_info(0x01010000, _BUNDLE_SIP if bundle else _APPX_SIP)
    return spc_indirect_data(SPC_SIPINFO, sip, digest, tlv(SEQUENCE, algorithm, tlv(NULL)))


def _signature_member(der: bytes, offset: int) -> tuple[bytes, bytes]:
    """``AppxSignature.p7x`` (``PKCX`` + the DER): its local record and central directory entry."""
    p7x = b"PKCX" + der
    packed, crc = _deflate(p7x), zlib.crc32(p7x)
    now = time.localtime()  # DOS time, local as osslsigncode's
    mtime = now.tm_hour << 11 | now.tm_min << 5 | now.tm_sec >> 1
    mdate = (now.tm_year - 1980) << 9 | now.tm_mon << 5 | now.tm_mday
    sizes = (crc, len(packed), len(p7x), len(SIGNATURE_MEMBER))
    local = _LOCAL + struct.pack("<HHHHHIIIHH", 0x14, 0, _DEFLATED, mtime, mdate, *sizes, 0)
    central = _CENTRAL + struct.pack("<HHHHHHIIIHHHHHII", 0x2D, 0x14, 0, _DEFLATED, mtime, mdate, *sizes,
                                     0, 0, 0, 0, 0, offset)  # fmt: skip
    return local + SIGNATURE_MEMBER + packed, central + SIGNATURE_MEMBER


class _Out:
    """The output file and the running digest of what is written to it (the AXPC part)."""

    def __init__(self, o: BinaryIO, algorithm: str) -> None:
        self.o, self.digest = o, hashlib.new(algorithm)

    def write(self, data: bytes) -> None:
        self.o.write(data)
        self.digest.update(data)

    def copy(self, f: BinaryIO, at: int, n: int) -> None:
        f.seek(at)
        copy_hashed(f, self.o, n, self.digest)


def _write_members(f: BinaryIO, out: _Out, z: _Zip, types: bytes | None) -> list[bytes]:
    """Write every member but the old signature (``types``: the new ``[Content_Types].xml``,
    if it changes); return their central directory entries."""
    central = []
    for m in z.members:
        if m.name == SIGNATURE_MEMBER:
            continue
        offset = out.o.tell()
        if m.name == CONTENT_TYPES and types is not None:
            # osslsigncode deflates it even when stored (a broken member): stored stays stored here
            payload = _deflate(types) if m.central[3] == _DEFLATED else types
            crc, csize, usize = zlib.crc32(types), len(payload), len(types)
        else:
            payload, crc, csize, usize = None, m.crc, m.csize, m.usize
        header, descriptor = _local_record(m, crc, csize, usize, z.zip64 is not None)
        out.write(header)
        if payload is None:
            out.copy(f, m.data_at, m.csize)
        else:
            out.write(payload)
        out.write(descriptor)
        central.append(_central_record(m, crc, csize, usize, offset))
    return central


def sign_appx(src: Path, out: Path, signature: Sign) -> None:
    """Write ``src`` signed into ``out`` in one pass over its members."""
    with src.open("rb") as f:
        z = _package(f, os.fstat(f.fileno()).st_size)
        block_map = _content(f, z.need(BLOCK_MAP))
        algorithm, algorithm_oid = _hash_method(block_map)
        types = _content(f, z.need(CONTENT_TYPES))
        new_types = _with_signature_type(types)
        parts = [b"AXCT" + hashlib.new(algorithm, new_types or types).digest(),
                 b"AXBM" + hashlib.new(algorithm, block_map).digest()]  # fmt: skip
        integrity = z.find(_CODE_INTEGRITY)
        if integrity is not None:
            parts.append(b"AXCI" + hashlib.new(algorithm, _content(f, integrity)).digest())
        with out.open("wb") as o:
            written = _Out(o, algorithm)
            central = _write_members(f, written, z, new_types)
            cd_offset, cd = o.tell(), b"".join(central)
            _u32(cd_offset, False)  # the signature member's offset: osslsigncode writes it in 32 bits
            unsigned = hashlib.new(algorithm, cd + _end(z, len(central), len(cd), cd_offset)).digest()
            digest = b"".join([b"APPX", b"AXPC", written.digest.digest(), b"AXCD", unsigned, *parts])
            bundle = z.find(_BUNDLE_MANIFEST) is not None
            local, entry = _signature_member(
                signature(indirect_data(digest, algorithm_oid, bundle=bundle), SPC_INDIRECT_DATA), cd_offset
            )
            o.write(local)
            cd += entry
            o.write(cd + _end(z, len(central) + 1, len(cd), cd_offset + len(local)))
