"""One key interface, two backends: a key file decrypted into memory and a key inside a SoftHSM
token sign the same way, and every signature checks out with the public key alone."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import shutil
from pathlib import Path
from typing import Any

import pkcs11
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.hazmat.primitives.serialization import BestAvailableEncryption, pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID
from pkcs11 import Attribute, ObjectClass

from sealbox.deploy import pki
from sealbox.errors import ConfigError, KeyUnlockError, SigningFailed
from sealbox.formats import FormatSettings, SignRequest
from sealbox.keys import FileHandoff, FileKey, Pkcs11Handoff, SigningKey, load_key
from sealbox.keys import _pkcs11 as backend
from sealbox.keys.softhsm import generate_key, store_certificate
from sealbox.server.config import KeySection
from sealbox.server.run import prove_key
from tests.keys.conftest import EC_ID, RSA_ID, Token

DATA = b"signed through the one key interface\n" * 10
TOOL_ID, BARE_ID = b"\x10", b"\x11"  # keys made by the tool formats' test
HASHES = {
    "sha1": hashes.SHA1(),  # noqa: S303  (MAR's algorithm 1)
    "sha256": hashes.SHA256(),
    "sha384": hashes.SHA384(),
    "sha512": hashes.SHA512(),
}


def _pkcs11(token: Token, label: str, key_id: bytes, chain: Path | None = None) -> SigningKey:
    return load_key(token.soft.spec(label, label, key_id, chain), token.pin)


def _keys(token: Token, algorithm: str) -> dict[str, SigningKey]:
    if algorithm == "rsa":
        return {"file": FileKey("file-rsa", pki.new_rsa(2048)), "pkcs11": _pkcs11(token, "rsa", RSA_ID)}
    return {
        "file": FileKey("file-ec", ec.generate_private_key(ec.SECP256R1())),
        "pkcs11": _pkcs11(token, "ec", EC_ID),
    }


def _independent_check(key: SigningKey, sig: bytes, data: bytes, hash_name: str, pad: str) -> None:
    """cryptography's own verify, with the public key only: raises if the signature is bad."""
    public: Any = serialization.load_der_public_key(key.public_der())
    algorithm = HASHES[hash_name]
    if pad == "ecdsa":
        public.verify(sig, data, ec.ECDSA(algorithm))
    elif pad == "pss":
        public.verify(sig, data, padding.PSS(padding.MGF1(algorithm), algorithm.digest_size), algorithm)
    else:
        public.verify(sig, data, padding.PKCS1v15(), algorithm)


CASES = [
    ("rsa", "pkcs1v15", "sha1"),
    ("rsa", "pkcs1v15", "sha256"),
    ("rsa", "pkcs1v15", "sha384"),
    ("rsa", "pss", "sha256"),
    ("rsa", "pss", "sha512"),
    ("ec", "ecdsa", "sha256"),
    ("ec", "ecdsa", "sha384"),
]


@pytest.mark.parametrize(("algorithm", "pad", "hash_name"), CASES)
@pytest.mark.parametrize("where", ["file", "pkcs11"])
def test_both_backends_sign_digests_and_data_alike(
    token: Token, where: str, algorithm: str, pad: Any, hash_name: Any
) -> None:
    key = _keys(token, algorithm)[where]
    assert key.backend == where and key.algorithm == algorithm
    digest = hashlib.new(hash_name, DATA).digest()
    by_digest = key.sign_digest(digest, hash_name, pad)
    by_data = key.sign(DATA, hash_name, pad)
    for sig in (by_digest, by_data):
        _independent_check(key, sig, DATA, hash_name, pad)
        assert key.verifies(sig, digest, hash_name, pad)
    assert not key.verifies(by_data, hashlib.new(hash_name, DATA + b"x").digest(), hash_name, pad)
    if pad == "pkcs1v15":  # deterministic: both backends' PKCS#1 v1.5 are the same bytes
        assert by_digest == by_data
    assert key.fingerprint == hashlib.sha256(key.public_der()).hexdigest()
    prove_key(key)  # start-up's proof works the same for both


