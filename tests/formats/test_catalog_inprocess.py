"""Security catalogs (.cat) signed in-process (:mod:`sealbox.formats._catalog`) through a real
server whose ``osslsigncode`` refuses to sign: the outputs pass the real ``osslsigncode verify``
and match what ``osslsigncode sign`` makes of the same catalog with the same key (content type,
CTL bytes, attributes, certificates); an old signature is replaced; malformed catalogs are
refused naming the fault; an ECDSA key and a SoftHSM key sign the same way."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from asn1crypto import cms  # type: ignore[import-untyped]
from cryptography.hazmat.primitives.asymmetric import ec

from sealbox.deploy import pki
from sealbox.formats import FormatSettings, SignRequest
from sealbox.formats import authenticode as ac
from sealbox.formats._cms import CONTEXT_0, INTEGER, OCTET_STRING, OID_SIGNED_DATA, SEQUENCE, SET, tlv
from sealbox.formats.authenticode import AuthenticodeSigner
from sealbox.keys import FileKey, PassphraseSource
from sealbox.samples import windows
from tests.formats.test_authenticode import LocalTSA, raw_verify
from tests.formats.test_pe_inprocess import no_process
from tests.servers import Deployment, ServerProcess, start_server

OSSL = shutil.which("osslsigncode")
pytestmark = pytest.mark.skipif(OSSL is None, reason="osslsigncode is not installed")
CAP = 120.0
FMTS = ["sha2signcode", "sha2signcodestub", "sha2signcode-v2"]
OID_CTL = bytes.fromhex("06092b0601040182370a01")
FILES = {f"f{n}.dll": f"member {n}".encode() for n in range(40)}


def _set_option(d: Deployment, fmt: str, line: str) -> None:
    text = d.config.read_text()
    d.config.write_text(text.replace(f"[formats.{fmt}]\n", f"[formats.{fmt}]\n{line}\n"))


@pytest.fixture(scope="module")
def tsa(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalTSA]:
    t = LocalTSA(tmp_path_factory.mktemp("cat-tsa") / "tsa")
    yield t
    t.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tsa: LocalTSA) -> Iterator[ServerProcess]:
    """File keys; the formats' osslsigncode tells its version and refuses to do anything else."""
    root = tmp_path_factory.mktemp("cat")
    d = Deployment.create(root / "dep", "dep", FMTS)
    refusing = root / "osslsigncode"
    refusing.write_text(
        f'#!/bin/sh\nif [ "$1" = --version ]; then exec {OSSL} --version; fi\n'
        'echo "this osslsigncode refuses to run" >&2\nexit 1\n'
    )
    refusing.chmod(0o755)
    for fmt in FMTS:
        _set_option(d, fmt, f'osslsigncode = "{refusing}"')
    _set_option(d, "sha2signcode-v2", f'timestamp_url = "{tsa.url}"')
    (d.public / ac.TSA_CA_FILE).write_bytes(tsa.ca.cert_pem())
    sp = start_server(d)
    yield sp
    sp.stop()


def _sign(sp: ServerProcess, src: Path, fmt: str, out: Path) -> Path:
    with sp.client(timeout=CAP) as c:
        res = c.sign(src, [fmt], out)
    assert res.ok, res.error
    return out


def _verify(d: Deployment, out: Path, *extra: str) -> str:
    AuthenticodeSigner.verify("sha2signcode", out, None, d.public)
    res = raw_verify(out, d.public / ac.CA_FILE, *extra)
    assert res.returncode == 0 and "Signature verification: ok" in res.stdout, res.stdout + res.stderr
    return res.stdout


def _signed_data(path: Path) -> Any:
    info = cms.ContentInfo.load(path.read_bytes())
    assert info["content_type"].native == "signed_data"
    return info["content"]


def _subjects(sd: Any) -> set[str]:
    return {c.chosen.subject.native["common_name"] for c in sd["certificates"]}


