"""Format names as they travel on the wire. Kept free of heavy imports: the CLI, the client,
the task runner and the signer registry all read it."""

from __future__ import annotations

#: every wire format name a server can serve
FORMATS = (
    "gpg",
    "sha2signcode",
    "sha2signcodestub",
    "sha2signcode-v2",
    "sha2signcodestub-v2",
    "signcode",
    "osslsigncode",
    "mar",
    "mar_sha384",
    "jar",
    "focus-jar",
    "emevoucher",
    "widevine",
    "widevine_blessed",
    "dmg",
)

#: client-side names that travel under another wire name (signtool sends macapp as dmg)
ALIASES = {"macapp": "dmg", "dmgv2": "dmg"}

#: every name a client or a task may ask for
KNOWN = frozenset(FORMATS) | frozenset(ALIASES)
