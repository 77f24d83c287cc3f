"""PowerShell scripts signed in-process (:mod:`sealbox.formats._script`) through a real server
whose ``osslsigncode`` refuses to sign: the outputs pass the real ``osslsigncode verify``, and
are what ``osslsigncode sign`` 2.9 writes, byte for byte at the same signing time (UTF-8 with and
without a BOM, LF and CRLF, UTF-16LE, osslsigncode's quirks in finding an old block); an old
block is replaced; scripts osslsigncode cannot sign are refused naming why; an ECDSA key and a
SoftHSM key sign the same way; an osslsigncode too old for scripts no longer matters."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from asn1crypto import cms  # type: ignore[import-untyped]
from cryptography.hazmat.primitives.asymmetric import ec

from sealbox.deploy import pki
from sealbox.formats import FormatSettings, SignRequest
from sealbox.formats import authenticode as ac
from sealbox.formats._pe import signed_data
from sealbox.formats._script import sign_script
from sealbox.formats.authenticode import AuthenticodeSigner
from sealbox.keys import FileKey, PassphraseSource, load_key
from sealbox.server.config import load_config
from tests.formats.test_authenticode import LocalTSA, raw_verify
from tests.formats.test_pe_inprocess import no_process
from tests.servers import Deployment, ServerProcess, start_server

OSSL = shutil.which("osslsigncode")
pytestmark = pytest.mark.skipif(OSSL is None, reason="osslsigncode is not installed")
CAP = 120.0
FMTS = ["sha2signcode", "sha2signcodestub", "sha2signcode-v2"]
DESCRIPTION, URL = "sealbox dep", "https://example.invalid/sealbox"
HEADER = "# SIG # Begin signature block"

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


def _set_option(d: Deployment, fmt: str, line: str) -> None:
    text = d.config.read_text()
    d.config.write_text(text.replace(f"[formats.{fmt}]\n", f"[formats.{fmt}]\n{line}\n"))


@pytest.fixture(scope="module")
def tsa(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalTSA]:
    t = LocalTSA(tmp_path_factory.mktemp("ps1-tsa") / "tsa")
    yield t
    t.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tsa: LocalTSA) -> Iterator[ServerProcess]:
    """File keys; the formats' osslsigncode tells its version (2.5: too old for scripts, were
    they signed by it) and refuses to do anything else."""
    root = tmp_path_factory.mktemp("ps1")
    d = Deployment.create(root / "dep", "dep", FMTS)
    refusing = root / "osslsigncode"
    refusing.write_text(
        '#!/bin/sh\nif [ "$1" = --version ]; then echo "osslsigncode 2.5, using:"; exit 0; fi\n'
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


def _write(directory: Path, name: str, data: bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(data)
    return path


def _sign(sp: ServerProcess, src: Path, fmt: str, out: Path) -> Path:
    with sp.client(timeout=CAP) as c:
        res = c.sign(src, [fmt], out)
    assert res.ok, res.error
    return out


def _verify(d: Deployment, out: Path) -> str:
    AuthenticodeSigner.verify("sha2signcode", out, None, d.public)
    named = out.with_name(out.name + ".ps1")  # osslsigncode tells a script by its name
    named.write_bytes(out.read_bytes())
    res = raw_verify(named, d.public / ac.CA_FILE, "-TSA-CAfile", str(d.public / ac.TSA_CA_FILE))
    assert res.returncode == 0 and "Signature verification: ok" in res.stdout, res.stdout + res.stderr
    return res.stdout


def _osslsigncode(d: Deployment, src: Path, out: Path, *options: str) -> Path:
    """``osslsigncode sign`` of ``src`` (as a .ps1) with the deployment's key file and options."""
    assert OSSL is not None
    named = src.with_name(src.name + ".in.ps1")
    named.write_bytes(src.read_bytes())
    passphrase = PassphraseSource.from_file(d.root / "passphrases").get("authenticode")
    keys = d.root / "keys"
    subprocess.run(
        [OSSL, "sign", "-certs", str(keys / "authenticode.chain.pem"), "-key", str(keys / "authenticode.pem"),
         "-readpass", "/dev/stdin", "-h", "sha256", "-n", DESCRIPTION, "-i", URL,
         *options, "-in", str(named), "-out", str(out)],
        input=passphrase, capture_output=True, check=True,
    )  # fmt: skip
    return out


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


def _subjects(sd: Any) -> set[str]:
    return {c.chosen.subject.native["common_name"] for c in sd["certificates"]}


def _signing_time(sd: Any) -> Any:
    (si,) = sd["signer_infos"]
    (when,) = [a["values"][0].native for a in si["signed_attrs"] if a["type"].native == "signing_time"]
    return when


def _comparable(sd: Any) -> tuple[Any, ...]:
    """A SignedData but for what differs between two signings: the signing time, the signature."""
    (si,) = sd["signer_infos"]
    kept = [(a["type"].dotted, a["values"].dump()) for a in si["signed_attrs"]]
    return (
        sd["version"].native,
        sd["digest_algorithms"].dump(),
        sd["encap_content_info"].dump(),  # the SpcIndirectDataContent: SIP info and digest
        sd["certificates"].dump(),
        si["sid"].dump(),
        [a for a in kept if a[0] != "1.2.840.113549.1.9.5"],
        si["signature_algorithm"].dump(),
    )