def _osslsigncode(d: Deployment, src: Path, out: Path, *options: str) -> None:
    """``osslsigncode sign`` of ``src`` with the deployment's key file and the format's options."""
    assert OSSL is not None
    passphrase = PassphraseSource.from_file(d.root / "passphrases").get("authenticode")
    keys = d.root / "keys"
    subprocess.run(
        [OSSL, "sign", "-certs", str(keys / "authenticode.chain.pem"), "-key", str(keys / "authenticode.pem"),
         "-readpass", "/dev/stdin", "-h", "sha256", "-n", "sealbox dep", "-i", "https://example.invalid/sealbox",
         *options, "-in", str(src), "-out", str(out)],
        input=passphrase, capture_output=True, check=True,
    )  # fmt: skip


def _comparable(sd: Any) -> tuple[Any, ...]:
    """A SignedData but for what differs between two signings: the signing time, the signature."""
    (si,) = sd["signer_infos"]
    attributes = [(a["type"].dotted, a["values"].dump()) for a in si["signed_attrs"]]
    kept = [a for a in attributes if a[0] != "1.2.840.113549.1.9.5"]
    return (
        sd["version"].native,
        sd["digest_algorithms"].dump(),
        sd["encap_content_info"].dump(),
        sd["certificates"].dump(),
        sd["crls"].dump(),
        si["version"].native,
        si["sid"].dump(),
        si["digest_algorithm"].dump(),
        kept,
        len(attributes),
        si["signature_algorithm"].dump(),
        si["unsigned_attrs"].dump(),
    )


# -- through the server, file keys -----------------------------------------------------------------
@pytest.mark.parametrize("fmt", FMTS)
def test_catalog_signs_in_process_and_verifies(server: ServerProcess, tmp_path: Path, fmt: str) -> None:
    d = server.deployment
    src = windows.write_cat(tmp_path, "files.cat", FILES)
    out = _sign(server, src, fmt, tmp_path / "out" / "files.cat")  # the tool on the server refuses
    text = _verify(d, out, "-TSA-CAfile", str(d.public / ac.TSA_CA_FILE))
    assert (
        "Text description: sealbox dep" in text and "URL description: https://example.invalid/sealbox" in text
    )
    sd = _signed_data(out)
    assert sd["encap_content_info"]["content_type"].dotted == "1.3.6.1.4.1.311.10.1"
    # the CTL is the input's, byte for byte, and the message digest is over its value
    assert sd["encap_content_info"].dump() == _signed_data(src)["encap_content_info"].dump()
    ctl_value = sd["encap_content_info"]["content"].contents  # the CTL's, without tag and length
    assert _attribute(sd, "message_digest") == hashlib.sha256(ctl_value).digest()
    assert any(s.startswith("sealbox stub dummy") for s in _subjects(sd)) == (fmt == "sha2signcodestub")
    if fmt.endswith("-v2"):
        assert "Timestamp Server Signature verification: ok" in text, text
    else:
        assert "Timestamp is not available" in text, text


@pytest.mark.parametrize("fmt", ["sha2signcode", "sha2signcodestub"])
def test_catalog_matches_osslsigncode(server: ServerProcess, tmp_path: Path, fmt: str) -> None:
    d = server.deployment
    src = windows.write_cat(tmp_path, "files.cat", FILES)
    ours = _sign(server, src, fmt, tmp_path / "out" / "files.cat")
    theirs = tmp_path / "theirs.cat"
    stub = d.root / "keys" / "sha2signcodestub-extra.pem"
    _osslsigncode(d, src, theirs, *(["-ac", str(stub)] if fmt == "sha2signcodestub" else []))
    assert _comparable(_signed_data(ours)) == _comparable(_signed_data(theirs))
    assert len(ours.read_bytes()) == len(theirs.read_bytes())
    times = {p: _signing_time(p) for p in (ours, theirs)}
    if times[ours] == times[theirs]:  # signed in the same second: RSA PKCS#1 v1.5 is deterministic
        assert ours.read_bytes() == theirs.read_bytes()


