"""Authenticode signatures of PowerShell scripts (``.ps1``, ``.psm1``, ``.psd1``), made
in-process, byte for byte as ``osslsigncode sign`` 2.9 writes them (its ``script.c``).

A script is UTF-16LE if it starts with the BOM ``FF FE``, else UTF-8 (a BOM or not). The digest
is SHA-256 over the text before any signature block, as UTF-16LE: a UTF-16 script's bytes as
they are, a UTF-8 script's converted (its BOM becomes ``FF FE``; an invalid byte becomes
U+FFFD, one per byte, as osslsigncode's decoder does). An existing block is found as
osslsigncode finds it: the first line that starts with ``# SIG # Begin signature block`` and
ends in a line feed; the text is cut at the line feed before it, or one character earlier
when that header line ends in CR LF (osslsigncode then takes the line feed before as the end
of a CR LF too). A header on the first line means "unsigned": the whole file is signed.

The ``SpcIndirectDataContent`` carries an ``SpcSipInfo`` naming PowerShell's SIP (its GUID),
then the digest. The block is appended in the script's encoding, every line starting with CR
LF whatever the script uses, the base64 of the PKCS#7 in lines of 64, and a final CR LF
(signtool expects one).
"""

from __future__ import annotations

import base64
import codecs
import hashlib
import mmap
from pathlib import Path

from ..errors import FormatRejected
from ..hashing import CHUNK
from ._pe import SPC_INDIRECT_DATA, SPC_SIPINFO, Sign, sip_info, spc_indirect_data

__all__ = ["script_indirect_data", "sign_script"]

#: the PowerShell SIP's class id (SpcSipInfo's GUID, as Windows stores it)
POWERSHELL_SIP = bytes.fromhex("1fcc3b60594b084eb724d2c6297ef351")
HEADER = "# SIG # Begin signature block"
FOOTER = "# SIG # End signature block"
_UTF16_BOM = b"\xff\xfe"
#: osslsigncode keeps the first 99 characters of a line (LINE_MAX_LEN - 1); later ones overwrite the last
_LINE_KEPT = 99
_MAX_CHAR = 4  # bytes of the longest character (UTF-8; a UTF-16 surrogate pair too)
_MIN_SIZE = 4  # osslsigncode refuses shorter files


def _one_per_byte(error: UnicodeError) -> tuple[str, int]:
    """osslsigncode's UTF-8 decoder: an ill-formed sequence gives one U+FFFD per byte (Python's
    own 'replace' gives one per maximal subpart)."""
    if not isinstance(error, UnicodeDecodeError):
        raise error
    return "\ufffd", error.start + 1


_LENIENT = "sealbox-osslsigncode-utf8"
codecs.register_error(_LENIENT, _one_per_byte)


def script_indirect_data(digest: bytes) -> bytes:
    """The ``SpcIndirectDataContent`` of a script digest: ``SpcSipInfo`` (version 65536,
    PowerShell's GUID, five zeros), then the SHA-256 digest, as osslsigncode writes it."""
    return spc_indirect_data(SPC_SIPINFO, sip_info(65536, POWERSHELL_SIP), digest)


def _find(mm: mmap.mmap, needle: bytes, start: int, unit: int) -> int:
    """The first ``needle`` at or after ``start`` on a character boundary (``unit`` bytes), or -1."""
    at = mm.find(needle, start)
    while at >= 0 and at % unit:
        at = mm.find(needle, at + 1)
    return at


def signature_start(mm: mmap.mmap, utf16: bool) -> int:
    """Where the text to sign ends: at the existing signature block, as osslsigncode tells it,
    else the file's size. Raises :class:`FormatRejected` where osslsigncode would crash."""
    unit, encoding = (2, "utf-16-le") if utf16 else (1, "utf-8")
    header, lf = HEADER.encode(encoding), "\n".encode(encoding)
    if not utf16 and mm[: len(header)] == header:
        before, start = 0, 0  # the first line (a UTF-16 script's starts with its BOM)
    else:
        before = _find(mm, lf + header, 0, unit)
        if before < 0:
            return len(mm)
        start = before + unit
    end = _find(mm, lf, start + len(header), unit)
    if end < 0:  # the header line is the last line and has no line feed: not a header
        return len(mm)
    # Does the header line "end in CR"? osslsigncode looks at its last kept character.
    head = mm[start : min(end, start + _MAX_CHAR * (_LINE_KEPT + 1))]
    chars = head.decode(encoding, "surrogatepass" if utf16 else _LENIENT)
    kept = len(chars) if end - start == len(head) else _LINE_KEPT  # else more than 99
    cut = before - (unit if chars[min(kept, _LINE_KEPT) - 1] == "\r" else 0)
    if cut < 0:
        raise FormatRejected(
            "malformed script: a signature block header at its start ends in CR LF "
            "(osslsigncode cannot sign it)"
        )
    return cut or len(mm)  # at 0, osslsigncode takes the script for unsigned


def _block(der: bytes, utf16: bool) -> bytes:
    """The signature block: CR LF before every line, a comment mark, base64 in lines of 64."""
    text = base64.b64encode(der).decode("ascii")
    lines = [HEADER, *(f"# {text[i : i + 64]}" for i in range(0, len(text), 64)), FOOTER]
    return ("".join(f"\r\n{line}" for line in lines) + "\r\n").encode("utf-16-le" if utf16 else "ascii")


def sign_script(src: Path, out: Path, signature: Sign) -> None:
    """Write ``src`` (a PowerShell script) signed into ``out``; an old signature block is dropped.

    ``signature`` gets the ``SpcIndirectDataContent`` and its type and returns the PKCS#7 DER."""
    with src.open("rb") as f:
        size = f.seek(0, 2)
        if size < _MIN_SIZE:
            raise FormatRejected(f"script too short: {size} bytes")
        if size > 0xFFFFFFFF:  # osslsigncode's offsets are 32-bit
            raise FormatRejected(f"script too large to sign: {size} bytes")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm, out.open("wb") as o:
            utf16 = mm[:2] == _UTF16_BOM
            if utf16 and size % 2:
                raise FormatRejected(f"malformed UTF-16 script: an odd number of bytes ({size})")
            end = signature_start(mm, utf16)
            digest = hashlib.sha256()
            decoder = None if utf16 else codecs.getincrementaldecoder("utf-8")(_LENIENT)
            for at in range(0, end, CHUNK):
                chunk = mm[at : min(at + CHUNK, end)]
                o.write(chunk)
                if decoder is None:
                    digest.update(chunk)  # already UTF-16LE
                else:
                    digest.update(decoder.decode(chunk, final=at + CHUNK >= end).encode("utf-16-le"))
            der = signature(script_indirect_data(digest.digest()), SPC_INDIRECT_DATA)
            o.write(_block(der, utf16))
