"""Exception hierarchy. Every error says what failed and why, in one line."""


class SealboxError(Exception):
    """Base class for every error sealbox raises on purpose."""


class ConfigError(SealboxError):
    """A configuration file or value is invalid."""


class KeyUnlockError(SealboxError):
    """A private key could not be unlocked (wrong passphrase, unreadable file)."""


class TokenError(SealboxError):
    """An upload token is invalid, expired, or bound to another address."""


class FormatRejected(SealboxError):
    """The input can never be signed in this format (wrong type, blocked name, malformed).

    Deterministic: the server remembers it and the client stops retrying.
    """


class SigningFailed(SealboxError):
    """Signing failed for a reason that may not repeat (tool crash, timeout)."""


class VerificationFailed(SealboxError):
    """A signature did not verify."""
