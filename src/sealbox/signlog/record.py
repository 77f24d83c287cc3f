"""What the server records for each signature it releases, and who asked for it.

An entry (its exact JSON bytes are a leaf of the log's tree)::

    {"index": 17, "time": "2026-05-01T10:00:00.123Z", "level": "dep", "format": "gpg",
     "key": {"name": "gpg", "fingerprint": "sha256:<hex of the public key's DER>"},
     "input": {"sha1": ..., "sha256": ..., "size": 1024, "filename": "app.bin"},
     "output": {"sha1": ..., "sha256": ..., "size": 833},
     "request": {"kind": "upload", "client": "10.0.0.5",
                 "token": {"ip": "10.0.0.5", "valid_from": ..., "valid_to": ..., "issuer": "ci"}},
     "server": {"instance": "<log instance>", "host": "<hostname>"}, "ran_in": "worker"}

No secret and no token MAC: the token appears as the address it is bound to, its validity
window and, when this server minted it, the issuer's user name. A job started by a ``GET``
(content the server already held) records that request: kind ``get``, no token.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..keys import SigningKey
from ..server.tokens import TokenInfo
from .log import SignLog

#: tokens this server minted, remembered to name their issuer (a token is valid an hour at most)
ISSUED_ENTRIES = 100_000


@dataclass(frozen=True)
class RequestContext:
    """The request that started a job."""

    kind: str  # "upload" or "get"
    client: str  # the peer address (the client's, behind a trusted PROXY-protocol balancer)
    filename: str | None = None  # as sent with an upload
    token: TokenInfo | None = None
    issuer: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "client": self.client}
        if self.token is not None:
            out["token"] = {
                "ip": self.token.ip,
                "valid_from": self.token.valid_from,
                "valid_to": self.token.valid_to,
                "issuer": self.issuer,
            }
        return out


class Issuers:
    """Which issuer minted each token this server handed out (bounded, in memory)."""

    def __init__(self) -> None:
        self._by_token: OrderedDict[str, str] = OrderedDict()

    def remember(self, token: str, issuer: str) -> None:
        self._by_token[_token_key(token)] = issuer
        while len(self._by_token) > ISSUED_ENTRIES:
            self._by_token.popitem(last=False)

    def issuer(self, token: str) -> str | None:
        return self._by_token.get(_token_key(token))


def _token_key(token: str) -> str:
    # Keyed by a hash: the table holds no token that could still be used.
    return hashlib.sha256(token.strip().encode("utf-8", "replace")).hexdigest()


class Recorder:
    """Builds a signature's entry and appends it to the log."""

    def __init__(self, signlog: SignLog, level: str, keys: Mapping[str, SigningKey | None]) -> None:
        """``keys``: each format's key (None for a format without one)."""
        self.log = signlog
        self.level = level
        self.issuers = Issuers()
        # the fingerprint is the SHA-256 of the public key's DER SubjectPublicKeyInfo
        self._keys = {
            fmt: ({"name": k.name, "fingerprint": f"sha256:{k.fingerprint}"} if k is not None else None)
            for fmt, k in keys.items()
        }
        self._server = {"instance": signlog.instance, "host": signlog.host}

    def entry(
        self,
        fmt: str,
        context: RequestContext | None,
        source: Mapping[str, Any],
        output: Mapping[str, Any],
        ran_in: str | None,
    ) -> dict[str, Any]:
        """``source``: sha1, sha256, size and filename of the input; ``output``: sha1, sha256, size."""
        now = time.time()
        return {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z",
            "level": self.level,
            "format": fmt,
            "key": self._keys.get(fmt),
            "input": dict(source),
            "output": dict(output),
            "request": context.to_json() if context is not None else None,
            "server": self._server,
            "ran_in": ran_in,
        }