def _signing_time(path: Path) -> object:
    return _attribute(_signed_data(path), "signing_time")


def _attribute(sd: Any, name: str) -> object:
    """The value of the signer's authenticated attribute ``name`` (asn1crypto's name)."""
    (si,) = sd["signer_infos"]
    (value,) = [a["values"][0].native for a in si["signed_attrs"] if a["type"].native == name]
    return value


def test_resigning_replaces_the_signature(server: ServerProcess, tmp_path: Path) -> None:
    d = server.deployment
    src = windows.write_cat(tmp_path, "files.cat", FILES)
    first = _sign(server, src, "sha2signcodestub", tmp_path / "first" / "files.cat")
    again = _sign(server, first, "sha2signcode", tmp_path / "again" / "files.cat")
    text = _verify(d, again)
    assert "Number of verified signatures: 1" in text
    sd = _signed_data(again)
    assert len(sd["signer_infos"]) == 1
    assert not any(s.startswith("sealbox stub dummy") for s in _subjects(sd))  # the old certificates went
    assert sd["encap_content_info"].dump() == _signed_data(src)["encap_content_info"].dump()
    # what osslsigncode makes of the signed catalog keeps the same: the CTL alone
    theirs = tmp_path / "theirs.cat"
    _osslsigncode(d, first, theirs)
    assert _comparable(sd) == _comparable(_signed_data(theirs))


# -- malformed catalogs (each passes the kind check, which reads the header only) -----------------
def _catalog(
    content: bytes | None = None, *, version: bytes = tlv(INTEGER, b"\x01"), after: bytes = tlv(SET)
) -> bytes:
    """An unsigned catalog of FILES with its content info (OID and [0]) or its tail replaced."""
    good = windows.catalog_bytes(FILES)
    ctl = _signed_data_bytes(good)
    info = tlv(SEQUENCE, OID_CTL, tlv(CONTEXT_0, ctl)) if content is None else content
    return tlv(SEQUENCE, OID_SIGNED_DATA, tlv(CONTEXT_0, tlv(SEQUENCE, version, tlv(SET), info, after)))


def _signed_data_bytes(catalog: bytes) -> bytes:
    """The CTL element (tag and length included) of a catalog."""
    return tlv(SEQUENCE, cms.ContentInfo.load(catalog)["content"]["encap_content_info"]["content"].contents)


def _overrun() -> bytes:
    ctl = _signed_data_bytes(windows.catalog_bytes(FILES))
    wrapped = bytearray(tlv(CONTEXT_0, ctl))
    wrapped[-len(ctl) - 1] += 1  # the [0]'s length claims one byte more than there is
    return _catalog(tlv(SEQUENCE, OID_CTL, bytes(wrapped)))


