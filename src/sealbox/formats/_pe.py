"""Authenticode signatures of PE images, made in-process (what ``osslsigncode sign`` does to a
PE, and what Mozilla's winsign does, without a tool or a key hand-off).

The image digest is SHA-256 over the file as it will be signed, in file order: everything but
the optional header's CheckSum, the Certificate Table entry of the data directory and the
certificate table itself, with the image padded by zeros to 8 bytes (the table starts there).
That linear walk is what Windows, osslsigncode and signtool hash; for a well-formed image it
equals the specification's section-by-section walk. An old certificate table (at the end of the
file, or the file is refused) is dropped: the output carries our signature only.

The signature is a PKCS#7 SignedData over an ``SpcIndirectDataContent`` (built here with the
DER helpers of :mod:`._cms`), with the authenticated attributes osslsigncode writes: content
type, signing time, ``SpcStatementType`` (individual), message digest and ``SpcSpOpusInfo``
(program name and URL when configured). It goes at the end of the file in one WIN_CERTIFICATE
(revision 2.0, PKCS_SIGNED_DATA, 8-byte aligned); the data directory entry and the PE checksum
are then written as osslsigncode does. An RFC 3161 timestamp over the signature value, when
asked for, becomes the unauthenticated attribute ``1.3.6.1.4.1.311.3.3.1``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import struct
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from asn1crypto import tsp  # type: ignore[import-untyped]
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ..errors import FormatRejected, SigningFailed
from ..hashing import CHUNK
from ..winfiles import pe_cert_table, read_head
from ._cms import (
    CONTEXT_0,
    NULL,
    OCTET_STRING,
    OID_CONTENT_TYPE,
    OID_MESSAGE_DIGEST,
    OID_RSA,
    OID_SIGNED_DATA,
    OID_SIGNING_TIME,
    SEQUENCE,
    SET,
    SHA256_ALGORITHM,
    UTC_TIME,
    attribute,
    integer,
    oid,
    set_of,
    tlv,
)

__all__ = [
    "OBSOLETE_LINK",
    "SPC_INDIRECT_DATA",
    "SPC_SIPINFO",
    "PeLayout",
    "Sign",
    "indirect_data",
    "pe_layout",
    "request_timestamp",
    "sign_pe",
    "sign_pe_file",
    "signed_data",
    "sip_info",
    "spc_indirect_data",
]


OID_ECDSA_SHA256 = oid("1.2.840.10045.4.3.2")
SPC_INDIRECT_DATA = oid("1.3.6.1.4.1.311.2.1.4")
SPC_PE_IMAGE_DATA = oid("1.3.6.1.4.1.311.2.1.15")
SPC_STATEMENT_TYPE = oid("1.3.6.1.4.1.311.2.1.11")
SPC_SP_OPUS_INFO = oid("1.3.6.1.4.1.311.2.1.12")
SPC_INDIVIDUAL_SP_KEY_PURPOSE = oid("1.3.6.1.4.1.311.2.1.21")
SPC_RFC3161_TIMESTAMP = oid("1.3.6.1.4.1.311.3.3.1")
#: the data type of the kinds a SIP signs (PowerShell scripts, APPX/MSIX): its value is an SpcSipInfo
SPC_SIPINFO = oid("1.3.6.1.4.1.311.2.1.30")
#: SpcLink ``file`` [2], the BMPString osslsigncode and signtool write where a file name once went
OBSOLETE_LINK = tlv(0xA2, tlv(0x80, "<<<Obsolete>>>".encode("utf-16-be")))

_BIT_STRING = 0x03
_WIN_CERT_REVISION_2_0 = 0x0200
_WIN_CERT_TYPE_PKCS_SIGNED_DATA = 0x0002
_CERT_TABLE = 4  # index of IMAGE_DIRECTORY_ENTRY_SECURITY
_ROOM = 1 << 20  # headroom for the signature under the 4 GiB a PE's 32-bit offsets reach


@dataclass(frozen=True)
class PeLayout:
    """Where the fields the signing rewrites lie, and where the image ends."""

    #: offset of the optional header's CheckSum
    checksum_at: int
    #: offset of the Certificate Table entry in the data directory
    cert_dir_at: int
    #: the image's end: the old certificate table's offset, else the file's size
    end: int


def pe_layout(head: bytes, size: int) -> PeLayout:
    """Validate a PE's headers (the first 64 KiB) against its size for signing; raise
    :class:`FormatRejected` naming the first thing wrong."""
    cert_off, cert_size = pe_cert_table(head, size)  # the Windows file rules' checks first
    (lfanew,) = struct.unpack_from("<I", head, 0x3C)
    opt = lfanew + 24
    (opt_size,) = struct.unpack_from("<H", head, lfanew + 20)
    (magic,) = struct.unpack_from("<H", head, opt)
    count_at, dirs_at = (opt + 92, opt + 96) if magic == 0x10B else (opt + 108, opt + 112)
    (ndirs,) = struct.unpack_from("<I", head, count_at)
    cert_dir_at = dirs_at + 8 * _CERT_TABLE
    if ndirs <= _CERT_TABLE or cert_dir_at + 8 > opt + opt_size:
        raise FormatRejected(
            f"malformed PE: the data directory has no certificate table entry ({ndirs} entries)"
        )
    if lfanew % 2:
        # the PE checksum sums 16-bit words: an odd e_lfanew puts CheckSum across two of them
        raise FormatRejected(f"malformed PE: e_lfanew (0x{lfanew:x}) is odd")
    if bool(cert_off) != bool(cert_size):
        raise FormatRejected(
            f"malformed PE: the certificate table entry has offset {cert_off} and size {cert_size}"
        )
    if cert_size and cert_off + cert_size != size:
        # Windows (since MS12-024) and osslsigncode take nothing after the signature
        raise FormatRejected("malformed PE: the certificate table is not at the end of the file")
    end = cert_off or size
    if end + _ROOM > 1 << 32:
        raise FormatRejected(f"PE too large to sign: {end} bytes (PE offsets are 32-bit)")
    return PeLayout(checksum_at=opt + 64, cert_dir_at=cert_dir_at, end=end)


def _checksum_fold(total: int) -> int:
    """The ones'-complement sum of 16-bit words, from the sum of the chunks' little-endian
    values (chunks at even offsets: 2**16 is 1 modulo 0xFFFF)."""
    folded = total % 0xFFFF
    return 0xFFFF if folded == 0 and total else folded


def sign_pe(src: Path, out: Path, layout: PeLayout, signature: Callable[[bytes], bytes]) -> bytes:
    """Write ``src`` signed into ``out`` in one pass; returns the image digest.

    ``signature`` gets the SHA-256 image digest and returns the DER PKCS#7 to embed."""
    digest = hashlib.sha256()
    total = 0  # for the PE checksum: the sum of every even-offset chunk as a little-endian int
    ck, cd = layout.checksum_at, layout.cert_dir_at
    with src.open("rb") as f, out.open("wb") as o:
        pos = 0
        while pos < layout.end:
            chunk = bytearray(f.read(min(CHUNK, layout.end - pos)))
            if not chunk:
                raise SigningFailed("the input shrank while it was being signed")
            view = memoryview(chunk)
            if pos == 0:  # the headers lie in the first chunk (pe_layout: end > cd + 8)
                chunk[ck : ck + 4] = bytes(4)  # rewritten at the end
                chunk[cd : cd + 8] = bytes(8)
                digest.update(view[:ck])
                digest.update(view[ck + 4 : cd])
                digest.update(view[cd + 8 :])
            else:
                digest.update(view)
            total += int.from_bytes(chunk, "little")
            o.write(chunk)
            pos += len(chunk)
        padding = bytes(-layout.end % 8)
        digest.update(padding)
        o.write(padding)
        image_digest = digest.digest()
        der = signature(image_digest)
        length = 8 + len(der)
        table = struct.pack("<IHH", length, _WIN_CERT_REVISION_2_0, _WIN_CERT_TYPE_PKCS_SIGNED_DATA) + der
        table += bytes(-length % 8)
        o.write(table)
        table_at = layout.end + len(padding)
        entry = struct.pack("<II", table_at, len(table))
        total += int.from_bytes(table, "little") + int.from_bytes(entry, "little")
        checksum = (_checksum_fold(total) + table_at + len(table)) & 0xFFFFFFFF
        o.seek(cd)
        o.write(entry)
        o.seek(ck)
        o.write(struct.pack("<I", checksum))
    return image_digest


