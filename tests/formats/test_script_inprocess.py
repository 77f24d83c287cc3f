"""PowerShell scripts signed in-process (:mod:`sealbox.formats._script`) through a real server
whose ``osslsigncode`` refuses to sign: the outputs pass the real ``osslsigncode verify``, and
are what ``osslsigncode sign`` 2.9 writes, byte for byte at the same signing time (UTF-8 with and
without a BOM, LF and CRLF, UTF-16LE, osslsigncode's quirks in finding an old block); an old
block is replaced; an ECDSA key signs the same way; an osslsigncode too old for scripts no longer
matters. Scripts osslsigncode cannot sign (BAD below) and a SoftHSM key:
tests/formats/test_inprocess_kinds.py."""

from __future__ import annotations

import base64
import datetime as dt
import ssl
from pathlib import Path
from typing import Any

import httpx
import pytest
from asn1crypto import cms  # type: ignore[import-untyped]

from sealbox.formats._pe import signed_data
from sealbox.formats._script import sign_script
from sealbox.keys import PassphraseSource, load_key
from sealbox.server.config import load_config
from tests.formats._authenticode_util import (
    CAP,
    DESCRIPTION,
    FMTS,
    OSSL,
    URL,
    check_ecdsa_key,
    comparable,
    no_process,
    sign_through,
    signature_der,
    signed_by_osslsigncode,
    stub_signed,
    verify_signed,
)
from tests.formats._authenticode_util import SCRIPT_HEADER as HEADER
from tests.servers import ServerProcess

pytestmark = pytest.mark.skipif(OSSL is None, reason="osslsigncode is not installed")

_TEXT = "# sealbox sample script\nparam([string]$Name = 'wörld')\nWrite-Output \"Hello, $Name 🔏\"\n"
_HEAD = HEADER.encode()

#: inputs, by name: the usual encodings and line ends, then where osslsigncode's search for an
#: old signature block does something particular (each reproduced, not corrected)
SAMPLES: dict[str, bytes] = {
    "utf8-lf": _TEXT.encode(),
    "utf8-bom-crlf": b"\xef\xbb\xbf" + _TEXT.replace("\n", "\r\n").encode(),
    "utf16-crlf": ("\ufeff" + _TEXT.replace("\n", "\r\n")).encode("utf-16-le"),
    "utf16-lf": ("\ufeff" + _TEXT).encode("utf-16-le"),
    "no-final-newline": _TEXT.encode().rstrip(b"\n"),
    # a header on the first line: osslsigncode takes the script for unsigned, and signs it all
    "header-on-first-line": _HEAD + b"\nWrite-Output 1\n",
    # a CRLF header after an LF line: the cut goes one byte before that line feed
    "crlf-header-after-lf": b"Write-Output 1\n" + _HEAD + b"\r\nxyz\n",
    # ... which may split a UTF-8 character (then hashed as U+FFFD)
    "cut-splits-a-character": "Write-Output 'é'\n".encode() + _HEAD + b"\r\nxyz\n",
    # osslsigncode keeps 99 characters of a line: the 99th decides "ends in CR"
    "long-header-line-cr-kept": b"a\r\n" + _HEAD + b"x" * 69 + b"\r" + b"y" * 50 + b"\n",
    "long-header-line-cr-lost": b"a\r\n" + _HEAD + b"x" * 200 + b"\r\n",
    # a header line without a final line feed is no header
    "header-without-newline": b"Write-Output 1\r\n" + _HEAD,
}

#: what osslsigncode signs but then cannot verify itself: it finds no block in the first, and
#: the old header (now ended by the new block's CR LF) before the new block in the second
UNVERIFIABLE = ("header-on-first-line", "header-without-newline")


@pytest.fixture
def server(inprocess_server: ServerProcess) -> ServerProcess:
    """File keys; the formats' osslsigncode says it is 2.5 (too old for scripts, were they signed
    by it) and refuses to do anything else (one server for the run: conftest.py)."""
    return inprocess_server


