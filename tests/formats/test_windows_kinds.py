"""Authenticode beyond PE through a real server with the real osslsigncode: MSI (wixl), checked
by ``osslsigncode verify``; the kind is told by the bytes, the heartbeat says every kind is
served, an osslsigncode too old for a kind does not matter. The kinds signed in-process (CAB,
catalogs, APPX/MSIX, scripts) through a server, malformed ones refused, a SoftHSM key:
tests/formats/test_inprocess_kinds.py."""

from __future__ import annotations

import shutil
import ssl
import stat
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import tomli_w
from cryptography import x509

from sealbox.formats.authenticode import AuthenticodeSigner, osslsigncode_version
from sealbox.samples import windows
from sealbox.winfiles import authenticode_kind, is_signable_name, name_problem
from tests.servers import Deployment, ServerProcess, start_server

OSSL = shutil.which("osslsigncode")
pytestmark = pytest.mark.skipif(
    OSSL is None or shutil.which("gcab") is None or shutil.which("wixl") is None,
    reason="needs osslsigncode, gcab and wixl (scripts/bootstrap.sh installs them)",
)
FMT = "sha2signcode"
Maker = Callable[[Path, str], Path]


def _publisher(d: Deployment) -> str:
    """The signing certificate's subject, which an APPX manifest's Publisher must equal."""
    chain = d.root / "keys" / "authenticode.chain.pem"
    if not chain.is_file():
        return "CN=sealbox authenticode"
    return x509.load_pem_x509_certificates(chain.read_bytes())[0].subject.rfc4514_string()