def sign_pe_file(src: Path, out: Path, signature: Sign) -> None:
    """Write ``src`` (a PE image) signed into ``out``: its layout checked, then :func:`sign_pe`
    with an ``SpcIndirectDataContent`` of the image digest (the Authenticode kinds' common call)."""
    layout = pe_layout(*read_head(src))
    sign_pe(src, out, layout, lambda digest: signature(indirect_data(digest), SPC_INDIRECT_DATA))


# -- the signature ------------------------------------------------------------------------------
def spc_indirect_data(
    data_type: bytes, value: bytes, digest: bytes, algorithm: bytes = SHA256_ALGORITHM
) -> bytes:
    """An ``SpcIndirectDataContent``: what was hashed (its type's OID and a value, each kind's
    own) and the digest under ``algorithm`` (a DER AlgorithmIdentifier)."""
    return tlv(
        SEQUENCE,
        tlv(SEQUENCE, data_type, value),
        tlv(SEQUENCE, algorithm, tlv(OCTET_STRING, digest)),
    )


def sip_info(version: int, guid: bytes) -> bytes:
    """An ``SpcSipInfo``: the SIP's version and class id, then five zeros, as osslsigncode
    writes it (the value of :data:`SPC_SIPINFO` data)."""
    return tlv(SEQUENCE, integer(version), tlv(OCTET_STRING, guid), *[integer(0)] * 5)


