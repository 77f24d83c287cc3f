"""``sigstore``: a container image signature, as cosign and skopeo make them.

The input is the "simple signing" payload (:mod:`sealbox.simplesigning`) a client built for
(docker reference, manifest digest); the server checks it strictly and signs its bytes as
received: ECDSA P-256 over SHA-256, a DER signature, written as the detached ``.sig``. The
client (``sealbox sign-image``) pushes payload and signature to the registry as a cosign
attachment, which skopeo/podman check with a ``sigstoreSigned`` policy. See
docs/formats/container.md.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ..errors import ConfigError, FormatRejected, SigningFailed, VerificationFailed
from ..simplesigning import MAX_PAYLOAD, PayloadError, parse
from .base import FormatSettings, KeyResolver, Signer, SignRequest, public_file, run_verifier

if TYPE_CHECKING:
    from ..deploy.context import DevContext

PUBLIC_KEY = "sigstore.pub"
VERIFY_TIMEOUT = 60


def _openssl_argv(openssl: str, public: Path, signature: Path, payload: Path) -> list[str]:
    return [openssl, "dgst", "-sha256", "-verify", str(public), "-signature", str(signature), str(payload)]


class SigstoreSigner(Signer):
    family = "sigstore"
    verifier = (
        "openssl dgst -sha256 -verify public/sigstore.pub -signature FILE.sig FILE; "
        "an image: skopeo with a sigstoreSigned policy"
    )
    uses_work_dir = False

    def __init__(self, settings: FormatSettings, keys: KeyResolver) -> None:
        super().__init__(settings, keys)
        self._key = keys(settings.require_key())
        self._key.require(settings.name, "ec")
        public = self._key.public_key
        # what cosign and containers/image verify: ECDSA on P-256 with SHA-256
        if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(public.curve, ec.SECP256R1):
            raise ConfigError(f"format '{settings.name}': key '{self._key.name}' must be an EC P-256 key")

    def sign(self, request: SignRequest) -> None:
        try:
            size = request.input.stat().st_size
            # the cap first: an oversized upload is refused without being read into memory
            data = b"" if size > MAX_PAYLOAD else request.input.read_bytes()
        except OSError as e:
            raise SigningFailed(f"cannot read input: {e.strerror}") from None
        if size > MAX_PAYLOAD:
            raise FormatRejected(
                f"not a simple-signing payload: {size} bytes, at most {MAX_PAYLOAD} are accepted"
            )
        try:
            parse(data)
        except PayloadError as e:
            raise FormatRejected(f"not a simple-signing payload: {e}") from None
        digest = hashlib.sha256(data).digest()
        request.output.write_bytes(self._key.sign_digest(digest, "sha256", "ecdsa"))

    @classmethod
    def dev_setup(cls, ctx: DevContext) -> dict[str, dict[str, Any]]:
        key = ctx.signing_key("sigstore", algorithm="ec")
        pem = key.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        ctx.write_public(
            PUBLIC_KEY,
            pem,
            "openssl dgst -sha256 -verify public/sigstore.pub -signature payload.json.sig payload.json\n"
            "    an image signed by `sealbox sign-image`: skopeo copy --policy P --registries.d D with a\n"
            '    {"type":"sigstoreSigned","keyPath":".../sigstore.pub","signedIdentity":'
            '{"type":"matchRepository"}} requirement (docs/formats/container.md)',
        )
        return {"sigstore": {"key": key.name}}

    @classmethod
    def verify(cls, fmt: str, signed: Path, original: Path | None, public_dir: Path) -> str:
        if fmt not in cls.formats:
            raise VerificationFailed(f"'{fmt}' is not a sigstore format")
        if original is None:
            raise VerificationFailed("sigstore signatures are detached: the signed payload is needed too")
        try:
            parse(original.read_bytes())
        except OSError as e:
            raise VerificationFailed(f"cannot read {original}: {e.strerror}") from None
        except PayloadError as e:
            raise VerificationFailed(f"{original} is not a simple-signing payload: {e}") from None
        openssl = shutil.which("openssl")
        if openssl is None:
            raise VerificationFailed("openssl is not installed")
        public = public_file(public_dir, PUBLIC_KEY)
        res = run_verifier(
            _openssl_argv(openssl, public, signed, original), "openssl dgst -verify", VERIFY_TIMEOUT
        )
        out = (res.stdout + res.stderr).decode(errors="replace").strip()
        if res.returncode != 0 or out != "Verified OK":
            first = out.splitlines()[0] if out else ""
            raise VerificationFailed(f"openssl dgst -verify (rc {res.returncode}): {first}")
        return f"openssl dgst -sha256 -verify public/{PUBLIC_KEY} -signature {signed.name} {original.name}"
