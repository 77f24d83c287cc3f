"""Helpers shared by the tests of the Authenticode kinds signed in-process (PE, CAB, catalogs,
APPX/MSIX, PowerShell scripts): a dev deployment's signers without a server and signing with
them, osslsigncode stand-ins (a recording wrapper, one that refuses to sign) and the server
that has one, ``osslsigncode sign`` / ``extract-data`` / ``verify`` run raw, the signature in a
signed file of any kind, the checks every kind makes the same way (a timestamp, an ECDSA key),
and the "refused through the server, logged rejected" check."""

from __future__ import annotations

import base64
import hashlib
import shutil
import struct
import subprocess
import tomllib
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from asn1crypto import cms  # type: ignore[import-untyped]
from cryptography.hazmat.primitives.asymmetric import ec

from sealbox.deploy import pki
from sealbox.deploy.dev import init_dev
from sealbox.formats import FormatSettings, SignRequest, authenticode
from sealbox.formats.authenticode import AuthenticodeSigner
from sealbox.keys import FileKey, PassphraseSource, UnlockedKey, load_key
from sealbox.samples import windows
from sealbox.samples.pe import write_pe
from sealbox.server.config import load_config
from sealbox.winfiles import authenticode_kind
from tests.formats.test_authenticode import Deployment, Job, LocalTSA, make_job, raw_verify
from tests.servers import Deployment as ServerDeployment
from tests.servers import ServerProcess, start_server

OSSL = shutil.which("osslsigncode")
CAP = 120.0
#: the names a server test signs with: plain, with the stub's extra certificate, timestamped
FMTS = ["sha2signcode", "sha2signcodestub", "sha2signcode-v2"]
DESCRIPTION, URL = "sealbox dep", "https://example.invalid/sealbox"  # what dev_setup configures
STUB_SUBJECT = "sealbox stub dummy"  # the common name of the stub's extra certificate
ECDSA_WITH_SHA256 = "1.2.840.10045.4.3.2"
SIGNING_TIME = "1.2.840.113549.1.9.5"
SCRIPT_HEADER = "# SIG # Begin signature block"

#: a small sample of each in-process kind, by the kind's short name
KIND_SAMPLES: dict[str, Callable[[Path], Path]] = {
    "pe": lambda d: write_pe(d, "setup.exe"),
    "cab": lambda d: windows.write_cab(d, "files.cab"),
    "cat": lambda d: windows.write_cat(d, "files.cat"),
    "appx": lambda d: windows.write_appx(d, "app.msix"),
    "ps1": lambda d: windows.write_ps1(d, "tool.ps1"),
}


# -- signers and servers ---------------------------------------------------------------------------
def dev_signers(root: Path, formats: Sequence[str]) -> Deployment:
    """``sealbox init --dev`` at ``root`` with ``formats``, as in-process signers (file keys)."""
    cfg = load_config(init_dev(root, "dep", formats=list(formats)))
    passphrases = PassphraseSource.from_file(root / "passphrases")
    cache: dict[str, UnlockedKey] = {}

    def resolver(name: str) -> UnlockedKey:
        if name not in cache:
            key = load_key(cfg.key_spec(name), passphrases.get(name))
            assert isinstance(key, UnlockedKey)
            cache[name] = key
        return cache[name]

    return Deployment(root, root / "public", resolver, {f: cfg.format_settings(f) for f in formats})


@contextmanager
def no_process() -> Iterator[None]:
    """Within: starting any process fails the test (in-process signing runs no tool)."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"a process was started: {args[0] if args else kwargs}")

    with pytest.MonkeyPatch.context() as m:
        m.setattr(subprocess, "Popen", refuse)
        yield


def sign_in_process(dep: Deployment, fmt: str, src: Path, tmp_path: Path, **options: str) -> Job:
    """Sign with ``fmt``'s signer; no process may start (with a timestamp the local TSA runs
    ``openssl ts``: there the signer's osslsigncode is ``false`` instead). No scratch file is
    left behind."""
    job = make_job(tmp_path, src)
    if "timestamp_url" in options:
        dep.signer(fmt, osslsigncode=shutil.which("false"), **options).sign(job.request)
    else:
        signer = dep.signer(fmt, **options)  # reads osslsigncode's version: before no_process
        with no_process():
            signer.sign(job.request)
    assert list(job.work_dir.iterdir()) == []
    return job


def signed_twice(dep: Deployment, src: Path, tmp_path: Path) -> tuple[Job, Job]:
    """``src`` signed in-process with the stub's name, then that output with the plain name."""
    first = sign_in_process(dep, "sha2signcodestub", src, tmp_path)
    again = tmp_path / "again"
    again.mkdir()
    return first, sign_in_process(dep, "sha2signcode", first.output, again)