def indirect_data(image_digest: bytes) -> bytes:
    """The ``SpcIndirectDataContent`` of a PE image digest, byte for byte as osslsigncode and
    signtool write it (flags: includeResources; file: the ``<<<Obsolete>>>`` link)."""
    image_data = tlv(SEQUENCE, tlv(_BIT_STRING, b"\x07\x80"), tlv(0xA0, OBSOLETE_LINK))
    return spc_indirect_data(SPC_PE_IMAGE_DATA, image_data, image_digest)


def _opus_info(description: str | None, url: str | None) -> bytes:
    """``SpcSpOpusInfo``: the program name ([0], an ASCII SpcString) and URL ([1], an SpcLink
    url), each only when configured; osslsigncode puts the bytes as given into IA5Strings."""
    parts = []
    if description:
        parts.append(tlv(0xA0, tlv(0x81, description.encode())))
    if url:
        parts.append(tlv(0xA1, tlv(0x80, url.encode())))
    return tlv(SEQUENCE, *parts)


#: What builds a signature around a content (the DER of its type, the DER of the content):
#: :meth:`sealbox.formats.authenticode.AuthenticodeSigner` binds the key and options of
#: :func:`signed_data` to one, and each kind's module calls it.
Sign = Callable[[bytes, bytes], bytes]