def test_a_key_refuses_a_padding_its_algorithm_has_not(token: Token) -> None:
    for key in (*_keys(token, "rsa").values(), *_keys(token, "ec").values()):
        wrong = "ecdsa" if key.algorithm == "rsa" else "pss"
        with pytest.raises(ConfigError, match=f"key '{key.name}'"):
            key.sign(DATA, "sha256", wrong)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="32 bytes"):
            key.sign_digest(b"short", "sha256", "pkcs1v15" if key.algorithm == "rsa" else "ecdsa")


def test_the_token_key_is_sensitive_and_cannot_be_read_out(token: Token) -> None:
    rsa_key = _pkcs11(token, "rsa", RSA_ID)
    assert isinstance(rsa_key.public_key, rsa.RSAPublicKey)
    module = backend._module(token.soft.module, token.soft.env)
    with module.lock:
        session = module.session(token.soft.label, token.pin, "test")
        for label, key_id, secret in (
            ("rsa", RSA_ID, Attribute.PRIVATE_EXPONENT),
            ("ec", EC_ID, Attribute.VALUE),
        ):
            priv = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=label, id=key_id)
            assert priv[Attribute.SENSITIVE] is True and priv[Attribute.EXTRACTABLE] is False
            assert priv[Attribute.NEVER_EXTRACTABLE] is True  # generated in the token, never out
            with pytest.raises(pkcs11.AttributeSensitive):
                priv[secret]  # the private value
            if label == "rsa":
                for part in (Attribute.PRIME_1, Attribute.PRIME_2, Attribute.COEFFICIENT):
                    with pytest.raises(pkcs11.AttributeSensitive):
                        priv[part]
    # A tool gets the module, a URI without the PIN, and the PIN apart (for a pipe).
    handoff = rsa_key.tool_handoff()
    assert isinstance(handoff, Pkcs11Handoff) and handoff.pin == token.pin
    assert handoff.uri == "pkcs11:token=sealbox-tests;object=rsa;id=%01;type=private"
    assert token.pin not in handoff.uri.encode() and "pin" not in handoff.uri
    assert handoff.env == {"SOFTHSM2_CONF": str(token.soft.conf)}
    assert isinstance(FileKey("f", pki.new_rsa(2048)).tool_handoff(), FileHandoff)


def test_the_chain_comes_from_a_file_or_from_the_token(token: Token, tmp_path: Path) -> None:
    ca = pki.make_ca("tests root")
    public = _pkcs11(token, "rsa", RSA_ID).public_key
    assert isinstance(public, rsa.RSAPublicKey)
    cert = pki.certify(ca, "tests rsa signer", public)
    assert _pkcs11(token, "rsa", RSA_ID).chain == ()  # no certificate yet, no chain file
    store_certificate(token.soft, token.pin, "rsa", RSA_ID, cert)
    assert _pkcs11(token, "rsa", RSA_ID).chain == (cert,)  # the token's certificate for the key
    chain = tmp_path / "chain.pem"
    chain.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (cert, ca.cert)))
    key = _pkcs11(token, "rsa", RSA_ID, chain)
    assert key.chain == (cert, ca.cert) and key.certificate == cert
    prove_key(key)  # the certificate is for the key in the token
    other = pki.issue(ca, "someone else")
    chain.write_bytes(other.cert_pem())
    with pytest.raises(KeyUnlockError, match="key 'rsa': the first certificate"):
        prove_key(_pkcs11(token, "rsa", RSA_ID, chain))