def sign_through(sp: ServerProcess, src: Path, fmt: str, out: Path) -> Path:
    """``src`` signed with ``fmt`` by the server ``sp``, at ``out``."""
    with sp.client(timeout=CAP) as c:
        res = c.sign(src, [fmt], out)
    assert res.ok, res.error
    return out


def recording_osslsigncode(directory: Path) -> tuple[Path, Path]:
    """(wrapper, runs): the real osslsigncode behind a wrapper that leaves one file in ``runs``
    for each time it runs."""
    runs = directory / "runs"
    runs.mkdir()
    wrapper = directory / "osslsigncode-recording"
    wrapper.write_text(f'#!/bin/sh\necho "$@" > {runs}/$$\nexec {OSSL} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper, runs


def refusing_osslsigncode(directory: Path, version: str = "2.5") -> Path:
    """An osslsigncode that says it is ``version`` and refuses to do anything else."""
    tool = directory / "osslsigncode-refusing"
    tool.write_text(
        f'#!/bin/sh\nif [ "$1" = --version ]; then echo "osslsigncode {version}, using:"; exit 0; fi\n'
        'echo "this osslsigncode refuses to run" >&2\nexit 1\n'
    )
    tool.chmod(0o755)
    return tool


def set_format_options(d: ServerDeployment, options: Mapping[str, Mapping[str, str]]) -> None:
    """Add ``options`` (format -> option -> value) to the deployment's config."""
    cfg = tomllib.loads(d.config.read_text())
    for fmt, values in options.items():
        cfg["formats"][fmt].update(values)
    d.config.write_text(tomli_w.dumps(cfg))


def start_with_tool(d: ServerDeployment, tool: Path, tsa: LocalTSA) -> ServerProcess:
    """Start ``d``'s server with ``tool`` as every name's osslsigncode, the -v2 name stamped by
    ``tsa`` (whose root the public directory then holds)."""
    options = {fmt: {"osslsigncode": str(tool)} for fmt in FMTS}
    options["sha2signcode-v2"]["timestamp_url"] = tsa.url
    set_format_options(d, options)
    (d.public / authenticode.TSA_CA_FILE).write_bytes(tsa.ca.cert_pem())
    return start_server(d)


def refusing_server(root: Path, tsa: LocalTSA) -> ServerProcess:
    """A server (file keys, :data:`FMTS`) whose osslsigncode says it is 2.5 (too old for APPX
    and scripts, were they signed by it) and refuses to sign: the in-process kinds must not
    need it."""
    d = ServerDeployment.create(root / "dep", "dep", FMTS)
    return start_with_tool(d, refusing_osslsigncode(root), tsa)


# -- osslsigncode, raw -----------------------------------------------------------------------------
def signed_by_osslsigncode(root: Path, src: Path, out: Path, *extra: str, stub: bool = False) -> Path:
    """``osslsigncode sign`` of ``src`` with the key file of the dev deployment at ``root`` and the
    format's options (``stub``: with the stub's extra certificate), as the bench's direct row
    runs it: the reference an in-process output is compared with. The passphrase goes on stdin."""
    assert OSSL is not None
    keys = root / "keys"
    passphrase = PassphraseSource.from_file(root / "passphrases").get("authenticode")
    if stub:
        extra = ("-ac", str(keys / "sha2signcodestub-extra.pem"), *extra)
    out.unlink(missing_ok=True)
    subprocess.run(
        [OSSL, "sign", "-certs", str(keys / "authenticode.chain.pem"), "-key", str(keys / "authenticode.pem"),
         "-readpass", "/dev/stdin", "-h", "sha256", "-n", DESCRIPTION, "-i", URL,
         *extra, "-in", str(src), "-out", str(out)],
        input=passphrase, capture_output=True, check=True,
    )  # fmt: skip
    return out


def extract_data(src: Path, tmp_path: Path) -> bytes:
    """What ``osslsigncode extract-data`` makes of ``src``: its own digest of the file, in the
    SpcIndirectDataContent (with its [0] wrapper) it would sign."""
    assert OSSL is not None
    out = tmp_path / "data.p7"
    out.unlink(missing_ok=True)
    subprocess.run(
        [OSSL, "extract-data", "-h", "sha256", "-in", str(src), "-out", str(out)],
        capture_output=True,
        check=True,
    )
    return indirect_data(out.read_bytes())


def verify_signed(public: Path, out: Path, fmt: str = "sha2signcode", src: Path | None = None) -> str:
    """``out`` passes :meth:`AuthenticodeSigner.verify` and the real ``osslsigncode verify``
    (with the TSA root when ``public`` holds one; a script must be named .ps1) with one
    signature; osslsigncode's report."""
    AuthenticodeSigner.verify(fmt, out, src, public)
    tsa_ca = public / authenticode.TSA_CA_FILE
    res = raw_verify(
        out, public / authenticode.CA_FILE, *(["-TSA-CAfile", str(tsa_ca)] if tsa_ca.is_file() else [])
    )
    assert res.returncode == 0 and "Signature verification: ok" in res.stdout, res.stdout + res.stderr
    assert "Number of verified signatures: 1" in res.stdout, res.stdout
    return res.stdout


# -- what every kind checks the same way -----------------------------------------------------------
def check_v2_timestamp(dep: Deployment, tsa: LocalTSA, src: Path, tmp_path: Path) -> None:
    """The -v2 name asks ``tsa`` once, in-process, and the stamp verifies against its root."""
    before = tsa.requests
    job = sign_in_process(dep, "sha2signcodestub-v2", src, tmp_path, timestamp_url=tsa.url)
    assert tsa.requests == before + 1
    public = tmp_path / "public"
    shutil.copytree(dep.public_dir, public)
    (public / authenticode.TSA_CA_FILE).write_bytes(tsa.ca.cert_pem())
    text = verify_signed(public, job.output, "sha2signcodestub-v2", src)
    assert "Timestamp Server Signature verification: ok" in text, text


def check_ecdsa_key(tmp_path: Path, src: Path, options: Mapping[str, str]) -> None:
    """A P-256 file key (under its own root) signs ``src`` in-process with ``options``: the real
    osslsigncode verifies it, and the signature is ecdsa-with-SHA256."""
    ca = pki.make_ca("sealbox test EC code-signing root")
    private = ec.generate_private_key(ec.SECP256R1())
    key = FileKey("ec", private).with_chain(
        [pki.certify(ca, "sealbox EC signer", private.public_key()), ca.cert]
    )
    signer = AuthenticodeSigner(
        FormatSettings("sha2signcode", "ec", dict(options), tmp_path), lambda name: key
    )
    (tmp_path / "work").mkdir()
    out = tmp_path / f"signed{src.suffix}"
    with no_process():
        signer.sign(SignRequest(input=src, output=out, filename=src.name, work_dir=tmp_path / "work"))
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem())
    res = raw_verify(out, tmp_path / "ca.pem")
    assert res.returncode == 0 and "Signature verification: ok" in res.stdout, res.stdout + res.stderr
    (si,) = cms.ContentInfo.load(signature_der(out))["content"]["signer_infos"]
    assert si["signature_algorithm"]["algorithm"].dotted == ECDSA_WITH_SHA256


