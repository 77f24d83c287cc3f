"""Security catalogs (.cat) signed in-process (:mod:`sealbox.formats._catalog`) through a real
server whose ``osslsigncode`` refuses to sign: the outputs pass the real ``osslsigncode verify``
and match what ``osslsigncode sign`` makes of the same catalog with the same key (content type,
CTL bytes, attributes, certificates); an old signature is replaced; an ECDSA key signs the
same way. Malformed catalogs (BAD below) and a SoftHSM key: tests/formats/test_inprocess_kinds.py."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from asn1crypto import cms  # type: ignore[import-untyped]

from sealbox.formats._cms import CONTEXT_0, INTEGER, OCTET_STRING, OID_SIGNED_DATA, SEQUENCE, SET, tlv
from sealbox.samples import windows
from tests.formats._authenticode_util import (
    FMTS,
    OSSL,
    check_ecdsa_key,
    comparable,
    sign_through,
    signed_by_osslsigncode,
    stub_signed,
    verify_signed,
)
from tests.servers import ServerProcess

pytestmark = pytest.mark.skipif(OSSL is None, reason="osslsigncode is not installed")
OID_CTL = bytes.fromhex("06092b0601040182370a01")
FILES = {f"f{n}.dll": f"member {n}".encode() for n in range(40)}


@pytest.fixture
def server(inprocess_server: ServerProcess) -> ServerProcess:
    """File keys; the formats' osslsigncode refuses to sign (one server for the run: conftest.py)."""
    return inprocess_server


def _signed_data(path: Path) -> Any:
    info = cms.ContentInfo.load(path.read_bytes())
    assert info["content_type"].native == "signed_data"
    return info["content"]


# -- through the server, file keys -----------------------------------------------------------------
@pytest.mark.parametrize("fmt", FMTS)
def test_catalog_signs_in_process_and_verifies(server: ServerProcess, tmp_path: Path, fmt: str) -> None:
    d = server.deployment
    src = windows.write_cat(tmp_path, "files.cat", FILES)
    out = sign_through(server, src, fmt, tmp_path / "out" / "files.cat")  # the tool on the server refuses
    text = verify_signed(d.public, out)
    assert (
        "Text description: sealbox dep" in text and "URL description: https://example.invalid/sealbox" in text
    )
    sd = _signed_data(out)
    assert sd["encap_content_info"]["content_type"].dotted == "1.3.6.1.4.1.311.10.1"
    # the CTL is the input's, byte for byte, and the message digest is over its value
    assert sd["encap_content_info"].dump() == _signed_data(src)["encap_content_info"].dump()
    ctl_value = sd["encap_content_info"]["content"].contents  # the CTL's, without tag and length
    assert _attribute(sd, "message_digest") == hashlib.sha256(ctl_value).digest()
    assert stub_signed(out.read_bytes()) == (fmt == "sha2signcodestub")
    if fmt.endswith("-v2"):
        assert "Timestamp Server Signature verification: ok" in text, text
    else:
        assert "Timestamp is not available" in text, text


@pytest.mark.parametrize("fmt", ["sha2signcode", "sha2signcodestub"])
def test_catalog_matches_osslsigncode(server: ServerProcess, tmp_path: Path, fmt: str) -> None:
    d = server.deployment
    src = windows.write_cat(tmp_path, "files.cat", FILES)
    ours = sign_through(server, src, fmt, tmp_path / "out" / "files.cat")
    theirs = tmp_path / "theirs.cat"
    signed_by_osslsigncode(d.root, src, theirs, stub=fmt == "sha2signcodestub")
    assert comparable(_signed_data(ours)) == comparable(_signed_data(theirs))
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
    first = sign_through(server, src, "sha2signcodestub", tmp_path / "first" / "files.cat")
    again = sign_through(server, first, "sha2signcode", tmp_path / "again" / "files.cat")
    text = verify_signed(d.public, again)
    assert "Number of verified signatures: 1" in text
    sd = _signed_data(again)
    assert len(sd["signer_infos"]) == 1
    assert not stub_signed(again.read_bytes())  # the old certificates went
    assert sd["encap_content_info"].dump() == _signed_data(src)["encap_content_info"].dump()
    # what osslsigncode makes of the signed catalog keeps the same: the CTL alone
    theirs = tmp_path / "theirs.cat"
    signed_by_osslsigncode(d.root, first, theirs)
    assert comparable(sd) == comparable(_signed_data(theirs))


# -- malformed catalogs (each passes the kind check, which reads the header only) -----------------
# (refused through the server, naming the fault: test_inprocess_kinds.test_server_refuses_malformed_input)
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


# -- an ECDSA key ----------------------------------------------------------------------------------
def test_ecdsa_key_signs_a_catalog(tmp_path: Path) -> None:
    check_ecdsa_key(tmp_path, windows.write_cat(tmp_path, "files.cat", FILES), {"description": "sealbox ec"})