def test_a_wrong_pin_or_missing_key_names_the_key(token: Token) -> None:
    with pytest.raises(KeyUnlockError, match="key 'rsa': wrong PIN for token 'sealbox-tests'"):
        load_key(token.soft.spec("rsa", "rsa", RSA_ID), b"not-the-pin")
    with pytest.raises(KeyUnlockError, match=r"key 'nope'.*no private key"):
        load_key(token.soft.spec("nope", "nope"), token.pin)
    spec = token.soft.spec("x", "rsa")
    with pytest.raises(KeyUnlockError, match=r"key 'x'.*no such token"):
        load_key(type(spec)("x", spec.module, "no-such-token", "rsa", None, None, spec.env), token.pin)


def _sign_in_child(key: SigningKey, conn: Any) -> None:
    module = key._module  # type: ignore[attr-defined]
    before = module.generation
    sig = key.sign(DATA, "sha256", "pkcs1v15")
    conn.send((sig, module.generation > before))
    conn.close()


def test_a_forked_process_opens_its_own_session(token: Token) -> None:
    """Sessions do not survive a fork: the child re-initialises the module and logs in anew."""
    key = _pkcs11(token, "rsa", RSA_ID)
    key.sign(DATA, "sha256", "pkcs1v15")  # the parent's session is open
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_sign_in_child, args=(key, child))
    proc.start()
    sig, reinitialised = parent.recv()
    proc.join(30)
    assert proc.exitcode == 0 and reinitialised
    _independent_check(key, sig, DATA, "sha256", "pkcs1v15")
    _independent_check(key, key.sign(DATA, "sha256", "pkcs1v15"), DATA, "sha256", "pkcs1v15")  # parent's own


def test_a_lost_token_fails_retryably_and_its_return_is_picked_up(token: Token) -> None:
    key = _pkcs11(token, "rsa", RSA_ID)
    key.sign(DATA, "sha256", "pkcs1v15")
    tokens = token.soft.conf.parent / "tokens"
    gone = tokens.with_name("tokens.gone")
    os.rename(tokens, gone)
    try:
        with pytest.raises(SigningFailed, match="key 'rsa': PKCS#11 token 'sealbox-tests' is unavailable"):
            key.sign(DATA, "sha256", "pkcs1v15")
        with pytest.raises(KeyUnlockError, match="key 'rsa': test signature failed"):
            prove_key(key)  # what the heartbeat runs
    finally:
        os.rename(gone, tokens)
    # the session is opened again on the next signature: no restart needed
    _independent_check(key, key.sign(DATA, "sha256", "pkcs1v15"), DATA, "sha256", "pkcs1v15")