def signed_both_ways(dep: Deployment, src: Path, tmp_path: Path) -> tuple[bytes, bytes]:
    """(ours, theirs): ``src`` signed in-process with the plain name, and by ``osslsigncode
    sign`` with the same key and options."""
    ours = sign_in_process(dep, "sha2signcode", src, tmp_path).output.read_bytes()
    (tmp_path / "ref").mkdir()
    return ours, signed_by_osslsigncode(dep.root, src, tmp_path / "ref" / f"signed{src.suffix}").read_bytes()


def signed_by_osslsigncode_first(dep: Deployment, make: Callable[[Path], Path], tmp_path: Path) -> Path:
    """A sample of ``make``'s signed by ``osslsigncode sign`` with the stub's extra certificate:
    an old signature for in-process signing to replace."""
    first = tmp_path / "first"
    first.mkdir()
    src = make(first)
    return signed_by_osslsigncode(dep.root, src, first / f"signed{src.suffix}", stub=True)


# -- what a signed file holds ----------------------------------------------------------------------
def signature_der(path: Path) -> bytes:
    """The PKCS#7 SignedData (DER; for a CAB with its padding) in a signed file of any
    in-process kind, found by the kind's own layout."""
    data = path.read_bytes()
    kind = authenticode_kind(path)
    if kind == "PE":
        return authenticode.signature_pkcs7(path)
    if kind == "CAB":  # the reserve area names it: offset and size at 44
        sigpos, siglen = struct.unpack_from("<II", data, 44)
        return data[sigpos : sigpos + siglen]
    if kind == "APPX":
        with zipfile.ZipFile(path) as z:
            blob = z.read("AppxSignature.p7x")
        assert blob[:4] == b"PKCX"
        return blob[4:]
    if kind == "script":  # base64, "# "-prefixed, in the last block
        text = data.decode("utf-16-le" if data[:2] == b"\xff\xfe" else "utf-8")
        lines = text[text.rindex(f"\r\n{SCRIPT_HEADER}") :].split("\r\n")[2:-2]
        return base64.b64decode("".join(line[2:] for line in lines))
    assert kind == "catalog", kind
    return data


