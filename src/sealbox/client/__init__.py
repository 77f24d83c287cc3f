"""The sealbox client library: sign files through one or more servers.

Used by ``sealbox sign``, ``sealbox token``, the task runner and the tests alike::

    with SigningClient([parse_host("127.0.0.1:9110")], ca=Path("ca.pem"), token=token) as c:
        c.sign(Path("setup.exe"), ["sha2signcode", "gpg"])

``AsyncSigningClient`` is the same client for code that already runs an event loop.
"""

from .aio import AsyncSigningClient, ClientError, SignOutcome
from .core import SigningClient, request_token
from .hosts import Server, parse_host
from .plan import detached_suffix, order_formats, wire_name

__all__ = [
    "AsyncSigningClient",
    "ClientError",
    "Server",
    "SignOutcome",
    "SigningClient",
    "detached_suffix",
    "order_formats",
    "parse_host",
    "request_token",
    "wire_name",
]
