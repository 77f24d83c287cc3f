"""What every Authenticode kind signed in-process (PE, CAB, catalogs, APPX/MSIX, PowerShell
scripts) does the same, tested once for all of them through a real server: a SoftHSM key
signs each with every name (osslsigncode, a recording wrapper, runs at start-up and for MSI
only; the -v2 name is stamped by a local TSA); a server whose osslsigncode refuses to sign
signs each, and refuses malformed ones (each kind file's cases) with a reason, logged rejected.
What is particular to a kind stays in its own file (tests/formats/test_<kind>_inprocess.py)."""

from __future__ import annotations

import shutil
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sealbox.formats.authenticode import AuthenticodeSigner
from sealbox.samples import windows
from tests.formats import test_appx_inprocess as appx_tests
from tests.formats import test_cab_inprocess as cab_tests
from tests.formats import test_catalog_inprocess as cat_tests
from tests.formats import test_pe_inprocess as pe_tests
from tests.formats import test_script_inprocess as ps1_tests
from tests.formats._authenticode_util import (
    FMTS,
    KIND_SAMPLES,
    OSSL,
    assert_refused,
    recording_osslsigncode,
    sign_through,
    signature_der,
    start_with_tool,
    stub_signed,
    subjects,
    verify_signed,
)
from tests.formats.test_authenticode import Deployment, LocalTSA
from tests.servers import Deployment as ServerDeployment
from tests.servers import ServerProcess

pytestmark = pytest.mark.skipif(
    OSSL is None or shutil.which("gcab") is None, reason="needs osslsigncode and gcab"
)


# -- a SoftHSM key ---------------------------------------------------------------------------------
@dataclass
class Hsm:
    server: ServerProcess
    tsa: LocalTSA
    runs: Path  # one file for each osslsigncode run
    at_start: list[Path]  # the runs when the server was up

    def runs_now(self) -> list[Path]:
        return sorted(self.runs.iterdir())


@pytest.fixture(scope="module")
def hsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hsm]:
    """One SoftHSM deployment (:data:`FMTS`), one server, for every kind."""
    root = tmp_path_factory.mktemp("hsm")
    d = ServerDeployment.create(root / "dep", "dep", FMTS, hsm=True)
    assert "pkcs11" in d.config.read_text()
    wrapper, runs = recording_osslsigncode(root)
    tsa = LocalTSA(root / "tsa")
    try:
        sp = start_with_tool(d, wrapper, tsa)
        try:
            yield Hsm(sp, tsa, runs, sorted(runs.iterdir()))
        finally:
            sp.stop()
    finally:
        tsa.close()


#: the script each name signs: the encodings vary, the key path is the same
PS1_BY_FMT = {"sha2signcode": "utf8-lf", "sha2signcodestub": "utf16-crlf", "sha2signcode-v2": "utf8-bom-crlf"}


def _hsm_sample(kind: str, fmt: str, d: Path) -> Path:
    if kind == "ps1":
        p = d / "tool.ps1"
        p.write_bytes(ps1_tests.SAMPLES[PS1_BY_FMT[fmt]])
        return p
    if kind == "cat":
        return windows.write_cat(d, "files.cat", cat_tests.FILES)
    return KIND_SAMPLES[kind](d)


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("kind", list(KIND_SAMPLES))
def test_softhsm_key_signs_in_process(hsm: Hsm, tmp_path: Path, kind: str, fmt: str) -> None:
    """The token key signs through the key interface: osslsigncode ran at start-up (proving
    the MSI hand-off) and does not run for these; -v2 asks the TSA once, in-process too."""
    assert hsm.at_start, "start-up proves the token hand-off with one osslsigncode run"
    public = hsm.server.deployment.public
    src = _hsm_sample(kind, fmt, tmp_path)
    runs, stamps = hsm.runs_now(), hsm.tsa.requests
    out = sign_through(hsm.server, src, fmt, tmp_path / "out" / src.name)
    assert hsm.runs_now() == runs  # no tool ran
    assert hsm.tsa.requests == stamps + fmt.endswith("-v2")
    text = verify_signed(public, out, fmt, src)  # with the TSA's root
    assert ("Timestamp Server Signature verification: ok" in text) == fmt.endswith("-v2"), text
    assert stub_signed(signature_der(out)) == (fmt == "sha2signcodestub")


@pytest.mark.skipif(shutil.which("wixl") is None, reason="needs wixl")
def test_softhsm_key_signs_msi_with_osslsigncode(hsm: Hsm, tmp_path: Path) -> None:
    """MSI, the one kind osslsigncode still signs, with the same token key: the tool runs."""
    src = windows.write_wixl_msi(tmp_path, "setup.msi")
    runs = hsm.runs_now()
    out = sign_through(hsm.server, src, "sha2signcode", tmp_path / "out" / src.name)
    assert len(hsm.runs_now()) > len(runs)
    AuthenticodeSigner.verify("sha2signcode", out, None, hsm.server.deployment.public)


