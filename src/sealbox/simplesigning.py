"""The "simple signing" payload of a sigstore (cosign) container image signature.

What ``cosign sign`` and ``skopeo copy --sign-by-sigstore-private-key`` sign, and what
containers/image checks against a ``sigstoreSigned`` policy::

    {"critical": {"identity": {"docker-reference": "registry.example/team/app:1.0"},
                  "image": {"docker-manifest-digest": "sha256:<64 hex>"},
                  "type": "cosign container image signature"},
     "optional": {"creator": "sealbox 0.1.0"}}

The client builds it (:func:`build`), the ``sigstore`` signer checks it (:func:`parse`) and
signs its bytes as received. Kept free of heavy imports: the client reads it on build workers.
See docs/formats/container.md.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ATTACHMENT_SUFFIX",
    "MAX_PAYLOAD",
    "PAYLOAD_MEDIA_TYPE",
    "SIGNATURE_ANNOTATION",
    "SIGNATURE_TYPE",
    "Payload",
    "PayloadError",
    "build",
    "check_digest",
    "check_reference",
    "parse",
]

SIGNATURE_TYPE = "cosign container image signature"
#: the attachment layer's media type and the annotation holding the base64 signature
PAYLOAD_MEDIA_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
#: the attachment of image ``sha256:H`` is tagged ``sha256-H.sig`` in the image's repository
ATTACHMENT_SUFFIX = ".sig"
#: a real payload is ~300 bytes; anything much larger is not one
MAX_PAYLOAD = 4096
MAX_CREATOR = 256

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
# distribution/reference's grammar, ASCII only: a domain (host[:port]), path components, a tag
_DOMAIN_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*(?::[0-9]{{1,5}})?"
_PATH_PART = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REFERENCE = re.compile(
    rf"(?P<name>(?P<domain>{_DOMAIN})/{_PATH_PART}(?:/{_PATH_PART})*)(?::(?P<tag>[\w][\w.-]{{0,127}}))?"
)
_MAX_NAME = 255


class PayloadError(ValueError):
    """The payload is not a simple-signing payload sealbox signs; the message says why."""


@dataclass(frozen=True)
class Payload:
    """What a well-formed payload says."""

    reference: str
    digest: str
    creator: str | None = None
    timestamp: int | None = None


def check_reference(reference: str) -> str:
    """``reference`` if it is a fully qualified docker reference (``host[:port]/path[:tag]``,
    no digest), else :class:`PayloadError`. A short name (``app``, ``library/app``) is refused:
    which registry it means depends on the verifier's configuration."""
    m = _REFERENCE.fullmatch(reference)
    if m is None:
        raise PayloadError("docker-reference is not a reference of the form host[:port]/path[:tag]")
    domain = m.group("domain")
    if not ("." in domain or ":" in domain or domain == "localhost"):
        raise PayloadError("docker-reference must name its registry (a host with a dot or a port)")
    if len(m.group("name")) > _MAX_NAME:
        raise PayloadError(f"docker-reference names a repository longer than {_MAX_NAME} characters")
    return reference


def check_digest(digest: str) -> str:
    """``digest`` if it is ``sha256:`` and 64 lowercase hex digits, else :class:`PayloadError`."""
    if _DIGEST.fullmatch(digest) is None:
        raise PayloadError("docker-manifest-digest is not sha256: and 64 lowercase hex digits")
    return digest


def build(reference: str, digest: str, creator: str | None = None) -> bytes:
    """The payload for image ``digest`` known as ``reference``, as compact JSON (cosign's key order)."""
    optional: dict[str, Any] | None = {"creator": creator} if creator else None
    doc = {
        "critical": {
            "identity": {"docker-reference": check_reference(reference)},
            "image": {"docker-manifest-digest": check_digest(digest)},
            "type": SIGNATURE_TYPE,
        },
        "optional": optional,
    }
    data = json.dumps(doc, separators=(",", ":"), ensure_ascii=True).encode()
    parse(data)  # what the server will accept, checked before it is sent
    return data


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise PayloadError(f"duplicate key {key!r:.60}")
        out[key] = value
    return out


def _constant(name: str) -> Any:
    raise PayloadError(f"{name} is not JSON")


def _object(value: Any, where: str, keys: set[str], exact: bool = True) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PayloadError(f"{where} is not a JSON object")
    extra = sorted(set(value) - keys)
    if extra:
        raise PayloadError(f"{where} has unexpected keys {', '.join(repr(k)[:60] for k in extra[:3])}")
    missing = sorted(keys - set(value)) if exact else []
    if missing:
        raise PayloadError(f"{where} lacks {', '.join(map(repr, missing))}")
    return value


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise PayloadError(f"{where} is not a string")
    return value


def _optional(value: Any) -> tuple[str | None, int | None]:
    if value is None:
        return None, None
    section = _object(value, "optional", {"creator", "timestamp"}, exact=False)
    creator = section.get("creator")
    if creator is not None:
        creator = _string(creator, "optional.creator")
        if len(creator) > MAX_CREATOR or not creator.isprintable():
            raise PayloadError(f"optional.creator is not printable text of at most {MAX_CREATOR} characters")
    timestamp = section.get("timestamp")
    if timestamp is not None and (
        not isinstance(timestamp, int) or isinstance(timestamp, bool) or not 0 <= timestamp < 2**63
    ):
        raise PayloadError("optional.timestamp is not a non-negative integer (seconds since 1970)")
    return creator, timestamp


def parse(data: bytes) -> Payload:
    """Check ``data`` strictly: at most :data:`MAX_PAYLOAD` bytes of UTF-8 JSON, no duplicate
    keys, exactly the structure above. Raises :class:`PayloadError` saying what is wrong."""
    if len(data) > MAX_PAYLOAD:
        raise PayloadError(f"{len(data)} bytes: a simple-signing payload is at most {MAX_PAYLOAD} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PayloadError(f"not UTF-8 (byte {e.start})") from None
    try:
        doc = json.loads(text, object_pairs_hook=_pairs, parse_constant=_constant)
    except json.JSONDecodeError as e:
        raise PayloadError(f"not JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:  # (a few KiB of brackets): no payload nests so deep
        raise PayloadError("not a simple-signing payload: it nests too deeply") from None
    top = _object(doc, "the payload", {"critical", "optional"})
    critical = _object(top["critical"], "critical", {"type", "image", "identity"})
    if critical["type"] != SIGNATURE_TYPE:
        raise PayloadError(f"critical.type is not {SIGNATURE_TYPE!r}")
    image = _object(critical["image"], "critical.image", {"docker-manifest-digest"})
    identity = _object(critical["identity"], "critical.identity", {"docker-reference"})
    digest = check_digest(_string(image["docker-manifest-digest"], "docker-manifest-digest"))
    reference = check_reference(_string(identity["docker-reference"], "docker-reference"))
    creator, timestamp = _optional(top["optional"])
    return Payload(reference, digest, creator, timestamp)