# -- through the server, file keys -----------------------------------------------------------------
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("sample", ["utf8-lf", "utf8-bom-crlf", "utf16-crlf"])
def test_script_signs_in_process_and_verifies(
    server: ServerProcess, tmp_path: Path, sample: str, fmt: str
) -> None:
    d = server.deployment
    src = _write(tmp_path, "tool.ps1", SAMPLES[sample])
    out = _sign(server, src, fmt, tmp_path / "out" / "tool.ps1")  # the tool on the server refuses
    text = _verify(d, out)
    assert f"Text description: {DESCRIPTION}" in text and f"URL description: {URL}" in text
    before, _ = _split(out.read_bytes())
    assert before == src.read_bytes()
    sd = _pkcs7(out.read_bytes())
    assert any(s.startswith("sealbox stub dummy") for s in _subjects(sd)) == (fmt == "sha2signcodestub")
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
    ours = _sign(server, src, "sha2signcode", tmp_path / "out" / "tool.ps1").read_bytes()
    theirs = _osslsigncode(d, src, tmp_path / "theirs.ps1").read_bytes()
    (ours_text, ours_block), (theirs_text, theirs_block) = _split(ours), _split(theirs)
    assert ours_text == theirs_text
    assert [len(line) for line in ours_block] == [len(line) for line in theirs_block]
    assert _comparable(_pkcs7(ours)) == _comparable(_pkcs7(theirs))
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
        _osslsigncode(d, src, theirs, "-time", str(when))
        assert ours.read_bytes() == theirs.read_bytes(), round_
        if sample not in UNVERIFIABLE:
            _verify(d, ours)
        src = theirs


def test_resigning_replaces_the_signature(server: ServerProcess, tmp_path: Path) -> None:
    d = server.deployment
    src = _write(tmp_path, "tool.ps1", SAMPLES["utf8-bom-crlf"])
    first = _sign(server, src, "sha2signcodestub", tmp_path / "first" / "tool.ps1")
    again = _sign(server, first, "sha2signcode", tmp_path / "again" / "tool.ps1")
    text = _verify(d, again)
    assert "Number of verified signatures: 1" in text
    data = again.read_bytes()
    assert data.count(HEADER.encode()) == 1
    assert _split(data)[0] == src.read_bytes()  # the text as it was, the old block gone
    sd = _pkcs7(data)
    assert len(sd["signer_infos"]) == 1
    assert not any(s.startswith("sealbox stub dummy") for s in _subjects(sd))  # the old certificates went
    # the same digest as osslsigncode's re-signing of the signed script, and as the first signing
    theirs = _osslsigncode(d, first, tmp_path / "theirs.ps1").read_bytes()
    assert _split(theirs)[0] == _split(data)[0]
    assert _comparable(sd) == _comparable(_pkcs7(theirs))
    first_content = _pkcs7(first.read_bytes())["encap_content_info"].dump()
    assert sd["encap_content_info"].dump() == first_content


# -- scripts osslsigncode cannot sign (each passes the kind check: UTF-8 text) ----------------------
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


@pytest.mark.parametrize("case", list(BAD))
def test_unsignable_script_is_refused_naming_why(server: ServerProcess, tmp_path: Path, case: str) -> None:
    data, reason = BAD[case]
    bad = _write(tmp_path, "bad.ps1", data)
    with server.client(timeout=CAP) as c:
        res = c.sign(bad, ["sha2signcode"], tmp_path / "out" / "bad.ps1")
    assert not res.ok and reason in (res.error or ""), res.error
    assert not (tmp_path / "out" / "bad.ps1").exists()
    sha1 = hashlib.sha1(data, usedforsecurity=False).hexdigest()

    def outcomes(lines: list[dict[str, object]]) -> list[object]:
        return [e["outcome"] for e in lines if e.get("event") == "job" and e.get("sha1") == sha1]

    assert set(outcomes(server.wait_log(outcomes))) == {"rejected"}  # permanent: refused at once


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
    ca = pki.make_ca("sealbox test EC code-signing root")
    private = ec.generate_private_key(ec.SECP256R1())
    chain = [pki.certify(ca, "sealbox EC signer", private.public_key()), ca.cert]
    key = FileKey("ec", private).with_chain(chain)
    settings = FormatSettings("sha2signcode", "ec", {"description": "sealbox ec"}, tmp_path)
    signer = AuthenticodeSigner(settings, lambda name: key)
    src = _write(tmp_path, "tool.ps1", SAMPLES["utf16-lf"])
    (tmp_path / "work").mkdir()
    out = tmp_path / "signed.ps1"
    with no_process():
        signer.sign(SignRequest(input=src, output=out, filename="tool.ps1", work_dir=tmp_path / "work"))
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem())
    res = raw_verify(out, tmp_path / "ca.pem")
    assert res.returncode == 0 and "Signature verification: ok" in res.stdout, res.stdout + res.stderr
    (si,) = _pkcs7(out.read_bytes())["signer_infos"]
    assert si["signature_algorithm"]["algorithm"].dotted == "1.2.840.10045.4.3.2"  # ecdsa-with-SHA256


# -- a SoftHSM key, through a real server ----------------------------------------------------------
def test_softhsm_key_signs_scripts_in_process(tmp_path: Path, tsa: LocalTSA) -> None:
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
        for fmt, sample in zip(FMTS, ["utf8-lf", "utf16-crlf", "utf8-bom-crlf"], strict=True):
            src = _write(tmp_path / fmt, "tool.ps1", SAMPLES[sample])
            out = _sign(sp, src, fmt, tmp_path / "out" / fmt / "tool.ps1")
            text = _verify(d, out)
            assert ("Timestamp Server Signature verification: ok" in text) == fmt.endswith("-v2"), text
            stub = any(s.startswith("sealbox stub dummy") for s in _subjects(_pkcs7(out.read_bytes())))
            assert stub == (fmt == "sha2signcodestub")
        assert sorted(runs.iterdir()) == at_start  # no tool ran for a script
    finally:
        sp.stop()
