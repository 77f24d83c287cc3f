"""The signing log: every signature the server releases, recorded durably first, as a leaf of
an append-only Merkle tree whose heads the server signs (see docs/signing-log.md)."""

from .log import Checkpoint, LogCorrupt, LogUnavailable, SignLog, parse_public_key, public_key_text
from .record import Recorder, RequestContext

__all__ = [
    "Checkpoint",
    "LogCorrupt",
    "LogUnavailable",
    "Recorder",
    "RequestContext",
    "SignLog",
    "parse_public_key",
    "public_key_text",
]