# -- a server whose osslsigncode refuses to sign ---------------------------------------------------
SIGNED: dict[str, Callable[[Path], Path]] = {
    "pe": KIND_SAMPLES["pe"],
    "cab-several-files": cab_tests.SAMPLES["several-files"],
    "cab-two-folders": cab_tests.SAMPLES["two-folders"],
    "cat": KIND_SAMPLES["cat"],
    "appx": appx_tests.SAMPLES["sample"],
    "appx-makeappx-layout": appx_tests.SAMPLES["makeappx-layout"],
    "ps1": KIND_SAMPLES["ps1"],
    "ps1-bom-crlf": lambda d: windows.write_ps1(d, "tool.psm1", bom=True, crlf=True),
}


@pytest.mark.parametrize("sample", list(SIGNED))
def test_server_signs_without_osslsigncode(
    inprocess_server: ServerProcess, tmp_path: Path, sample: str
) -> None:
    """The tool refuses to sign, so each kind is signed in-process, and verifies."""
    src = SIGNED[sample](tmp_path)
    out = sign_through(inprocess_server, src, "sha2signcode", tmp_path / "out" / src.name)
    assert out.read_bytes() != src.read_bytes()
    command = AuthenticodeSigner.verify("sha2signcode", out, src, inprocess_server.deployment.public)
    assert command.startswith("osslsigncode verify -CAfile")
    assert subjects(signature_der(out))  # where the kind keeps its signature
    if sample.startswith("ps1"):  # the text stays, the signature block is appended
        assert out.read_bytes().startswith(src.read_bytes().rstrip(b"\r\n"))


Maker = Callable[[Deployment, Path], Path]


def _from_file(make: Callable[[Path], Path]) -> Maker:
    return lambda dep, d: make(d)


def _from_bytes(name: str, data: Callable[[], bytes] | bytes) -> Maker:
    def make(dep: Deployment, d: Path) -> Path:
        p = d / name
        p.write_bytes(data if isinstance(data, bytes) else data())
        return p

    return make


def _cut(path: Path) -> bytes:
    data = path.read_bytes()
    return data[: len(data) * 2 // 3]


def _no_manifest(path: Path) -> bytes:
    out = path.with_name("nomanifest.msix")
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            if info.filename != "AppxManifest.xml":
                dst.writestr(info, src.read(info))
    return out.read_bytes()


def _not_a_catalog(path: Path) -> bytes:
    # a PKCS#7 SignedData whose content is id-data, not a certificate trust list
    return path.read_bytes().replace(cat_tests.OID_CTL, bytes.fromhex("06092a864886f70d010701"), 1)


def _spoiled(kind: str, name: str, spoil: Callable[[Path], bytes]) -> Maker:
    """The kind's sample spoiled, under ``name``: what the kind check (the bytes' first look)
    refuses."""

    def make(dep: Deployment, d: Path) -> Path:
        p = d / name
        p.write_bytes(spoil(KIND_SAMPLES[kind](d)))
        return p

    return make


#: malformed inputs of each kind and the reason the refusal gives: what the kind check refuses,
#: then cases from the kind's own table (PE, CAB, APPX: the others are refused by the signer
#: directly there; catalogs and scripts: all of them)
BAD: dict[str, tuple[Maker, str]] = {
    "cab-cut": (_spoiled("cab", "x.cab", _cut), "truncated CAB: the header says"),
    "cat-cut": (_spoiled("cat", "x.cat", _cut), "truncated catalog: its DER says"),
    "cat-not-a-catalog": (_spoiled("cat", "x.cat", _not_a_catalog), "content is not a catalog"),
    "appx-cut": (_spoiled("appx", "x.msix", _cut), "malformed zip (APPX/MSIX package)"),
    "appx-no-manifest": (
        _spoiled("appx", "x.appx", _no_manifest),
        "not an APPX/MSIX package (no AppxManifest.xml)",
    ),
    "pe-truncated-headers": (_from_file(pe_tests.BAD["truncated-headers"][0]), "truncated PE"),
    **{f"cab-{c}": cab_tests.BAD[c] for c in ("next-cabinet", "signature-cut", "file-table-moved")},
    **{
        f"appx-{c}": (_from_file(appx_tests.BAD[c][0]), appx_tests.BAD[c][1])
        for c in ("no-closing-types", "extra-fields")
    },
    **{
        f"cat-{c}": (_from_bytes("bad.cat", make), f"malformed catalog: {r}")
        for c, (make, r) in cat_tests.BAD.items()
    },
    **{f"ps1-{c}": (_from_bytes("bad.ps1", data), r) for c, (data, r) in ps1_tests.BAD.items()},
}


@pytest.mark.parametrize("case", list(BAD))
def test_server_refuses_malformed_input(
    inprocess_server: ServerProcess, authenticode_dep: Deployment, tmp_path: Path, case: str
) -> None:
    make, reason = BAD[case]
    assert_refused(inprocess_server, make(authenticode_dep, tmp_path), reason)
