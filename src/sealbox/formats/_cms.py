"""Minimal CMS (RFC 5652) SignedData, DER, written by hand around one signature of the signed
attributes, so the signature can come from any :class:`~sealbox.keys.SigningKey` (a key file, a
PKCS#11 token). Only what sealbox emits: content attached, SHA-256, RSA PKCS#1 v1.5, signer
identified by issuer and serial number, signed attributes content type, signing time and
message digest (what ``openssl smime -sign -binary -nodetach`` makes, less S/MIME capabilities).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Callable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization

SEQUENCE, SET, OCTET_STRING, INTEGER, NULL, UTC_TIME = 0x30, 0x31, 0x04, 0x02, 0x05, 0x17
CONTEXT_0 = 0xA0  # [0], constructed

# DER of the object identifiers used (tag, length, value)
OID_DATA = bytes.fromhex("06092a864886f70d010701")  # 1.2.840.113549.1.7.1
OID_SIGNED_DATA = bytes.fromhex("06092a864886f70d010702")  # 1.2.840.113549.1.7.2
OID_CONTENT_TYPE = bytes.fromhex("06092a864886f70d010903")  # 1.2.840.113549.1.9.3
OID_MESSAGE_DIGEST = bytes.fromhex("06092a864886f70d010904")  # 1.2.840.113549.1.9.4
OID_SIGNING_TIME = bytes.fromhex("06092a864886f70d010905")  # 1.2.840.113549.1.9.5
OID_SHA256 = bytes.fromhex("0609608648016503040201")  # 2.16.840.1.101.3.4.2.1
OID_RSA = bytes.fromhex("06092a864886f70d010101")  # 1.2.840.113549.1.1.1


def oid(dotted: str) -> bytes:
    """The DER of the object identifier ``dotted`` (e.g. ``"1.2.840.113549.1.7.2"``)."""
    first, second, *rest = (int(p) for p in dotted.split("."))
    body = bytearray()
    for arc in (40 * first + second, *rest):
        chunk = [arc & 0x7F]
        while arc := arc >> 7:
            chunk.append(0x80 | (arc & 0x7F))
        body += bytes(reversed(chunk))
    return tlv(0x06, bytes(body))


def attribute(kind: bytes, value: bytes) -> bytes:
    """One (signed or unsigned) attribute: its OID and a SET of the one ``value``."""
    return tlv(SEQUENCE, kind, tlv(SET, value))


def tlv(tag: int, *parts: bytes) -> bytes:
    """One DER element: tag, definite length, the parts' bytes."""
    content = b"".join(parts)
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + content


def integer(n: int) -> bytes:
    """A non-negative DER INTEGER (a leading zero keeps the top bit clear)."""
    return tlv(INTEGER, n.to_bytes(n.bit_length() // 8 + 1, "big"))


def set_of(elements: Sequence[bytes], tag: int = SET) -> bytes:
    """DER SET OF: the elements in ascending order of their encodings (X.690 11.6)."""
    return tlv(tag, *sorted(elements))


#: the AlgorithmIdentifier of SHA-256 (absent parameters written as NULL, as OpenSSL does)
SHA256_ALGORITHM = tlv(SEQUENCE, OID_SHA256, tlv(NULL))


def signed_data(
    data: bytes,
    chain: Sequence[x509.Certificate],
    sign: Callable[[bytes], bytes],
    now: dt.datetime | None = None,
) -> bytes:
    """A DER ContentInfo holding SignedData with ``data`` attached, signed by ``chain[0]``'s
    key through ``sign`` (data -> RSA PKCS#1 v1.5 signature over its SHA-256)."""
    when = (now or dt.datetime.now(dt.UTC)).strftime("%y%m%d%H%M%SZ").encode()  # UTCTime: 1950-2049
    attributes = [
        attribute(OID_CONTENT_TYPE, OID_DATA),
        attribute(OID_SIGNING_TIME, tlv(UTC_TIME, when)),
        attribute(OID_MESSAGE_DIGEST, tlv(OCTET_STRING, hashlib.sha256(data).digest())),
    ]
    # The signature covers the attributes as a SET OF (RFC 5652 5.4); they travel as [0].
    signature = sign(set_of(attributes))
    leaf = chain[0]
    signer_info = tlv(
        SEQUENCE,
        integer(1),
        tlv(SEQUENCE, leaf.issuer.public_bytes(), integer(leaf.serial_number)),
        SHA256_ALGORITHM,
        set_of(attributes, CONTEXT_0),
        tlv(SEQUENCE, OID_RSA, tlv(NULL)),
        tlv(OCTET_STRING, signature),
    )
    certificates = [c.public_bytes(serialization.Encoding.DER) for c in chain]
    content = tlv(
        SEQUENCE,
        integer(1),
        tlv(SET, SHA256_ALGORITHM),
        tlv(SEQUENCE, OID_DATA, tlv(CONTEXT_0, tlv(OCTET_STRING, data))),
        set_of(certificates, CONTEXT_0),
        tlv(SET, signer_info),
    )
    return tlv(SEQUENCE, OID_SIGNED_DATA, tlv(CONTEXT_0, content))
