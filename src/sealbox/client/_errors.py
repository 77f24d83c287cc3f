"""What can go wrong when signing through servers, one exception type per kind.

Laid out the way httpx lays out its exceptions: one base to catch everything, and a subclass
per cause, so that callers branch with ``except``/``isinstance`` and never on message text::

    ClientError              the base; raised as such when the client itself is set up wrongly
    │                        (no server given, no server for a format, an unreadable CA bundle)
    ├── SigningRefused       a server answered, and the answer is no: a 4xx, a failed signing
    │                        job, a certificate that does not verify. Asking again is pointless.
    ├── TokenRefused         the token was refused: the issuer would not mint one (credentials,
    │                        a bad request) or a signing server rejected it (invalid, expired,
    │                        bound to another address, missing)
    ├── OutputUnwritable     the result could not be written where it was asked (a folder
    │                        missing or read-only, a name too long, a full disk): ours, not a
    │                        server's, so no server is asked again
    ├── InputChanged         the file changed (grew or shrank) while it was being sent: what
    │                        would be signed is not the file
    └── ServerUnavailable    no server gave an answer in time: refused or reset connections,
                             timeouts, hosts that stopped answering, server errors (5xx) until
                             the time allowed ran out
"""

from __future__ import annotations

from ..errors import SealboxError

__all__ = [
    "ClientError",
    "InputChanged",
    "OutputUnwritable",
    "ServerUnavailable",
    "SigningRefused",
    "TokenRefused",
]


class ClientError(SealboxError):
    """A file could not be signed or a token minted; the message says which server said what."""


class SigningRefused(ClientError):
    """A server refused the input or the request (4xx, a failed job); retrying will not help."""


class TokenRefused(ClientError):
    """The token issuer refused to mint a token, or a signing server refused the token."""


class ServerUnavailable(ClientError):
    """No server answered in time (connection errors, timeouts, 5xx until the deadline)."""


class OutputUnwritable(ClientError):
    """The result (or its cache copy) could not be written where it was asked: a local file
    system error, which asking a server again would not mend."""


class InputChanged(ClientError):
    """The file changed while it was being sent (a build still writing it): what the server
    got is not the file, so it is not signed; sign it once it is written."""