BAD: dict[str, tuple[Callable[[], bytes], str]] = {
    "detached": (
        lambda: _catalog(tlv(SEQUENCE, OID_CTL)),
        "the content [0] (a detached catalog?) is missing",
    ),
    "ctl-not-a-sequence": (
        lambda: _catalog(tlv(SEQUENCE, OID_CTL, tlv(CONTEXT_0, tlv(OCTET_STRING, b"ctl")))),
        "the certificate trust list has tag 0x04, not 0x30",
    ),
    "no-signer-infos": (lambda: _catalog(after=b""), "the SignerInfo set is missing"),
    "stray-bytes": (
        lambda: _catalog(after=tlv(SET) + tlv(SET)),
        "2 stray bytes at the end of the SignedData",
    ),
    "non-minimal-length": (
        lambda: _catalog(version=bytes([INTEGER, 0x81, 1, 1])),
        "the SignedData version: a non-minimal DER length",
    ),
    "content-overrun": (_overrun, "the content [0] (a detached catalog?) overruns its container"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_malformed_catalog_is_refused_naming_the_fault(
    server: ServerProcess, tmp_path: Path, case: str
) -> None:
    make, reason = BAD[case]
    bad = tmp_path / "bad.cat"
    bad.write_bytes(make())
    with server.client(timeout=CAP) as c:
        res = c.sign(bad, ["sha2signcode"], tmp_path / "out" / "bad.cat")
    assert not res.ok and f"malformed catalog: {reason}" in (res.error or ""), res.error
    assert not (tmp_path / "out" / "bad.cat").exists()
    sha1 = hashlib.sha1(bad.read_bytes(), usedforsecurity=False).hexdigest()

    def outcomes(lines: list[dict[str, object]]) -> list[object]:
        return [e["outcome"] for e in lines if e.get("event") == "job" and e.get("sha1") == sha1]

    assert set(outcomes(server.wait_log(outcomes))) == {"rejected"}  # permanent: refused at once


# -- an ECDSA key ----------------------------------------------------------------------------------
def test_ecdsa_key_signs_a_catalog(tmp_path: Path) -> None:
    ca = pki.make_ca("sealbox test EC code-signing root")
    private = ec.generate_private_key(ec.SECP256R1())
    chain = [pki.certify(ca, "sealbox EC signer", private.public_key()), ca.cert]
    key = FileKey("ec", private).with_chain(chain)
    settings = FormatSettings("sha2signcode", "ec", {"description": "sealbox ec"}, tmp_path)
    signer = AuthenticodeSigner(settings, lambda name: key)
    src = windows.write_cat(tmp_path, "files.cat", FILES)
    (tmp_path / "work").mkdir()
    out = tmp_path / "signed.cat"
    with no_process():
        signer.sign(SignRequest(input=src, output=out, filename="files.cat", work_dir=tmp_path / "work"))
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem())
    res = raw_verify(out, tmp_path / "ca.pem")
    assert res.returncode == 0 and "Signature verification: ok" in res.stdout, res.stdout + res.stderr
    (si,) = _signed_data(out)["signer_infos"]
    assert si["signature_algorithm"]["algorithm"].dotted == "1.2.840.10045.4.3.2"  # ecdsa-with-SHA256


# -- a SoftHSM key, through a real server ----------------------------------------------------------
def test_softhsm_key_signs_catalogs_in_process(tmp_path: Path, tsa: LocalTSA) -> None:
    """osslsigncode (a recording wrapper) runs at start-up only, proving the token hand-off."""
    d = Deployment.create(tmp_path / "dep", "dep", FMTS, hsm=True)
    runs = tmp_path / "runs"
    runs.mkdir()
    wrapper = tmp_path / "osslsigncode"
    wrapper.write_text(f'#!/bin/sh\necho "$@" > {runs}/$$\nexec {OSSL} "$@"\n')
    wrapper.chmod(0o755)
    for fmt in FMTS:
        _set_option(d, fmt, f'osslsigncode = "{wrapper}"')
    _set_option(d, "sha2signcode-v2", f'timestamp_url = "{tsa.url}"')
    (d.public / ac.TSA_CA_FILE).write_bytes(tsa.ca.cert_pem())
    sp = start_server(d)
    try:
        at_start = sorted(runs.iterdir())
        for fmt in FMTS:
            src = windows.write_cat(tmp_path, f"{fmt}.cat", FILES)
            out = _sign(sp, src, fmt, tmp_path / "out" / src.name)
            text = _verify(d, out, "-TSA-CAfile", str(d.public / ac.TSA_CA_FILE))
            assert ("Timestamp Server Signature verification: ok" in text) == fmt.endswith("-v2"), text
            stub = any(s.startswith("sealbox stub dummy") for s in _subjects(_signed_data(out)))
            assert stub == (fmt == "sha2signcodestub")
        assert sorted(runs.iterdir()) == at_start  # no tool ran for a catalog
    finally:
        sp.stop()