def test_tool_formats_sign_with_a_token_key_and_macos_still_refuses(token: Token, tmp_path: Path) -> None:
    """osslsigncode (OpenSSL's pkcs11 engine) and apksig (its JVM asks the server, which signs in
    the token) sign with a key in the token, checked by their verifiers; the macOS library
    cannot and refuses, and a hand-off a tool cannot use stops start-up: each naming the format
    and key. A key is never exported."""
    from sealbox.formats.android import TRUSTSTORE_PASSWORD, AndroidSigner
    from sealbox.formats.authenticode import CA_FILE, AuthenticodeSigner
    from sealbox.formats.macos import MacSigner
    from sealbox.samples.android import write_jar
    from sealbox.samples.pe import write_pe

    ca = pki.make_ca("tests root")
    keys: dict[str, SigningKey] = {}
    for label, key_id in (("tool", TOOL_ID), ("bare", BARE_ID)):
        generate_key(token.soft, token.pin, label, key_id, "rsa", 2048)
        public = _pkcs11(token, label, key_id).public_key
        assert isinstance(public, rsa.RSAPublicKey)
        cert = pki.certify(ca, f"{label} signer", public)
        if label == "tool":  # where Java looks for the key's certificate; "bare" has none there
            store_certificate(token.soft, token.pin, label, key_id, cert)
        chain = tmp_path / f"{label}.pem"
        chain.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + ca.cert_pem())
        keys[label] = _pkcs11(token, label, key_id, chain)
    public_dir = tmp_path / "public"
    public_dir.mkdir()
    (public_dir / CA_FILE).write_bytes(ca.cert_pem())
    trust = pkcs12.serialize_java_truststore(
        [pkcs12.PKCS12Certificate(keys["tool"].certificate, b"tool")],
        BestAvailableEncryption(TRUSTSTORE_PASSWORD.encode()),
    )
    (public_dir / "jar-truststore.p12").write_bytes(trust)

    def settings(fmt: str, key: str, **options: Any) -> FormatSettings:
        return FormatSettings(fmt, key, options, tmp_path)

    for signer, make, fmt in (
        (AuthenticodeSigner(settings("sha2signcode", "tool"), keys.__getitem__), write_pe, "sha2signcode"),
        (AndroidSigner(settings("jar", "tool"), keys.__getitem__), write_jar, "jar"),
    ):
        src, work = make(tmp_path), tmp_path / f"work-{fmt}"
        work.mkdir()
        signer.sign(SignRequest(src, tmp_path / f"signed-{src.name}", src.name, work))
        signer.verify(fmt, tmp_path / f"signed-{src.name}", src, public_dir)
    with pytest.raises(ConfigError, match="format 'macho': key 'tool' is in a PKCS#11 token"):
        MacSigner(settings("macho", "tool", timestamp_url="none"), keys.__getitem__)
    # apksig's JVM never reaches the token (the server signs its digests): a key without its
    # certificate on the token ("bare": the chain file has it) signs too
    bare_jar, bare_work = write_jar(tmp_path, "bare.jar"), tmp_path / "work-bare"
    bare_work.mkdir()
    AndroidSigner(settings("jar", "bare"), keys.__getitem__).sign(
        SignRequest(bare_jar, tmp_path / "signed-bare.jar", bare_jar.name, bare_work)
    )
    # an osslsigncode that cannot load OpenSSL's pkcs11 engine (libengine-pkcs11-openssl missing)
    no_engine = tmp_path / "osslsigncode"
    tool = shutil.which("osslsigncode")
    no_engine.write_text(f'#!/bin/sh\nOPENSSL_ENGINES=/nonexistent exec {tool} "$@"\n')
    no_engine.chmod(0o755)
    with pytest.raises(
        ConfigError, match=r"format 'sha2signcode': osslsigncode cannot .* key 'tool'.*engine"
    ):
        AuthenticodeSigner(settings("sha2signcode", "tool", osslsigncode=str(no_engine)), keys.__getitem__)


def test_key_config_sections() -> None:
    section = KeySection(kind="pkcs11", module=Path("/m.so"), token="t", label="k", id="0a")
    assert section.id == "0a"
    for bad, match in [
        ({"kind": "pkcs11", "module": "/m.so", "token": "t"}, "label or id"),
        ({"kind": "pkcs11", "token": "t", "label": "k"}, "module"),
        ({"kind": "pkcs11", "module": "/m.so", "token": "t", "label": "k", "path": "k.pem"}, "no path"),
        ({"kind": "pem"}, "needs path"),
        ({"kind": "pem", "path": "k.pem", "token": "t"}, "for pkcs11 keys"),
        ({"kind": "pkcs11", "module": "/m.so", "token": "t", "id": "xyz"}, "pattern"),
    ]:
        with pytest.raises(ValueError, match=match):
            KeySection.model_validate(bad)


def test_file_key_digests_match_cryptography_prehashed() -> None:
    """The file backend signs exactly what cryptography's prehashed signing gives (deterministic
    PKCS#1 v1.5): the formats' output is the same as before the interface."""
    raw = pki.new_rsa(2048)
    digest = hashlib.sha384(DATA).digest()
    expected = raw.sign(digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA384()))
    assert FileKey("k", raw).sign_digest(digest, "sha384", "pkcs1v15") == expected


