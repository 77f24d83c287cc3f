"""Stateless upload tokens: ``ip:valid_from:valid_to:chaff!signature``.

The signature is the unpadded base64 of HMAC-SHA256 over the data part. Any server that
holds one of the secrets accepts the token, so servers share no state; listing several
secrets gives rotation (the first one mints).
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import TokenError

__all__ = ["MAX_TOKEN_LENGTH", "TokenInfo", "mint", "normalize_ip", "verify"]

MAX_TOKEN_LENGTH = 512
#: the unpadded base64 of a SHA-256 HMAC (32 bytes), as ``_mac`` writes it
_SIGNATURE = re.compile(r"[A-Za-z0-9+/]{43}")
#: what a minted token may carry as its address: an IPv6 zone name is free text otherwise
_TOKEN_IP = re.compile(r"[0-9A-Za-z.:]+(%[0-9A-Za-z._-]+)?")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _mac(secret: bytes, data: str) -> str:
    return _b64(hmac.new(secret, data.encode("ascii"), "sha256").digest())


def normalize_ip(ip: str) -> str:
    """Canonical text of an address; IPv4-mapped IPv6 (``::ffff:a.b.c.d``) becomes IPv4."""
    addr = ipaddress.ip_address(ip.strip())
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def mint(secret: bytes, ip: str, duration: int, now: float | None = None) -> str:
    """Create a token for uploads from ``ip`` valid for ``duration`` seconds from now."""
    if duration <= 0:
        raise TokenError("duration must be a positive number of seconds")
    ip = normalize_ip(ip)
    if not _TOKEN_IP.fullmatch(ip):  # an IPv6 zone may hold any character but "/"
        raise ValueError(f"{ip!r}: a zone name must be letters, digits, '.', '_' or '-'")
    valid_from = int(time.time() if now is None else now)
    chaff = _b64(os.urandom(16))
    data = f"{ip}:{valid_from}:{valid_from + duration}:{chaff}"
    return f"{data}!{_mac(secret, data)}"


@dataclass(frozen=True)
class TokenInfo:
    """What a valid token grants: the address it is bound to and its validity (epoch seconds)."""

    ip: str
    valid_from: int
    valid_to: int


def verify(token: str | bytes, secrets: Sequence[bytes], peer_ip: str, now: float | None = None) -> TokenInfo:
    """Check a token against every secret; raise :class:`TokenError` saying why it is refused."""
    if isinstance(token, bytes):
        try:
            token = token.decode("ascii")
        except UnicodeDecodeError:
            raise TokenError("token is not ASCII") from None
    if not token.isascii():
        raise TokenError("token is not ASCII")
    token = token.strip()
    if not token or len(token) > MAX_TOKEN_LENGTH:
        raise TokenError("token is empty or too long")
    if not token.isprintable() or " " in token:
        raise TokenError("token contains spaces or control characters")
    data, sep, signature = token.partition("!")
    if not sep:
        raise TokenError("token has no signature part")
    if not _SIGNATURE.fullmatch(signature):
        raise TokenError("token signature is not the base64 of an HMAC-SHA256")
    # Compare against every secret without stopping early, so timing reveals nothing.
    matched = False
    for secret in secrets:
        matched |= hmac.compare_digest(_mac(secret, data), signature)
    if not matched:
        raise TokenError("token signature does not match any configured secret", "forged")
    parts = data.rsplit(":", 3)  # the address may be IPv6, with colons of its own
    if len(parts) != 4:
        raise TokenError("token data does not have four fields")
    ip, from_s, to_s, _chaff = parts
    try:
        valid_from, valid_to = int(from_s), int(to_s)
    except ValueError:
        raise TokenError("token validity fields are not integers") from None
    t = time.time() if now is None else now
    if t < valid_from:
        raise TokenError("token is not valid yet", "not_yet_valid")
    if t > valid_to:
        raise TokenError("token has expired", "expired")
    try:
        if normalize_ip(ip) != normalize_ip(peer_ip):
            raise TokenError(f"token is bound to {ip}, request came from {normalize_ip(peer_ip)}", "wrong_ip")
    except ValueError:
        raise TokenError("token address is not an IP address") from None
    return TokenInfo(ip=ip, valid_from=valid_from, valid_to=valid_to)
