"""Where a PKCS#11 key lives, as the config names it (importable without a PKCS#11 binding)."""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Pkcs11Spec:
    """Where a PKCS#11 key lives: module, token (by label), key object (by label and/or id),
    the certificate chain (a PEM file, leaf first; else the token's certificate for the key)
    and the environment the module reads when it initialises (not secrets)."""

    name: str
    module: Path
    token: str
    label: str | None = None
    id: bytes | None = None
    chain: Path | None = None
    env: Mapping[str, str] = field(default_factory=dict)

    def search(self) -> dict[str, Any]:
        """The private key object's label and/or id, as python-pkcs11's ``get_key`` takes them."""
        return {k: v for k, v in (("label", self.label), ("id", self.id)) if v is not None}

    def uri(self) -> str:
        """An RFC 7512 URI of the private key, without the PIN."""
        q = urllib.parse.quote
        parts = [f"token={q(self.token, safe='')}"]
        if self.label is not None:
            parts.append(f"object={q(self.label, safe='')}")
        if self.id is not None:
            parts.append("id=" + "".join(f"%{b:02x}" for b in self.id))
        return "pkcs11:" + ";".join([*parts, "type=private"])