def _write(directory: Path, name: str, data: bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(data)
    return path


def _encoding(data: bytes) -> str:
    return "utf-16-le" if data[:2] == b"\xff\xfe" else "utf-8"


def _split(data: bytes) -> tuple[bytes, list[str]]:
    """A signed script: the text before its (last) signature block, and the block's lines."""
    enc = _encoding(data)
    at = data.rfind(f"\r\n{HEADER}".encode(enc))
    assert at >= 0 and len(data[:at]) % len("a".encode(enc)) == 0
    lines = data[at:].decode(enc).split("\r\n")
    assert (
        lines[0] == ""
        and lines[-1] == ""
        and lines[1] == HEADER
        and lines[-2] == "# SIG # End signature block"
    )
    return data[:at], lines[1:-1]


def _pkcs7(data: bytes) -> Any:
    """The SignedData of a signed script's last block."""
    _, lines = _split(data)
    assert all(line.startswith("# ") for line in lines)
    info = cms.ContentInfo.load(base64.b64decode("".join(line[2:] for line in lines[1:-1])))
    assert info["content_type"].native == "signed_data"
    return info["content"]


def _signing_time(sd: Any) -> Any:
    (si,) = sd["signer_infos"]
    (when,) = [a["values"][0].native for a in si["signed_attrs"] if a["type"].native == "signing_time"]
    return when


# -- through the server, file keys -----------------------------------------------------------------
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("sample", ["utf8-lf", "utf8-bom-crlf", "utf16-crlf"])
def test_script_signs_in_process_and_verifies(
    server: ServerProcess, tmp_path: Path, sample: str, fmt: str
) -> None:
    d = server.deployment
    src = _write(tmp_path, "tool.ps1", SAMPLES[sample])
    out = sign_through(server, src, fmt, tmp_path / "out" / "tool.ps1")  # the tool on the server refuses
    text = verify_signed(d.public, out)
    assert f"Text description: {DESCRIPTION}" in text and f"URL description: {URL}" in text
    before, _ = _split(out.read_bytes())
    assert before == src.read_bytes()
    _pkcs7(out.read_bytes())  # a well-formed block of a SignedData
    assert stub_signed(signature_der(out)) == (fmt == "sha2signcodestub")
    if fmt.endswith("-v2"):
        assert "Timestamp Server Signature verification: ok" in text, text
    else:
        assert "Timestamp is not available" in text, text


@pytest.mark.parametrize("sample", ["utf8-lf", "utf8-bom-crlf", "utf16-crlf", "crlf-header-after-lf"])
def test_script_matches_osslsigncode_through_the_server(
    server: ServerProcess, tmp_path: Path, sample: str
) -> None:
    """The same text kept, the same block layout, the same SpcIndirectDataContent (SIP, digest),
    attributes and certificates as ``osslsigncode sign`` on the same input with the same key."""
    d = server.deployment
    src = _write(tmp_path, "tool.ps1", SAMPLES[sample])
    ours = sign_through(server, src, "sha2signcode", tmp_path / "out" / "tool.ps1").read_bytes()
    theirs = signed_by_osslsigncode(d.root, src, tmp_path / "theirs.ps1").read_bytes()
    (ours_text, ours_block), (theirs_text, theirs_block) = _split(ours), _split(theirs)
    assert ours_text == theirs_text
    assert [len(line) for line in ours_block] == [len(line) for line in theirs_block]
    assert comparable(_pkcs7(ours)) == comparable(_pkcs7(theirs))
    if _signing_time(_pkcs7(ours)) == _signing_time(_pkcs7(theirs)):
        assert ours == theirs  # signed in the same second: RSA PKCS#1 v1.5 is deterministic


@pytest.mark.parametrize("sample", list(SAMPLES))
def test_script_is_osslsigncodes_byte_for_byte(server: ServerProcess, tmp_path: Path, sample: str) -> None:
    """At the same signing time (``osslsigncode -time``) with the same key, the whole file is the
    same, and so is a second signing of that output (the old block found and replaced)."""
    d = server.deployment
    cfg = load_config(d.config)
    key = load_key(
        cfg.key_spec("authenticode"), PassphraseSource.from_file(d.root / "passphrases").get("authenticode")
    )
    when = 1_700_000_000

    def signature(content: bytes, content_type: bytes) -> bytes:
        return signed_data(
            content, content_type, key.chain, lambda data: key.sign(data, "sha256", "pkcs1v15"),
            description=DESCRIPTION, url=URL, now=dt.datetime.fromtimestamp(when, dt.UTC),
        )  # fmt: skip

    src = _write(tmp_path, "tool.ps1", SAMPLES[sample])
    for round_ in ("first", "again"):
        ours, theirs = tmp_path / f"ours-{round_}.ps1", tmp_path / f"theirs-{round_}.ps1"
        with no_process():
            sign_script(src, ours, signature)
        signed_by_osslsigncode(d.root, src, theirs, "-time", str(when))
        assert ours.read_bytes() == theirs.read_bytes(), round_
        if sample not in UNVERIFIABLE:
            verify_signed(d.public, ours)
        src = theirs


def test_resigning_replaces_the_signature(server: ServerProcess, tmp_path: Path) -> None:
    d = server.deployment
    src = _write(tmp_path, "tool.ps1", SAMPLES["utf8-bom-crlf"])
    first = sign_through(server, src, "sha2signcodestub", tmp_path / "first" / "tool.ps1")
    again = sign_through(server, first, "sha2signcode", tmp_path / "again" / "tool.ps1")
    text = verify_signed(d.public, again)
    assert "Number of verified signatures: 1" in text
    data = again.read_bytes()
    assert data.count(HEADER.encode()) == 1
    assert _split(data)[0] == src.read_bytes()  # the text as it was, the old block gone
    sd = _pkcs7(data)
    assert len(sd["signer_infos"]) == 1
    assert not stub_signed(signature_der(again))  # the old certificates went
    # the same digest as osslsigncode's re-signing of the signed script, and as the first signing
    theirs = signed_by_osslsigncode(d.root, first, tmp_path / "theirs.ps1").read_bytes()
    assert _split(theirs)[0] == _split(data)[0]
    assert comparable(sd) == comparable(_pkcs7(theirs))
    first_content = _pkcs7(first.read_bytes())["encap_content_info"].dump()
    assert sd["encap_content_info"].dump() == first_content


# -- scripts osslsigncode cannot sign (each passes the kind check: UTF-8 text) ----------------------
# (refused through the server, naming why: test_inprocess_kinds.test_server_refuses_malformed_input)
BAD = {
    "crlf-header-on-first-line": (
        _HEAD + b"\r\nWrite-Output 1\r\n",  # osslsigncode 2.9 crashes (its cut would be at -1)
        "malformed script: a signature block header at its start ends in CR LF",
    ),
    "crlf-header-after-an-empty-first-line": (
        b"\n" + _HEAD + b"\r\nWrite-Output 1\r\n",
        "malformed script: a signature block header at its start ends in CR LF",
    ),
}


def test_an_old_osslsigncode_still_serves_scripts(server: ServerProcess) -> None:
    """The server's tool says 2.5 (scripts came in 2.8; the samples above signed all the same):
    the heartbeat does not list scripts as unserved."""
    ctx = ssl.create_default_context(cafile=str(server.deployment.ca))
    with httpx.Client(verify=ctx, timeout=CAP) as h:
        check = h.get(f"{server.server.url}/__heartbeat__").json()["checks"]["formats"]
    for fmt in FMTS:
        assert "PowerShell scripts" not in check.get("unserved", {}).get(fmt, {}), check


# -- an ECDSA key ----------------------------------------------------------------------------------
def test_ecdsa_key_signs_a_script(tmp_path: Path) -> None:
    src = _write(tmp_path, "tool.ps1", SAMPLES["utf16-lf"])
    check_ecdsa_key(tmp_path, src, {"description": "sealbox ec"})
