"""Unsigned MSI containers for the Authenticode formats, written from scratch.

An MSI is an OLE compound file; Authenticode signs it by hashing its streams and adding a
``\\x05DigitalSignature`` stream, whatever the streams hold. :func:`write_msi` writes a
version-3 compound file (512-byte sectors) with a few streams, enough for osslsigncode to sign
and verify it as an MSI (Windows Installer would not install it: there are no tables).
"""

from __future__ import annotations

import struct
from pathlib import Path

from ..winfiles import OLE_MAGIC

_SECTOR = 512
_FREE, _END, _FATSECT, _NOSTREAM = 0xFFFFFFFF, 0xFFFFFFFE, 0xFFFFFFFD, 0xFFFFFFFF
_MINI_CUTOFF = 4096  # streams this size and over live in ordinary sectors: no mini stream needed


def _entry(name: str, kind: int, child: int, right: int, start: int, size: int) -> bytes:
    encoded = name.encode("utf-16-le") + b"\0\0"
    return struct.pack(
        "<64sHBBIII16sIQQIQ",
        encoded,
        len(encoded),
        kind,  # 1 storage, 2 stream, 5 root
        1,  # black
        _NOSTREAM,  # left sibling
        right,
        child,
        b"\0" * 16,
        0,
        0,
        0,
        start,
        size,
    )


def msi_bytes(streams: dict[str, bytes]) -> bytes:
    """A compound file holding up to 3 ``streams``, each padded to at least 4 KiB, about
    60 KiB in all at most (one FAT sector, one directory sector)."""
    if len(streams) > 3:
        raise ValueError("at most 3 streams (one directory sector)")
    names = sorted(streams, key=lambda n: (len(n), n.upper()))  # the directory's sort order
    datas = [streams[n].ljust(_MINI_CUTOFF, b"\0") for n in names]
    fat = [_FATSECT, _END]  # sector 0: the FAT, sector 1: the directory
    starts = []
    for data in datas:
        count = -(-len(data) // _SECTOR)
        starts.append(len(fat))
        fat += [len(fat) + i + 1 for i in range(count - 1)] + [_END]
    if len(fat) > _SECTOR // 4:
        raise ValueError("the streams do not fit one FAT sector")
    fat += [_FREE] * (_SECTOR // 4 - len(fat))
    header = struct.pack(
        "<8s16sHHHHH6sIIIIIIIII",
        OLE_MAGIC,
        b"\0" * 16,
        0x3E,  # minor version
        3,  # major version: 512-byte sectors
        0xFFFE,  # little-endian
        9,  # sector shift
        6,  # mini sector shift
        b"\0" * 6,
        0,  # directory sectors (always 0 in version 3)
        1,  # FAT sectors
        1,  # first directory sector
        0,
        _MINI_CUTOFF,
        _END,  # no mini FAT
        0,
        _END,  # no DIFAT sectors
        0,
    ) + struct.pack("<109I", 0, *([_FREE] * 108))
    # Root, then the streams as a chain of right siblings (a valid, if lopsided, tree).
    entries = [_entry("Root Entry", 5, 1 if names else _NOSTREAM, _NOSTREAM, _END, 0)]
    for i, (name, data) in enumerate(zip(names, datas, strict=True)):
        right = i + 2 if i + 1 < len(names) else _NOSTREAM
        entries.append(_entry(name, 2, _NOSTREAM, right, starts[i], len(data)))
    # unused directory entries: empty, with no siblings or child
    empty = struct.pack(
        "<64sHBBIII16sIQQIQ", b"", 0, 0, 0, _NOSTREAM, _NOSTREAM, _NOSTREAM, b"", 0, 0, 0, 0, 0
    )
    directory = b"".join(entries) + empty * (_SECTOR // 128 - len(entries))
    body = b"".join(d.ljust(-(-len(d) // _SECTOR) * _SECTOR, b"\0") for d in datas)
    return header + struct.pack(f"<{_SECTOR // 4}I", *fat) + directory + body


def write_msi(directory: Path, name: str = "setup.msi", payload: bytes = b"sealbox sample payload\n") -> Path:
    """Write an unsigned MSI container as ``directory/name``; ``payload`` (up to ~50 KiB) is
    one of its streams, so different payloads give different files."""
    dest = Path(directory) / name
    summary = b"\xfe\xff" + b"\0" * 46  # the byte-order mark of an (empty) property set
    dest.write_bytes(msi_bytes({"\x05SummaryInformation": summary, "Payload": payload}))
    return dest