def signed_data(
    content: bytes,
    content_type: bytes,
    certificates: Sequence[x509.Certificate],
    sign: Callable[[bytes], bytes],
    *,
    ecdsa: bool = False,
    description: str | None = None,
    url: str | None = None,
    timestamp: Callable[[bytes], bytes] | None = None,
    now: dt.datetime | None = None,
) -> bytes:
    """The DER ContentInfo (PKCS#7 SignedData) of an Authenticode signature over ``content``
    (DER, of type ``content_type``: an ``SpcIndirectDataContent`` from :func:`indirect_data`
    for a PE image; a catalog's certificate trust list), attached.

    ``certificates[0]`` is the signer's; the rest (its chain, extra certificates) travel along.
    ``sign`` signs the DER of the authenticated attributes (SHA-256; RSA PKCS#1 v1.5, or ECDSA
    if ``ecdsa``); ``timestamp``, if given, turns the signature value into an RFC 3161 token."""
    when = (now or dt.datetime.now(dt.UTC)).strftime("%y%m%d%H%M%SZ").encode()  # UTCTime: 1950-2049
    # the message digest covers the SpcIndirectDataContent's value, without its tag and length
    header = 2 + (content[1] & 0x7F if content[1] & 0x80 else 0)
    attributes = [
        attribute(OID_CONTENT_TYPE, content_type),
        attribute(OID_SIGNING_TIME, tlv(UTC_TIME, when)),
        attribute(SPC_STATEMENT_TYPE, tlv(SEQUENCE, SPC_INDIVIDUAL_SP_KEY_PURPOSE)),
        attribute(OID_MESSAGE_DIGEST, tlv(OCTET_STRING, hashlib.sha256(content[header:]).digest())),
    ]
    if description or url:  # as osslsigncode: no SpcSpOpusInfo when there is nothing to say
        attributes.append(attribute(SPC_SP_OPUS_INFO, _opus_info(description, url)))
    # The signature covers the attributes as a SET OF (RFC 2315 9.3); they travel as [0].
    signature = sign(set_of(attributes))
    leaf = certificates[0]
    signer_info = [
        integer(1),
        tlv(SEQUENCE, leaf.issuer.public_bytes(), integer(leaf.serial_number)),
        SHA256_ALGORITHM,
        set_of(attributes, CONTEXT_0),
        tlv(SEQUENCE, OID_ECDSA_SHA256) if ecdsa else tlv(SEQUENCE, OID_RSA, tlv(NULL)),
        tlv(OCTET_STRING, signature),
    ]
    if timestamp is not None:
        signer_info.append(tlv(0xA1, attribute(SPC_RFC3161_TIMESTAMP, timestamp(signature))))
    ders = {c.public_bytes(serialization.Encoding.DER) for c in certificates}  # each once
    body = tlv(
        SEQUENCE,
        integer(1),
        tlv(SET, SHA256_ALGORITHM),
        tlv(SEQUENCE, content_type, tlv(CONTEXT_0, content)),
        set_of(sorted(ders), CONTEXT_0),
        tlv(SET, tlv(SEQUENCE, *signer_info)),
    )
    return tlv(SEQUENCE, OID_SIGNED_DATA, tlv(CONTEXT_0, body))


# -- RFC 3161 timestamps -------------------------------------------------------------------------
def request_timestamp(url: str, signature: bytes, timeout: float) -> bytes:
    """An RFC 3161 token from the TSA at ``url`` over SHA-256 of ``signature`` (what
    osslsigncode ``-ts`` asks for: no nonce, the TSA's certificate included); its DER.
    Raises :class:`SigningFailed`: a TSA that is down or answers nonsense may recover."""
    imprint = hashlib.sha256(signature).digest()
    query = tsp.TimeStampReq(
        {
            "version": 1,
            "message_imprint": {"hash_algorithm": {"algorithm": "sha256"}, "hashed_message": imprint},
            "cert_req": True,
        }
    ).dump()
    request = urllib.request.Request(  # noqa: S310 (the scheme was checked at start-up: http or https)
        url,
        data=query,
        headers={"Content-Type": "application/timestamp-query", "Accept": "application/timestamp-reply"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:  # noqa: S310
            reply = answer.read(1 << 20)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise SigningFailed(f"timestamp server unreachable or refusing: {_reason(e)}") from None
    try:
        response = tsp.TimeStampResp.load(reply)
        status = response["status"]["status"].native
        if status not in ("granted", "granted_with_mods"):
            raise SigningFailed(f"timestamp server refused the request ({status})")
        token = response["time_stamp_token"]
        info = token["content"]["encap_content_info"]["content"].parsed
        if info["message_imprint"]["hashed_message"].native != imprint:
            raise SigningFailed("the timestamp server stamped something else")
        return bytes(token.dump())
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise SigningFailed(f"timestamp server answered no RFC 3161 token: {type(e).__name__}") from None


def _reason(e: BaseException) -> str:
    reason = getattr(e, "reason", None)
    return str(reason if reason is not None else e) or type(e).__name__
