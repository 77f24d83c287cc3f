"""Small X.509 toolkit for dev deployments and tests: CAs, TLS and code-signing certificates."""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..errors import ConfigError
from ..formats._cms import SEQUENCE, tlv
from ..keys import SigningKey

BIT_STRING = 0x03

ORG = "sealbox dev"
CertifiablePublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


def new_rsa(bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


@dataclass(frozen=True)
class Issued:
    key: rsa.RSAPrivateKey
    cert: x509.Certificate

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, cn), x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG)]
    )


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: CertifiablePublicKey, years: int
) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=365 * years))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def make_ca(cn: str, bits: int = 2048, years: int = 10) -> Issued:
    """A self-signed root CA."""
    key = new_rsa(bits)
    name = _name(cn)
    cert = (
        _builder(name, name, key.public_key(), years)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(key, cert)


def issue(
    ca: Issued,
    cn: str,
    *,
    key: rsa.RSAPrivateKey | None = None,
    bits: int = 2048,
    ekus: Sequence[x509.ObjectIdentifier] = (ExtendedKeyUsageOID.CODE_SIGNING,),
    eku_critical: bool = False,
    san: Sequence[str] = (),
    server: bool = False,
    years: int = 5,
) -> Issued:
    """Issue a leaf certificate. ``san`` entries are IP literals or DNS names."""
    key = key or new_rsa(bits)
    cert = certify(
        ca, cn, key.public_key(), ekus=ekus, eku_critical=eku_critical, san=san, server=server, years=years
    )
    return Issued(key, cert)


def certify(
    ca: Issued,
    cn: str,
    public_key: CertifiablePublicKey,
    *,
    ekus: Sequence[x509.ObjectIdentifier] = (ExtendedKeyUsageOID.CODE_SIGNING,),
    eku_critical: bool = False,
    san: Sequence[str] = (),
    server: bool = False,
    years: int = 5,
) -> x509.Certificate:
    """A leaf certificate for ``public_key`` (whose private half may be anywhere, e.g. a token)."""
    builder = (
        _builder(_name(cn), ca.cert.subject, public_key, years)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=server,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
    )
    if ekus:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(ekus)), critical=eku_critical)
    if san:
        names: list[x509.GeneralName] = []
        for entry in san:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(entry)))
            except ValueError:
                names.append(x509.DNSName(entry))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca.key, hashes.SHA256())


#: DER AlgorithmIdentifier sha256WithRSAEncryption (1.2.840.113549.1.1.11, NULL parameters)
_SHA256_WITH_RSA = bytes.fromhex("300d06092a864886f70d01010b0500")


def self_signed(key: SigningKey, cn: str, *, years: int = 25) -> x509.Certificate:
    """A self-signed certificate (subject key identifier only, as Android signing certificates
    are) for an RSA key wherever it lives: cryptography signs only with keys it holds, so it
    builds the to-be-signed part under a throwaway key, and ``key`` signs that part itself."""
    public = key.public_key
    if not isinstance(public, rsa.RSAPublicKey):
        raise ConfigError(f"key '{key.name}': a self-signed certificate is made for RSA keys only")
    name = _name(cn)
    # its signature is thrown away with it: its size buys nothing
    throwaway = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505
    tbs = _builder(name, name, public, years).sign(throwaway, hashes.SHA256()).tbs_certificate_bytes
    signature = key.sign(tbs, "sha256", "pkcs1v15")
    cert = x509.load_der_x509_certificate(
        tlv(SEQUENCE, tbs, _SHA256_WITH_RSA, tlv(BIT_STRING, b"\0", signature))  # no unused bits
    )
    cert.verify_directly_issued_by(cert)  # the key's own signature over what it certifies
    return cert


def tls_server(ca: Issued, hosts: Sequence[str] = ("127.0.0.1", "localhost", "::1")) -> Issued:
    return issue(ca, hosts[0], ekus=(ExtendedKeyUsageOID.SERVER_AUTH,), san=hosts, server=True)
