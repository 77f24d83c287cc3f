"""Minimal OpenPGP (RFC 4880, v4) packets: RSA public keys, user IDs, signatures, armour.

Written by hand so a detached signature costs one RSA operation over a hash state that the
server already computed while the upload streamed in, made by a
:class:`~sealbox.keys.SigningKey` wherever it lives (a file, a PKCS#11 token). Only what
sealbox emits is supported.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from ..errors import ConfigError
from ..keys import HashName, SigningKey
from ..keys import PublicKey as AnyPublicKey

PUBKEY_RSA = 1
HASH_IDS = {"sha256": 8, "sha384": 9, "sha512": 10}
SIG_BINARY = 0x00
SIG_POSITIVE_CERT = 0x13
TAG_SIGNATURE, TAG_PUBLIC_KEY, TAG_USER_ID = 2, 6, 13


def _mpi(n: int) -> bytes:
    raw = n.to_bytes((n.bit_length() + 7) // 8 or 1, "big")
    return struct.pack(">H", n.bit_length()) + raw


def _packet(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 192:
        length = bytes([n])
    elif n < 8384:
        n2 = n - 192
        length = bytes([(n2 >> 8) + 192, n2 & 0xFF])
    else:
        length = b"\xff" + struct.pack(">I", n)
    return bytes([0xC0 | tag]) + length + body


def _subpacket(kind: int, data: bytes) -> bytes:
    assert len(data) + 1 < 192
    return bytes([len(data) + 1, kind]) + data


def _crc24_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        crc = i << 16
        for _ in range(8):
            crc <<= 1
            if crc & 0x1000000:
                crc ^= 0x1864CFB
        table.append(crc & 0xFFFFFF)
    return tuple(table)


_CRC24 = _crc24_table()


def crc24(data: bytes) -> int:
    """The OpenPGP armour checksum (RFC 4880 6.1), table-driven."""
    crc = 0xB704CE
    for byte in data:
        crc = ((crc << 8) & 0xFFFFFF) ^ _CRC24[(crc >> 16) ^ byte]
    return crc


def armor(kind: str, data: bytes) -> bytes:
    b64 = base64.b64encode(data).decode()
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    check = base64.b64encode(crc24(data).to_bytes(3, "big")).decode()
    text = f"-----BEGIN PGP {kind}-----\n\n" + "\n".join(lines) + f"\n={check}\n-----END PGP {kind}-----\n"
    return text.encode("ascii")


def dearmor(text: bytes) -> bytes:
    lines = text.decode("ascii", "replace").strip().splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.startswith("-----BEGIN PGP "))
        blank = next(i for i in range(start + 1, len(lines)) if not lines[i].strip())
    except StopIteration:
        raise ConfigError("not an ASCII-armoured OpenPGP block") from None
    body = []
    for line in lines[blank + 1 :]:
        if line.startswith(("=", "-----END")):
            break
        body.append(line.strip())
    return base64.b64decode("".join(body))


@dataclass(frozen=True)
class PublicKey:
    """An OpenPGP v4 RSA primary key: its packet body, creation time and fingerprint."""

    body: bytes
    created: int

    @classmethod
    def from_rsa(cls, key: rsa.RSAPublicKey, created: int) -> PublicKey:
        nums = key.public_numbers()
        body = bytes([4]) + struct.pack(">I", created) + bytes([PUBKEY_RSA]) + _mpi(nums.n) + _mpi(nums.e)
        return cls(body, created)

    @classmethod
    def from_armored(cls, text: bytes) -> PublicKey:
        """Read the primary key of an armoured public key block."""
        data = dearmor(text)
        if not data or not data[0] & 0x80:
            raise ConfigError("OpenPGP data does not start with a packet")
        if data[0] & 0x40:  # new format
            tag, first = data[0] & 0x3F, data[1]
            if first < 192:
                length, off = first, 2
            elif first < 224:
                length, off = ((first - 192) << 8) + data[2] + 192, 3
            else:
                length, off = struct.unpack(">I", data[2:6])[0], 6
        else:  # old format
            tag, ltype = (data[0] >> 2) & 0x0F, data[0] & 3
            size = {0: 1, 1: 2, 2: 4}.get(ltype)
            if size is None:
                raise ConfigError("indeterminate-length OpenPGP packet")
            length = int.from_bytes(data[1 : 1 + size], "big")
            off = 1 + size
        body = data[off : off + length]
        if tag != TAG_PUBLIC_KEY or len(body) < 6 or body[0] != 4 or body[5] != PUBKEY_RSA:
            raise ConfigError("expected a v4 RSA OpenPGP primary public key")
        return cls(body, struct.unpack(">I", body[1:5])[0])

    @property
    def fingerprint(self) -> bytes:
        return hashlib.sha1(
            b"\x99" + struct.pack(">H", len(self.body)) + self.body, usedforsecurity=False
        ).digest()

    @property
    def key_id(self) -> bytes:
        return self.fingerprint[-8:]

    def matches(self, key: AnyPublicKey) -> bool:
        return isinstance(key, rsa.RSAPublicKey) and PublicKey.from_rsa(key, self.created).body == self.body


def _signature(
    key: SigningKey,
    pub: PublicKey,
    sig_type: int,
    hash_state: Any,
    hash_name: HashName,
    created: int,
    extra_hashed: bytes = b"",
) -> bytes:
    """Finish ``hash_state`` (which already holds the signed content) into a signature packet."""
    hashed_sub = (
        _subpacket(2, struct.pack(">I", created))
        + _subpacket(33, bytes([4]) + pub.fingerprint)
        + extra_hashed
    )
    head = (
        bytes([4, sig_type, PUBKEY_RSA, HASH_IDS[hash_name]])
        + struct.pack(">H", len(hashed_sub))
        + hashed_sub
    )
    hash_state.update(head)
    hash_state.update(b"\x04\xff" + struct.pack(">I", len(head)))
    digest = hash_state.digest()
    sig = key.sign_digest(digest, hash_name, "pkcs1v15")
    unhashed = _subpacket(16, pub.key_id)
    body = head + struct.pack(">H", len(unhashed)) + unhashed + digest[:2] + _mpi(int.from_bytes(sig, "big"))
    return _packet(TAG_SIGNATURE, body)


def detached_signature(
    key: SigningKey, pub: PublicKey, hash_state: Any, hash_name: HashName, created: int
) -> bytes:
    """An armoured detached binary-document signature; ``hash_state`` covers the file."""
    return armor("SIGNATURE", _signature(key, pub, SIG_BINARY, hash_state, hash_name, created))


def public_key_block(key: SigningKey, user_id: str, created: int) -> bytes:
    """An armoured transferable public key: key packet, user ID and its self-signature."""
    if not isinstance(key.public_key, rsa.RSAPublicKey):
        raise ConfigError(f"key '{key.name}': OpenPGP keys made here are RSA keys")
    pub = PublicKey.from_rsa(key.public_key, created)
    uid = user_id.encode("utf-8")
    h = hashlib.sha256(b"\x99" + struct.pack(">H", len(pub.body)) + pub.body)
    h.update(b"\xb4" + struct.pack(">I", len(uid)) + uid)
    extra = (
        _subpacket(27, b"\x03")  # key flags: certify + sign
        + _subpacket(21, bytes([HASH_IDS["sha512"], HASH_IDS["sha384"], HASH_IDS["sha256"]]))
    )
    sig = _signature(key, pub, SIG_POSITIVE_CERT, h, "sha256", created, extra)
    return armor("PUBLIC KEY BLOCK", _packet(TAG_PUBLIC_KEY, pub.body) + _packet(TAG_USER_ID, uid) + sig)


SIG_TEXT = 0x01
_HASH_HEADER = {"sha256": "SHA256", "sha384": "SHA384", "sha512": "SHA512"}


def signature_packet(
    key: SigningKey, pub: PublicKey, hash_state: Any, hash_name: HashName, created: int
) -> bytes:
    """A binary (unarmoured) detached binary-document signature packet, as ``gpg -b`` writes
    it; ``hash_state`` covers the signed bytes."""
    return _signature(key, pub, SIG_BINARY, hash_state, hash_name, created)


def clearsigned(key: SigningKey, pub: PublicKey, text: str, hash_name: HashName, created: int) -> bytes:
    """``text`` in the cleartext signature framework (RFC 4880 section 7), as ``gpg --clearsign``
    writes it: a canonical-text signature (type 0x01) over the lines with trailing spaces and tabs
    stripped, joined by CRLF, without the line ending before the signature; lines starting with
    ``-`` dash-escaped. ``text`` has ``\\n`` line endings; one final ``\\n`` is not part of it
    (the framework cannot tell a text with one from a text without)."""
    body = text[:-1] if text.endswith("\n") else text
    lines = body.split("\n")
    signed = "\r\n".join(line.rstrip(" \t") for line in lines).encode("utf-8")
    h = hashlib.new(hash_name, signed)
    sig = armor("SIGNATURE", _signature(key, pub, SIG_TEXT, h, hash_name, created))
    escaped = "".join(("- " + line if line.startswith("-") else line) + "\n" for line in lines)
    head = f"-----BEGIN PGP SIGNED MESSAGE-----\nHash: {_HASH_HEADER[hash_name]}\n\n"
    return (head + escaped).encode("utf-8") + sig