def _faulty(key: SigningKey, monkeypatch: pytest.MonkeyPatch) -> SigningKey:
    """``key`` with a fault where its backend answers: one bit of every signature flipped. A
    test double of a faulty HSM or library (none fails on demand), named as such."""

    def flipping(real: Any) -> Any:
        def flipped(*args: Any) -> bytes:
            good: bytes = real(*args)
            return good[:-1] + bytes([good[-1] ^ 1])

        return flipped

    for name in ("_sign_digest", "_sign_message"):
        monkeypatch.setattr(key, name, flipping(getattr(key, name)))
    return key


@pytest.mark.parametrize(
    ("where", "algorithm", "pad"),
    [
        ("pkcs11", "rsa", "pkcs1v15"),
        ("pkcs11", "rsa", "pss"),
        ("pkcs11", "ec", "ecdsa"),
        ("file", "ec", "ecdsa"),
    ],
)
def test_a_faulty_signature_never_leaves_the_key(
    token: Token, monkeypatch: pytest.MonkeyPatch, where: str, algorithm: str, pad: Any
) -> None:
    """Every signature is checked with the public half before it is returned, by digest or by
    message: a faulty one is a retryable SigningFailed (file RSA keys excepted: OpenSSL checks
    those itself, below the interface)."""
    key = _faulty(_keys(token, algorithm)[where], monkeypatch)
    digest = hashlib.sha256(DATA).digest()
    with pytest.raises(SigningFailed, match=f"key '{key.name}' made a {pad} signature that does not verify"):
        key.sign_digest(digest, "sha256", pad)
    with pytest.raises(SigningFailed, match="does not verify"):
        key.sign(DATA, "sha256", pad)


def test_a_faulty_ed25519_signature_never_leaves_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ed25519 is deterministic: a faulty signature of a message can give the key away."""
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = FileKey("ed", ed25519.Ed25519PrivateKey.generate())
    assert key.verifies(key.sign(DATA, "sha256", "ed25519"), DATA, "sha256", "ed25519")
    with pytest.raises(SigningFailed, match="made a ed25519 signature that does not verify"):
        _faulty(key, monkeypatch).sign(DATA, "sha256", "ed25519")


def test_formats_that_build_their_own_packets_stop_a_faulty_token_signature(
    token: Token, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """OpenPGP (gpg) and CMS (emevoucher) wrap the key's signature in packets of their own: a
    faulty one from the token fails the attempt instead of being packed and sent."""
    import time

    from sealbox.formats import _openpgp
    from sealbox.formats.emevoucher import EmeVoucherSigner
    from sealbox.formats.gpg import GpgSigner

    key = _pkcs11(token, "rsa", RSA_ID)
    ca = pki.make_ca("tests root")
    public = key.public_key
    assert isinstance(public, rsa.RSAPublicKey)
    cert = pki.certify(ca, "voucher signer", public, ekus=[ExtendedKeyUsageOID.EMAIL_PROTECTION])
    chain = tmp_path / "chain.pem"
    chain.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + ca.cert_pem())
    key = _pkcs11(token, "rsa", RSA_ID, chain)
    block = tmp_path / "gpg.asc"
    block.write_bytes(_openpgp.public_key_block(key, "Tests <tests@example.invalid>", int(time.time())))
    src = tmp_path / "input.bin"
    src.write_bytes(DATA)
    signers = [
        GpgSigner(FormatSettings("gpg", "rsa", {"public_key": str(block)}, tmp_path), lambda _: key),
        EmeVoucherSigner(FormatSettings("emevoucher", "rsa", {}, tmp_path), lambda _: key),
    ]
    for signer in signers:  # both sign with the sound key
        signer.sign(SignRequest(src, tmp_path / f"ok-{signer.format}", src.name, tmp_path))
    _faulty(key, monkeypatch)
    for signer in signers:
        out = tmp_path / f"faulty-{signer.format}"
        with pytest.raises(SigningFailed, match="does not verify"):
            signer.sign(SignRequest(src, out, src.name, tmp_path))
        assert not out.exists()
