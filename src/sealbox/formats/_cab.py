"""Cabinets (CAB) signed in-process, byte for byte what ``osslsigncode sign`` (2.9, ``cab.c``)
writes.

A signature lives in the CFHEADER's reserve area: ``FLAG_RESERVE_PRESENT``, ``cbCFHeader`` 20
(``cbCFFolder`` and ``cbCFData`` 0) and a 20-byte ``abReserve`` of ``00 00 10 00``, the
signature's offset, its size and 8 zero bytes; the signature (DER PKCS#7, zero-padded to 8
bytes) ends the file. An unsigned cabinet gets those 24 bytes inserted after ``setID`` /
``iCabinet``, so ``cbCabinet``, ``coffFiles`` and every CFFOLDER's ``coffCabStart`` grow by 24
(``cbCabinet`` then counts up to the signature, not through it); the high byte of the flags is
cleared, as osslsigncode does. A signed cabinet keeps its header (the new signature goes where
the old one was); only the signature size changes: the output carries our signature only.

The SHA-256 digest covers the output up to the signature except ``reserved1`` (bytes 4-7) and
``iCabinet`` through the signature's offset and size (bytes 34-55). It goes into an
``SpcIndirectDataContent`` of type ``SPC_CAB_DATA`` (1.3.6.1.4.1.311.2.1.25) with the
``<<<Obsolete>>>`` file link, signed by :data:`._pe.Sign`.

Refused as osslsigncode refuses them, or where its output would not verify: cabinets of a
multi-cabinet set (a previous or next cabinet named in the header), a reserve area other than a
signature's, a signature area that does not end the file, a header size that is not the file's,
and a file table that does not follow the folder entries (a verifier hashes up to it).
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..errors import FormatRejected
from ..hashing import copy_hashed
from ._cms import oid
from ._pe import OBSOLETE_LINK, SPC_INDIRECT_DATA, Sign, spc_indirect_data

__all__ = ["SPC_CAB_DATA", "CabLayout", "cab_layout", "indirect_data", "sign_cab"]

SPC_CAB_DATA = oid("1.3.6.1.4.1.311.2.1.25")

_PREV_CABINET, _NEXT_CABINET, _RESERVE_PRESENT = 0x0001, 0x0002, 0x0004
_HEADER = 36  # the fixed CFHEADER fields
_SIGNED_HEADER = 60  # with cbCFHeader, cbCFFolder, cbCFData and the 20-byte abReserve
_GROWTH = _SIGNED_HEADER - _HEADER
_RESERVE_MAGIC = 0x00100000  # the first abReserve word of a signature's reserve area
_SIGLEN_AT = 48  # where the signature's size is written once it is known
_MIN_SIZE = 44  # osslsigncode reads this much before anything else
_ROOM = 1 << 20  # headroom for the signature under the 4 GiB a CAB's 32-bit offsets reach


@dataclass(frozen=True)
class CabLayout:
    """What the output starts with and which input bytes follow it."""

    #: the output's CFHEADER (with the reserve area; signature size 0 for now) and CFFOLDERs
    header: bytes
    #: the input's offset of what follows the folder entries (CFFILEs, CFDATA): copied as is
    rest_at: int
    #: where that ends: the old signature's offset, else the file's size
    end: int


def _reserve(head: bytes, size: int) -> int:
    """Check a signed cabinet's reserve area; the old signature's offset (the data's end)."""
    if len(head) < _SIGNED_HEADER:
        raise FormatRejected("truncated CAB: the header's reserve area is cut off")
    cb_header, cb_folder, cb_data = struct.unpack_from("<HBB", head, _HEADER)
    if (cb_header, cb_folder, cb_data) != (_GROWTH - 4, 0, 0):
        raise FormatRejected(
            f"CAB with a reserve area that is not a signature's (cbCFHeader {cb_header}, cbCFFolder "
            f"{cb_folder}, cbCFData {cb_data}; a signature's is 20, 0, 0): it cannot be signed"
        )
    magic, sigpos, siglen = struct.unpack_from("<III", head, _HEADER + 4)
    if magic != _RESERVE_MAGIC:
        raise FormatRejected(f"malformed CAB: the reserve area does not start 0x{_RESERVE_MAGIC:08x}")
    if not (0 < sigpos < size and siglen and sigpos + siglen == size):
        raise FormatRejected(
            f"malformed CAB: the signature area (at {sigpos}, {siglen} bytes) does not end the file "
            f"({size} bytes)"
        )
    return int(sigpos)


def cab_layout(f: BinaryIO, size: int) -> CabLayout:
    """Read and check a cabinet's CFHEADER and CFFOLDERs for signing; raise
    :class:`FormatRejected` naming the first thing wrong."""
    if size < _MIN_SIZE:
        raise FormatRejected(f"truncated CAB: {size} bytes")
    f.seek(0)
    head = f.read(_SIGNED_HEADER)
    if head[:4] != b"MSCF":
        raise FormatRejected("not a CAB (no MSCF signature)")
    reserved1, cabinet, _, files_at = struct.unpack_from("<IIII", head, 4)
    folders, _files, flags = struct.unpack_from("<HHH", head, 26)
    if reserved1:
        raise FormatRejected(f"malformed CAB: reserved1 is 0x{reserved1:08x}, not 0")
    if flags & (_PREV_CABINET | _NEXT_CABINET):
        raise FormatRejected(
            f"CAB in a multi-cabinet set (flags 0x{flags:04x}: a previous or next cabinet): "
            "it cannot be signed"
        )
    if flags & _RESERVE_PRESENT:  # signed already: the header stays, the signature is replaced
        end, folders_at, growth = _reserve(head, size), _SIGNED_HEADER, 0
        header = bytearray(head)
    else:
        if cabinet != size:
            raise FormatRejected(f"malformed CAB: the header says {cabinet} bytes, the file has {size}")
        end, folders_at, growth = size, _HEADER, _GROWTH
        header = bytearray(head[:_HEADER])
        struct.pack_into("<I", header, 8, cabinet + growth)
        struct.pack_into("<I", header, 16, files_at + growth)
        struct.pack_into("<H", header, 30, (flags & 0xFF) | _RESERVE_PRESENT)  # high byte dropped
        header += struct.pack("<HBBIII8x", _GROWTH - 4, 0, 0, _RESERVE_MAGIC, cabinet + growth, 0)
    if end + growth + _ROOM > 1 << 32:
        raise FormatRejected(f"CAB too large to sign: {size} bytes (CAB offsets are 32-bit)")
    rest_at = folders_at + 8 * folders
    if files_at != rest_at:
        raise FormatRejected(
            f"malformed CAB: the file table is at {files_at}, not right after the {folders} folder "
            f"entries ({rest_at})"
        )
    if rest_at >= end:
        raise FormatRejected(f"truncated CAB: {folders} folder entries run past the cabinet's end ({end})")
    f.seek(folders_at)
    table = f.read(8 * folders)
    for i in range(folders):
        (start,) = struct.unpack_from("<I", table, 8 * i)
        if start > end:
            raise FormatRejected(f"malformed CAB: folder {i}'s data starts at {start}, past the end ({end})")
        header += struct.pack("<I", start + growth) + table[8 * i + 4 : 8 * i + 8]
    return CabLayout(header=bytes(header), rest_at=rest_at, end=end)


def indirect_data(digest: bytes) -> bytes:
    """The ``SpcIndirectDataContent`` of a cabinet's digest, as osslsigncode writes it: type
    ``SPC_CAB_DATA``, value the SpcLink file ``<<<Obsolete>>>`` (a BMPString)."""
    return spc_indirect_data(SPC_CAB_DATA, OBSOLETE_LINK, digest)


def sign_cab(src: Path, out: Path, signature: Sign) -> None:
    """Write ``src`` signed into ``out`` in one pass over its data."""
    with src.open("rb") as f:
        layout = cab_layout(f, os.fstat(f.fileno()).st_size)
        head = layout.header
        digest = hashlib.sha256()
        for part in (head[:4], head[8:34], head[56:]):  # not reserved1, iCabinet..signature size
            digest.update(part)
        with out.open("wb") as o:
            o.write(head)
            f.seek(layout.rest_at)
            copy_hashed(f, o, layout.end - layout.rest_at, digest)
            der = signature(indirect_data(digest.digest()), SPC_INDIRECT_DATA)
            padded = der + bytes(-len(der) % 8)
            o.write(padded)
            o.seek(_SIGLEN_AT)
            o.write(struct.pack("<I", len(padded)))
