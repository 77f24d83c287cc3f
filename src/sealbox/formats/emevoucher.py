"""``emevoucher``: a CMS/PKCS#7 SignedData wrapping the voucher (content attached, DER, SHA-256).

Equivalent to the classic server's ``openssl smime -sign -md sha256 -binary -nodetach
-outform DER -signer CERT -certfile CHAIN``, made in-process: :mod:`._cms` writes the DER
SignedData around one signature of the signed attributes by the key interface (so the key may
live in a token). The output replaces the voucher: it carries the voucher bytes, the signature
and the signer's chain.
"""

from __future__ import annotations

import datetime as dt
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from ..errors import ConfigError, FormatRejected, SigningFailed, VerificationFailed
from . import _cms
from .base import FormatSettings, KeyResolver, Signer, SignRequest, public_file, run_verifier

if TYPE_CHECKING:
    from ..deploy.context import DevContext

DEFAULT_MAX_SIZE = 1 << 20
SUBPROCESS_TIMEOUT = 60


def _check_certificate(fmt: str, key_name: str, cert: x509.Certificate, public_key: Any) -> None:
    """Refuse a signer certificate that ``openssl cms -verify`` would refuse anyway."""
    if cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
        raise ConfigError(f"format '{fmt}': the certificate of key '{key_name}' does not match the key")
    now = dt.datetime.now(dt.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise ConfigError(
            f"format '{fmt}': the certificate of key '{key_name}' is not valid now "
            f"({cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d})"
        )
    try:
        ekus = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return
    wanted = {ExtendedKeyUsageOID.EMAIL_PROTECTION, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE}
    if not wanted & set(ekus):
        raise ConfigError(
            f"format '{fmt}': the certificate of key '{key_name}' lacks extended key usage emailProtection "
            "(openssl cms -verify would refuse it: unsuitable certificate purpose)"
        )


def _openssl_reason(lines: list[str]) -> str:
    """The reason fields of OpenSSL's ``...:error:CODE:LIB:FUNC:REASON:FILE:LINE:`` lines."""
    reasons = []
    for line in lines:
        parts = line.split(":")
        if len(parts) >= 6 and parts[1] == "error" and parts[5] not in reasons:
            reasons.append(parts[5])
    return "; ".join(reasons) or (lines[-1] if lines else "no output")


class EmeVoucherSigner(Signer):
    family = "emevoucher"
    verifier = (
        "openssl cms -verify -binary -inform DER -in FILE -CAfile public/emevoucher-ca.pem -out VOUCHER"
    )
    uses_work_dir = False

    def __init__(self, settings: FormatSettings, keys: KeyResolver) -> None:
        super().__init__(settings, keys)
        self._key = keys(settings.require_key())
        self._key.require(settings.name, "rsa")
        _check_certificate(settings.name, self._key.name, self._key.certificate, self._key.public_key)
        max_size = settings.get("max_size", DEFAULT_MAX_SIZE)
        if not isinstance(max_size, int) or isinstance(max_size, bool) or max_size < 1:
            raise ConfigError(f"format '{settings.name}': max_size must be a positive integer")
        self._max_size = max_size

    def sign(self, request: SignRequest) -> None:
        try:
            size = request.input.stat().st_size
            if size == 0:
                raise FormatRejected("empty input: an EME voucher cannot be empty")
            if size > self._max_size:
                raise FormatRejected(
                    f"input is {size} bytes; EME vouchers are at most {self._max_size} bytes"
                )
            data = request.input.read_bytes()
        except OSError as e:
            raise SigningFailed(f"cannot read input: {e.strerror}") from None
        blob = _cms.signed_data(data, self._key.chain, lambda b: self._key.sign(b, "sha256", "pkcs1v15"))
        request.output.write_bytes(blob)

    @classmethod
    def dev_setup(cls, ctx: DevContext) -> dict[str, dict[str, Any]]:
        key = ctx.signing_key(
            "emevoucher",
            certificate="sealbox EME voucher signer",
            ekus=(ExtendedKeyUsageOID.EMAIL_PROTECTION, ExtendedKeyUsageOID.CODE_SIGNING),
        )
        name, ca = key.name, ctx.code_signing_ca()
        ctx.write_public(
            "emevoucher-ca.pem",
            ca.cert_pem(),
            "openssl cms -verify -binary -inform DER -in FILE -CAfile public/emevoucher-ca.pem -out VOUCHER",
        )
        return {"emevoucher": {"key": name, "max_size": DEFAULT_MAX_SIZE}}

    @classmethod
    def verify(cls, fmt: str, signed: Path, original: Path | None, public_dir: Path) -> str:
        openssl = shutil.which("openssl")
        if openssl is None:
            raise VerificationFailed("openssl is not installed")
        ca = public_file(public_dir, "emevoucher-ca.pem")
        with tempfile.TemporaryDirectory(prefix="sbeme") as tmp:
            content = Path(tmp) / "voucher"
            cmd = [
                openssl,
                "cms",
                "-verify",
                "-binary",
                "-inform",
                "DER",
                "-in",
                str(signed),
                "-CAfile",
                str(ca),
                "-out",
                str(content),
            ]
            res = run_verifier(cmd, "openssl cms -verify", SUBPROCESS_TIMEOUT)
            err = res.stderr.decode(errors="replace").strip().splitlines()
            if res.returncode != 0 or not any("Verification successful" in line for line in err):
                raise VerificationFailed(f"openssl cms -verify (rc {res.returncode}): {_openssl_reason(err)}")
            if original is not None and content.read_bytes() != original.read_bytes():
                raise VerificationFailed("the voucher inside the signature differs from the original")
        return (
            "openssl cms -verify -binary -inform DER -in FILE -CAfile public/emevoucher-ca.pem -out VOUCHER"
        )
