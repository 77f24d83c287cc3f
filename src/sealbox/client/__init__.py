"""The sealbox client library: sign files through one or more servers.

Used by ``sealbox sign``, ``sealbox token``, the task runner and the tests alike::

    with SigningClient([parse_host("127.0.0.1:9110")], ca=Path("ca.pem"), token=token) as c:
        c.sign(Path("setup.exe"), ["sha2signcode", "gpg"])

``AsyncSigningClient`` is the same client for code that already runs an event loop.

Errors come as one exception type per kind (see :mod:`sealbox.client._errors`), all under
:class:`ClientError`: :class:`SigningRefused` (a server said no: the input cannot be signed,
a 4xx), :class:`TokenRefused` (the issuer would not mint a token, or a server rejected it),
:class:`ServerUnavailable` (no server answered in time), :class:`OutputUnwritable` (the
result could not be written where it was asked) and :class:`InputChanged` (the file changed
while it was being sent). Catch them by type::

    try:
        token = request_token(server, ca, user, password, ip="10.0.0.5", duration=1200)
        with SigningClient([server], ca, token) as c:
            c.sign_one(Path("setup.exe"), "sha2signcode", Path("setup.exe"))
    except ServerUnavailable:
        ...  # try again later
    except (SigningRefused, TokenRefused) as e:
        ...  # will not work as asked: report e

``sign_image(client, "registry.example/app:1.0")`` signs a container image in its registry
(format ``sigstore``) and pushes the signature as a cosign attachment (:class:`RegistryError`
for the registry's part).

``sign`` and ``sign_many`` never raise for a file: its :class:`SignOutcome` carries the
message (``error``) and the exception (``exception``), e.g.
``isinstance(outcome.exception, ServerUnavailable)``.
"""

from typing import TYPE_CHECKING, Any

from ._aio import AsyncSigningClient, SignOutcome, describe_error
from ._core import SigningClient, request_token
from ._errors import (
    ClientError,
    InputChanged,
    OutputUnwritable,
    ServerUnavailable,
    SigningRefused,
    TokenRefused,
)
from ._hosts import Server, parse_host
from ._logproof import LogProof, load_log_key
from ._plan import detached_suffix, order_formats, wire_name

if TYPE_CHECKING:
    from ._images import (
        ImageRef,
        ImageSignature,
        RegistryAuth,
        RegistryError,
        RegistryLogin,
        sign_image,
        sign_image_async,
    )

#: imported when first asked for: ``sealbox sign`` (a cold start per call) never needs them
_IMAGES = frozenset(
    {
        "ImageRef",
        "ImageSignature",
        "RegistryAuth",
        "RegistryError",
        "RegistryLogin",
        "sign_image",
        "sign_image_async",
    }
)


def __getattr__(name: str) -> Any:
    if name in _IMAGES:
        from . import _images

        return getattr(_images, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AsyncSigningClient",
    "ClientError",
    "ImageRef",
    "ImageSignature",
    "InputChanged",
    "LogProof",
    "OutputUnwritable",
    "RegistryAuth",
    "RegistryError",
    "RegistryLogin",
    "Server",
    "ServerUnavailable",
    "SignOutcome",
    "SigningClient",
    "SigningRefused",
    "TokenRefused",
    "describe_error",
    "detached_suffix",
    "load_log_key",
    "order_formats",
    "parse_host",
    "request_token",
    "sign_image",
    "sign_image_async",
    "wire_name",
]