def _makers(d: Deployment) -> dict[str, Callable[[Path], Path]]:
    return {
        "msi": lambda p: windows.write_wixl_msi(p, "setup.msi"),
        "cab": lambda p: windows.write_cab(p, "files.cab"),
        "appx": lambda p: windows.write_appx(p, "app.msix", publisher=_publisher(d)),
        "ps1": lambda p: windows.write_ps1(p, "tool.ps1"),
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    sp = start_server(Deployment.create(tmp_path_factory.mktemp("win") / "dep", "dep", [FMT]))
    yield sp
    sp.stop()


def _sign(sp: ServerProcess, src: Path, out: Path) -> Path:
    with sp.client(timeout=120) as c:
        res = c.sign(src, [FMT], out)
    assert res.ok, res.error
    return out


def _heartbeat(sp: ServerProcess) -> dict[str, object]:
    ctx = ssl.create_default_context(cafile=str(sp.deployment.ca))
    with httpx.Client(verify=ctx, timeout=60) as h:
        body = h.get(f"{sp.server.url}/__heartbeat__").json()
    assert isinstance(body, dict)
    return body


def test_msi_signs_and_verifies(server: ServerProcess, tmp_path: Path) -> None:
    src = _makers(server.deployment)["msi"](tmp_path)
    out = _sign(server, src, tmp_path / "out" / src.name)
    assert out.read_bytes() != src.read_bytes()
    command = AuthenticodeSigner.verify(FMT, out, None, server.deployment.public)
    assert command.startswith("osslsigncode verify -CAfile")


def test_heartbeat_reports_every_kind_served(server: ServerProcess) -> None:
    assert (osslsigncode_version(str(OSSL)) or (0, 0)) >= (2, 8), (
        "bootstrap installs osslsigncode from backports"
    )
    check = _heartbeat(server)["checks"]
    assert isinstance(check, dict) and check["formats"] == {
        "status": "ok",
        "message": "every format signs every kind of input it knows",
        "unserved": {},
    }


@pytest.mark.parametrize(("kind", "names"), [("cab", ["a.cab", "a.exe"]), ("ps1", ["t.ps1", "t.psd1"])])
def test_same_bytes_under_two_names_give_the_same_output(
    server: ServerProcess, tmp_path: Path, kind: str, names: list[str]
) -> None:
    """The kind is told by the bytes: a CAB named .exe is signed as a CAB (as an MSI named .exe
    is signed as an MSI), and the result of (format, sha1) is the same whatever the name."""
    (tmp_path / "src").mkdir()
    src = _makers(server.deployment)[kind](tmp_path / "src")
    outs = []
    for name in names:
        (tmp_path / name).write_bytes(src.read_bytes())
        outs.append(_sign(server, tmp_path / name, tmp_path / "out" / name).read_bytes())
    assert outs[0] == outs[1]
    renamed = tmp_path / "out" / names[1]
    assert authenticode_kind(renamed) == {"cab": "CAB", "ps1": "script"}[kind]
    AuthenticodeSigner.verify(FMT, renamed, None, server.deployment.public)


def test_name_rules() -> None:
    """The upload rule takes the new extensions (uploads of each kind go through it, here and in
    test_inprocess_kinds.py); the task
    runner's rule for files and zip members stays PE and MSI."""
    for name in ["a.cab", "b.CAT", "c.appx", "d.msix", "e.ps1", "f.psm1", "g.PSD1", "h.msi", "i.exe"]:
        assert name_problem(name) is None, name
    assert str(name_problem("b.msixbundle")).startswith("does not end in .exe, .dll, .sys, .msi, .cab")
    assert is_signable_name("a.msi") and not is_signable_name("a.cab") and not is_signable_name("e.ps1")


# -- an osslsigncode too old for a kind ----------------------------------------------------------
def _old_tool(directory: Path, version: str) -> Path:
    """An osslsigncode that says it is ``version`` and otherwise is the real one."""
    tool = directory / "osslsigncode-old"
    tool.write_text(
        f'#!/bin/sh\nif [ "$1" = --version ]; then echo "osslsigncode {version}, using:"; exit 0; fi\n'
        f'exec {OSSL} "$@"\n'
    )
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    return tool


@pytest.fixture(scope="module")
def old_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("old")
    d = Deployment.create(root / "dep", "dep", [FMT])
    cfg = tomllib.loads(d.config.read_text())
    cfg["formats"][FMT]["osslsigncode"] = str(_old_tool(root, "2.5"))
    d.config.write_text(tomli_w.dumps(cfg))
    sp = start_server(d)
    yield sp
    sp.stop()


def test_old_osslsigncode_serves_every_kind(old_server: ServerProcess, tmp_path: Path) -> None:
    """osslsigncode 2.5 lacks APPX (2.7) and PowerShell (2.8), but those are signed in-process:
    nothing is left unserved, and the heartbeat says so."""
    beat = _heartbeat(old_server)
    checks = beat["checks"]
    assert isinstance(checks, dict) and beat["failed"] == []
    assert checks["formats"]["status"] == "ok" and checks["formats"]["unserved"] == {}
    makers = _makers(old_server.deployment)
    with old_server.client(timeout=120) as c:
        for kind in ("cab", "ps1", "appx"):  # what 2.5 signs, and scripts and packages in-process
            src = makers[kind](tmp_path)
            res = c.sign(src, [FMT], tmp_path / "out" / src.name)
            assert res.ok, res.error
            AuthenticodeSigner.verify(FMT, tmp_path / "out" / src.name, None, old_server.deployment.public)


def test_a_zip_of_a_version_zipfile_cannot_read_is_not_an_appx(tmp_path: Path) -> None:
    """A central directory asking for zip version 25.5 (found by fuzzing): zipfile raises
    NotImplementedError; that is a malformed package, not an internal error."""
    import io
    import zipfile

    from sealbox.winfiles import _appx_problem

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("AppxManifest.xml", "<x/>")
    raw = bytearray(buf.getvalue())
    central = raw.rfind(b"PK\x01\x02")
    raw[central + 6] = 255  # version needed to extract: 25.5
    path = tmp_path / "app.msix"
    path.write_bytes(bytes(raw))
    problem = _appx_problem(path)
    assert problem is not None and problem.startswith("malformed zip"), problem