def indirect_data(der: bytes) -> bytes:
    """The signed content (for Authenticode the SpcIndirectDataContent, with its [0] wrapper)
    of a PKCS#7 SignedData."""
    return bytes(cms.ContentInfo.load(der)["content"]["encap_content_info"]["content"].dump())


def certificate_names(sd: Any) -> set[str]:
    """The common names of the certificates a SignedData (asn1crypto's) carries."""
    return {c.chosen.subject.native["common_name"] for c in sd["certificates"]}


def subjects(der: bytes) -> set[str]:
    """The common names of the certificates a SignedData (DER) carries."""
    return certificate_names(cms.ContentInfo.load(der)["content"])


def comparable(sd: Any) -> tuple[Any, ...]:
    """A SignedData but for what differs between two signings: the signing time, the signature."""
    (si,) = sd["signer_infos"]
    attributes = [(a["type"].dotted, a["values"].dump()) for a in si["signed_attrs"]]
    return (
        sd["version"].native,
        sd["digest_algorithms"].dump(),
        sd["encap_content_info"].dump(),  # for Authenticode the SpcIndirectDataContent: SIP info, digest
        sd["certificates"].dump(),
        sd["crls"].dump(),
        si["version"].native,
        si["sid"].dump(),
        si["digest_algorithm"].dump(),
        [a for a in attributes if a[0] != SIGNING_TIME],
        len(attributes),
        si["signature_algorithm"].dump(),
        si["unsigned_attrs"].dump(),
    )


def stub_signed(der: bytes) -> bool:
    """Whether the SignedData carries the stub's extra certificate."""
    return any(s.startswith(STUB_SUBJECT) for s in subjects(der))


# -- through a server ------------------------------------------------------------------------------
def assert_refused(sp: ServerProcess, bad: Path, reason: str, fmt: str = "sha2signcode") -> str:
    """``bad`` sent to ``sp`` is refused saying ``reason`` (not naming the upload), writes no
    output, and is logged
    "rejected" (a permanent refusal, a 4xx at once, not retried); the client's error."""
    out = bad.parent / "out" / bad.name
    with sp.client(timeout=CAP) as c:
        res = c.sign(bad, [fmt], out)
    assert not res.ok and reason in (res.error or ""), res.error
    # the server's reason does not name the upload: it is replayed to these bytes under any name
    assert bad.name not in (res.error or "").partition("signing failed: ")[2], res.error
    assert not out.exists()
    sha1 = hashlib.sha1(bad.read_bytes(), usedforsecurity=False).hexdigest()

    def outcomes(lines: list[dict[str, object]]) -> list[object]:
        return [e["outcome"] for e in lines if e.get("event") == "job" and e.get("sha1") == sha1]

    assert set(outcomes(sp.wait_log(outcomes))) == {"rejected"}
    return res.error or ""
