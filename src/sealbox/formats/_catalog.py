"""Security catalogs (``.cat``) signed in-process, as ``osslsigncode sign`` 2.9 signs them.

A catalog is a DER PKCS#7 SignedData whose content is a certificate trust list (CTL,
``szOID_CTL`` 1.3.6.1.4.1.311.10.1); makecat writes it without signers. Signing keeps the CTL
exactly (its bytes, with their own tag and length) as the content of a new SignedData of type
szOID_CTL, with osslsigncode's authenticated attributes (:func:`._pe.signed_data`); nothing else
of the input stays: its certificates, CRLs and signers (an old signature) are dropped, as
osslsigncode (catalogs do not nest) drops them. The output is that SignedData alone.

The input is walked strictly (definite, minimal DER lengths, each element inside its parent,
nothing after the end) from its headers alone; only the CTL is read into memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

from ..errors import FormatRejected, SigningFailed
from ..winfiles import OID_CTL, der_header
from ._cms import CONTEXT_0, OID_SIGNED_DATA, SEQUENCE, SET
from ._pe import Sign

__all__ = ["sign_catalog"]


_INTEGER = 0x02
_CONTEXT_1 = 0xA1
_HEADER_MAX = 6  # tag, length byte, up to 4 length bytes (what der_header accepts)


class _Walk:
    """Reads DER headers from a file at given offsets, refusing what is not strict DER."""

    def __init__(self, f: BinaryIO, size: int) -> None:
        self.f, self.size = f, size

    def element(self, at: int, end: int, what: str, tag: int) -> tuple[int, int]:
        """(offset of the contents, offset after the element) of the ``tag`` element ``what``
        at ``at``, which must end by ``end``."""
        found, body, length = self._header(at, end, what)
        if found != tag:
            raise FormatRejected(f"malformed catalog: {what} has tag 0x{found:02x}, not 0x{tag:02x}")
        return body, body + length

    def tag_at(self, at: int, end: int, what: str) -> int:
        return self._header(at, end, what)[0]

    def _header(self, at: int, end: int, what: str) -> tuple[int, int, int]:
        if at >= end:
            raise FormatRejected(f"malformed catalog: {what} is missing")
        self.f.seek(at)
        head = self.f.read(_HEADER_MAX)
        try:
            tag, body, length = der_header(head, 0)
        except ValueError as e:
            raise FormatRejected(f"malformed catalog: {what}: bad DER length ({e})") from None
        if body > 2 and (length < 0x80 or head[2] == 0):
            raise FormatRejected(f"malformed catalog: {what}: a non-minimal DER length")
        if at + body + length > end:
            raise FormatRejected(f"malformed catalog: {what} overruns its container")
        return tag, at + body, length

    def oid(self, at: int, end: int, expected: bytes, what: str) -> int:
        """Check that the DER at ``at`` is the object identifier ``expected``; where it ends."""
        self.f.seek(at)
        if at + len(expected) > end or self.f.read(len(expected)) != expected:
            raise FormatRejected(f"malformed catalog: {what}")
        return at + len(expected)


def _ctl_span(f: BinaryIO, size: int) -> tuple[int, int]:
    """(start, end) of the CTL element (its tag and length included) in a catalog."""
    w = _Walk(f, size)
    body, end = w.element(0, size, "the ContentInfo", SEQUENCE)
    if end != size:
        raise FormatRejected(f"malformed catalog: {size - end} bytes after its DER")
    at = w.oid(body, end, OID_SIGNED_DATA, "the ContentInfo is not a SignedData")
    body, inner_end = w.element(at, end, "the SignedData wrapper [0]", CONTEXT_0)
    _must_fill(inner_end, end, "the ContentInfo")
    body, sd_end = w.element(body, inner_end, "the SignedData", SEQUENCE)
    _must_fill(sd_end, inner_end, "the SignedData wrapper [0]")
    _, at = w.element(body, sd_end, "the SignedData version", _INTEGER)
    _, at = w.element(at, sd_end, "the digest algorithms", SET)
    body, ci_end = w.element(at, sd_end, "the content info", SEQUENCE)
    at = w.oid(body, ci_end, OID_CTL, "the content is not a certificate trust list")
    body, wrap_end = w.element(at, ci_end, "the content [0] (a detached catalog?)", CONTEXT_0)
    _must_fill(wrap_end, ci_end, "the content info")
    _, ctl_end = w.element(body, wrap_end, "the certificate trust list", SEQUENCE)
    _must_fill(ctl_end, wrap_end, "the content [0]")
    ctl = (body, ctl_end)
    at = ci_end
    for tag, what in ((CONTEXT_0, "the certificates"), (_CONTEXT_1, "the CRLs")):
        if at < sd_end and w.tag_at(at, sd_end, what) == tag:
            _, at = w.element(at, sd_end, what, tag)
    _, at = w.element(at, sd_end, "the SignerInfo set", SET)
    _must_fill(at, sd_end, "the SignedData")
    return ctl


def _must_fill(end: int, container_end: int, what: str) -> None:
    if end != container_end:
        raise FormatRejected(f"malformed catalog: {container_end - end} stray bytes at the end of {what}")


def sign_catalog(src: Path, out: Path, signature: Sign) -> None:
    """Write the catalog ``src`` signed into ``out``: ``signature`` over its CTL, of type
    szOID_CTL (:data:`._pe.Sign`). Raises :class:`FormatRejected` naming what is malformed."""
    with src.open("rb") as f:
        size = f.seek(0, 2)
        start, end = _ctl_span(f, size)
        f.seek(start)
        ctl = f.read(end - start)
    if len(ctl) != end - start:
        raise SigningFailed("the input shrank while it was being signed")
    der = signature(ctl, OID_CTL)
    del ctl
    out.write_bytes(der)
