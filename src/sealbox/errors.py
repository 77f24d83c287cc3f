"""Exception hierarchy. Every error says what failed and why, in one line."""

__all__ = [
    "ConfigError",
    "FormatRejected",
    "KeyUnlockError",
    "SealboxError",
    "SigningFailed",
    "TokenError",
    "VerificationFailed",
]


class SealboxError(Exception):
    """Base class for every error sealbox raises on purpose."""


class ConfigError(SealboxError):
    """A configuration file or value is invalid."""


class KeyUnlockError(SealboxError):
    """A private key could not be unlocked (wrong passphrase, unreadable file)."""


class TokenError(SealboxError):
    """An upload token is invalid, expired, or bound to another address.

    ``kind`` sorts the refusals for the metrics: malformed, forged, not_yet_valid, expired,
    wrong_ip."""

    def __init__(self, message: str, kind: str = "malformed") -> None:
        super().__init__(message)
        self.kind = kind


class FormatRejected(SealboxError):
    """The input can never be signed in this format (wrong type, blocked name, malformed).

    Deterministic: the server remembers it and the client stops retrying.
    """


class SigningFailed(SealboxError):
    """Signing failed for a reason that may not repeat (tool crash, timeout)."""


class VerificationFailed(SealboxError):
    """A signature did not verify."""
