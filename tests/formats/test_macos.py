"""dmg (macapp): the plumbing with the STAND-IN signer (not Apple code signing).

Real signing needs codesign on macOS; here the dev deployment's stand-in signer runs as the
external command, the key reaches it through a pipe, and the outputs are checked with
MacAppSigner.verify, the stand-in verifier's command line, and openssl alone."""

from __future__ import annotations

import gzip
import io
import json
import os
import plistlib
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from sealbox.archives import repack_tar, safe_extract_tar
from sealbox.config import load_config
from sealbox.deploy.dev import init_dev
from sealbox.errors import ConfigError, FormatRejected, SigningFailed, VerificationFailed
from sealbox.formats import FormatSettings, Signer, SignRequest, signer_class
from sealbox.formats.macos import NEEDS_MACOS, MacAppSigner
from sealbox.keys import PassphraseSource, load_key
from sealbox.keys.store import UnlockedKey
from sealbox.samples.macos import write_app_tarball


# -- shared helpers ------------------------------------------------------------------------
@dataclass
class Deployment:
    root: Path
    public: Path
    signer: Signer
    resolve: Callable[[str], UnlockedKey]
    settings: FormatSettings


def make_deployment(root: Path, level: str = "dep") -> Deployment:
    config_path = init_dev(root, level, formats=["dmg"])
    cfg = load_config(config_path)
    passphrases = PassphraseSource.from_file(root / "passphrases")

    def resolve(name: str) -> UnlockedKey:
        return load_key(cfg.key_spec(name), passphrases.get(name))

    settings = cfg.format_settings("dmg")
    return Deployment(root, root / "public", signer_class("dmg")(settings, resolve), resolve, settings)


def with_options(dep: Deployment, **options: object) -> Signer:
    merged = {**dep.settings.options, **options}
    key = merged.pop("key", dep.settings.key)
    settings = FormatSettings("dmg", key, merged, dep.settings.base_dir)
    return MacAppSigner(settings, dep.resolve)


def sign(signer: Signer, src: Path, work: Path) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    out = work / "out.tar.gz"
    signer.sign(SignRequest(input=src, output=out, filename=src.name, work_dir=work / "scratch"))
    return out


def unpack(tarball: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    subprocess.run(["tar", "-xzf", str(tarball), "-C", str(dest)], check=True)
    return dest


def standin_cli(public: Path, *apps: Path) -> subprocess.CompletedProcess[str]:
    """The stand-in verifier's raw command line."""
    cmd = [sys.executable, "-I", "-m", "sealbox.samples.macos", "verify-stand-in", "--public-key",
           str(public / "dmg-standin.pem"), *map(str, apps)]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def openssl_check(public: Path, app: Path, tmp: Path) -> subprocess.CompletedProcess[str]:
    """Independent of sealbox: openssl verifies the RSA signature over the manifest, and the
    manifest's SHA-256 of every file is compared with hashlib here."""
    record = plistlib.loads((app / "Contents/_CodeSignature/CodeResources").read_bytes())
    (tmp / "manifest").write_bytes(record["manifest"])
    (tmp / "sig").write_bytes(record["signature"])
    res = subprocess.run(
        ["openssl", "dgst", "-sha256", "-verify", str(public / "dmg-standin.pem"), "-signature",
         str(tmp / "sig"), str(tmp / "manifest")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if res.returncode == 0:
        import hashlib

        files = plistlib.loads(record["manifest"])["files"]
        for rel, entry in files.items():
            p = app / rel
            if "symlink" in entry:
                assert os.readlink(p) == entry["symlink"]
            else:
                assert hashlib.sha256(p.read_bytes()).hexdigest() == entry["sha256"], rel
    return res


def retar(src_dir: Path, out: Path) -> Path:
    repack_tar(src_dir, out, "gz")
    return out


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    return make_deployment(tmp_path_factory.mktemp("dmg") / "d")


@pytest.fixture
def app_tgz(tmp_path: Path) -> Path:
    return write_app_tarball(tmp_path / "in")


# -- registry, configuration, availability ----------------------------------------------------
def test_wire_names_and_aliases() -> None:
    assert signer_class("dmg") is MacAppSigner
    assert signer_class("macapp") is MacAppSigner
    assert signer_class("dmgv2") is MacAppSigner


@pytest.mark.skipif(sys.platform == "darwin", reason="Linux behaviour")
def test_available_explains_off_macos() -> None:
    assert MacAppSigner.available() == NEEDS_MACOS
    assert "codesign on a macOS host" in NEEDS_MACOS and "signer_command" in NEEDS_MACOS


def test_no_signer_command_is_a_config_error(tmp_path: Path) -> None:
    settings = FormatSettings("dmg", None, {}, tmp_path)
    with pytest.raises(ConfigError) as e:
        MacAppSigner(settings, lambda name: pytest.fail("no key needed"))
    assert str(e.value) == NEEDS_MACOS


@pytest.mark.parametrize(
    ("options", "key", "reason"),
    [
        ({"signer_command": "codesign -s X"}, None, "list of non-empty strings"),
        ({"signer_command": ["/nonexistent/codesign"]}, None, "not found"),
        ({"signer_command": ["true", "{key}"]}, None, "no 'key' is set"),
        ({"signer_command": ["true"]}, "dmg-standin", r"no \{key\} argument"),
        ({"signer_command": ["true"], "timeout": 0}, None, "timeout"),
        ({"signer_command": ["true"], "max_members": "many"}, None, "max_members"),
        ({"signer_command": ["true"], "sign_with": "x"}, None, "unknown option"),
    ],
)
def test_bad_config(dep: Deployment, options: dict[str, object], key: str | None, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        MacAppSigner(FormatSettings("dmg", key, options, dep.root), dep.resolve)


def test_dev_setup_public_files(dep: Deployment) -> None:
    note = (dep.public / "dmg-standin.txt").read_text()
    assert "STAND-IN" in note and "NOT Apple code signing" in note
    assert (dep.public / "dmg-standin.pem").read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert "dmg-standin.pem" in (dep.public / "README").read_text()
    cfg = load_config(dep.root / "sealbox.toml")
    section = cfg.format_settings("dmg")
    assert section.get("stand_in") is True
    assert "stand-in-codesign" in section.get("signer_command")


def test_dev_keys_differ_per_level(dep: Deployment, tmp_path: Path) -> None:
    other = make_deployment(tmp_path / "n", "nightly")
    assert (other.public / "dmg-standin.pem").read_bytes() != (dep.public / "dmg-standin.pem").read_bytes()


# -- signing with the stand-in and verifying ---------------------------------------------------
def test_stand_in_sign_and_verify(dep: Deployment, app_tgz: Path, tmp_path: Path) -> None:
    out = sign(dep.signer, app_tgz, tmp_path / "w")
    assert MacAppSigner.verify("dmg", out, app_tgz, dep.public).endswith("(STAND-IN)")
    listing = subprocess.run(["tar", "-tvzf", str(out)], capture_output=True, text=True, check=True).stdout
    lines = listing.splitlines()
    assert all(" root/root " in line for line in lines)
    assert any("Helper.framework/Versions/Current -> A" in line for line in lines)
    assert any(line.endswith("Hello.app/Contents/_CodeSignature/CodeResources") for line in lines)
    names = [line.split()[-1] for line in lines if "->" not in line]
    assert names == sorted(names, key=lambda n: n.rstrip("/").split("/"))
    tree = unpack(out, tmp_path / "x")
    res = standin_cli(dep.public, tree / "Hello.app")
    assert res.returncode == 0, res.stderr
    assert "stand-in signature OK" in res.stdout
    res = openssl_check(dep.public, tree / "Hello.app", tmp_path)
    assert res.returncode == 0 and "Verified OK" in res.stdout, res.stderr
    # the bundle itself is unchanged apart from the signature
    orig = unpack(app_tgz, tmp_path / "orig")
    for p in (orig / "Hello.app").rglob("*"):
        q = tree / p.relative_to(orig)
        if p.is_file() and not p.is_symlink():
            assert q.read_bytes() == p.read_bytes()
            assert os.access(q, os.X_OK) == os.access(p, os.X_OK)


def test_stand_in_other_levels_key_does_not_verify(dep: Deployment, app_tgz: Path, tmp_path: Path) -> None:
    out = sign(dep.signer, app_tgz, tmp_path / "w")
    other = make_deployment(tmp_path / "n", "nightly")
    with pytest.raises(VerificationFailed, match="does not verify"):
        MacAppSigner.verify("dmg", out, app_tgz, other.public)
    tree = unpack(out, tmp_path / "x")
    assert standin_cli(other.public, tree / "Hello.app").returncode != 0
    assert openssl_check(other.public, tree / "Hello.app", tmp_path).returncode != 0


def test_stand_in_two_bundles_and_extra_files(dep: Deployment, tmp_path: Path) -> None:
    a = unpack(write_app_tarball(tmp_path / "a", app_name="Alpha"), tmp_path / "src")
    b = unpack(write_app_tarball(tmp_path / "b", app_name="Beta"), tmp_path / "b-tree")
    os.rename(b / "Beta.app", a / "Beta.app")
    (a / "README.txt").write_text("not a bundle; must travel through untouched\n")
    src = retar(a, tmp_path / "two.tar.gz")
    out = sign(dep.signer, src, tmp_path / "w")
    MacAppSigner.verify("dmg", out, src, dep.public)
    tree = unpack(out, tmp_path / "x")
    assert (tree / "README.txt").read_text().startswith("not a bundle")
    assert standin_cli(dep.public, tree / "Alpha.app", tree / "Beta.app").returncode == 0


# -- tampering ----------------------------------------------------------------------------------
def _signed_tree(dep: Deployment, app_tgz: Path, tmp_path: Path) -> Path:
    return unpack(sign(dep.signer, app_tgz, tmp_path / "w"), tmp_path / "tree")


@pytest.mark.parametrize("change", ["modify", "add", "remove", "relink", "manifest", "chmod"])
def test_stand_in_tampered_output_fails(dep: Deployment, app_tgz: Path, tmp_path: Path, change: str) -> None:
    tree = _signed_tree(dep, app_tgz, tmp_path)
    app = tree / "Hello.app"
    if change == "modify":
        exe = app / "Contents/MacOS/Hello"
        exe.write_bytes(exe.read_bytes().replace(b"hello", b"HELLO"))
    elif change == "add":
        (app / "Contents/Resources/extra.txt").write_text("added after signing")
    elif change == "remove":
        (app / "Contents/Resources/readme.txt").unlink()
    elif change == "relink":
        link = app / "Contents/Frameworks/Helper.framework/Versions/Current"
        link.unlink()
        os.symlink("B", link)
    elif change == "chmod":
        (app / "Contents/MacOS/Hello").chmod(0o644)
    else:
        cr = app / "Contents/_CodeSignature/CodeResources"
        record = plistlib.loads(cr.read_bytes())
        manifest = plistlib.loads(record["manifest"])
        manifest["identifier"] = "org.example.evil"
        record["manifest"] = plistlib.dumps(manifest, fmt=plistlib.FMT_XML, sort_keys=True)
        cr.write_bytes(plistlib.dumps(record))
    bad = retar(tree, tmp_path / "bad.tar.gz")
    with pytest.raises(VerificationFailed, match=r"Hello\.app"):
        MacAppSigner.verify("dmg", bad, app_tgz, dep.public)
    res = standin_cli(dep.public, app)
    assert res.returncode == 65, res.stdout
    if change == "manifest":
        assert openssl_check(dep.public, app, tmp_path).returncode != 0


def test_stand_in_unsigned_and_corrupt_outputs_fail(dep: Deployment, app_tgz: Path, tmp_path: Path) -> None:
    with pytest.raises(VerificationFailed, match="not signed"):
        MacAppSigner.verify("dmg", app_tgz, app_tgz, dep.public)
    out = sign(dep.signer, app_tgz, tmp_path / "w")
    data = bytearray(out.read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "flipped.tar.gz").write_bytes(bytes(data))
    with pytest.raises(VerificationFailed):
        MacAppSigner.verify("dmg", tmp_path / "flipped.tar.gz", app_tgz, dep.public)


def test_stand_in_dropped_bundle_detected(dep: Deployment, tmp_path: Path) -> None:
    a = unpack(write_app_tarball(tmp_path / "a", app_name="Alpha"), tmp_path / "src")
    b = unpack(write_app_tarball(tmp_path / "b", app_name="Beta"), tmp_path / "b-tree")
    os.rename(b / "Beta.app", a / "Beta.app")
    src = retar(a, tmp_path / "two.tar.gz")
    tree = unpack(sign(dep.signer, src, tmp_path / "w"), tmp_path / "tree")
    import shutil

    shutil.rmtree(tree / "Beta.app")
    with pytest.raises(VerificationFailed, match="bundles differ"):
        MacAppSigner.verify("dmg", retar(tree, tmp_path / "one.tar.gz"), src, dep.public)


# -- the key hand-over, environment and isolation ------------------------------------------------
SPY = r"""
import json, os, sys
app = sys.argv[-1]
key_arg = [a.partition("=")[2] for a in sys.argv if a.startswith("--key=")]
with open(key_arg[0], "rb") as f:
    blob = f.read()
out = {"argv": sys.argv[1:], "env": sorted(os.environ), "cwd": os.getcwd(),
       "key_starts": blob[:27].decode(), "key_len": len(blob)}
with open(os.path.join(app, "Contents", "Resources", "spy.json"), "w") as f:
    json.dump(out, f)
"""


def test_key_via_pipe_and_minimal_env(dep: Deployment, app_tgz: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("SEALBOX_SECRET_PROBE", "must-not-leak")
    signer = with_options(dep, signer_command=[sys.executable, "-I", "-c", SPY, "--key={key}"])
    out = sign(signer, app_tgz, tmp_path / "w")
    tree = unpack(out, tmp_path / "x")
    spy = json.loads((tree / "Hello.app/Contents/Resources/spy.json").read_text())
    assert spy["key_starts"] == "-----BEGIN PRIVATE KEY-----"
    assert spy["argv"][0].startswith("--key=/dev/fd/")
    assert spy["argv"][-1] == str((tmp_path / "w/scratch/dmg-unpacked/Hello.app").resolve())
    assert Path(spy["cwd"]) == (tmp_path / "w/scratch/dmg-unpacked").resolve()
    assert set(spy["env"]) <= {"PATH", "LANG", "HOME", "LC_CTYPE"}
    assert not list((tmp_path / "w").rglob("*.pem")), "the key must never be written to disk"


def test_untrusted_tarball_cannot_hijack_stand_in_imports(dep: Deployment, tmp_path: Path) -> None:
    tree = unpack(write_app_tarball(tmp_path / "a"), tmp_path / "src")
    marker = tmp_path / "HIJACKED"
    (tree / "sealbox").mkdir()
    (tree / "sealbox/__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    src = retar(tree, tmp_path / "evil.tar.gz")
    out = sign(dep.signer, src, tmp_path / "w")
    assert not marker.exists()
    MacAppSigner.verify("dmg", out, src, dep.public)


# -- signer command failures ------------------------------------------------------------------------
def test_signer_timeout_kills_child(dep: Deployment, app_tgz: Path, tmp_path: Path) -> None:
    signer = with_options(dep, key=None, signer_command=[sys.executable, "-c", "import time; time.sleep(60)"],
                          timeout=1)  # fmt: skip
    t0 = time.monotonic()
    with pytest.raises(SigningFailed, match=r"timed out after 1 s on Hello\.app"):
        sign(signer, app_tgz, tmp_path / "w")
    assert time.monotonic() - t0 < 10
    assert not (tmp_path / "w/out.tar.gz").exists()


@pytest.mark.parametrize(("status", "error"), [(65, FormatRejected), (1, SigningFailed)])
def test_signer_exit_status(dep: Deployment, app_tgz: Path, tmp_path: Path, status: int,
                            error: type[Exception]) -> None:  # fmt: skip
    script = f"import sys; print('no identity found', file=sys.stderr); sys.exit({status})"
    signer = with_options(dep, key=None, signer_command=[sys.executable, "-c", script])
    with pytest.raises(error, match=r"Hello\.app.*no identity found"):
        sign(signer, app_tgz, tmp_path / "w")
    assert not (tmp_path / "w/out.tar.gz").exists()


def test_stand_in_refuses_bundle_without_info_plist(dep: Deployment, tmp_path: Path) -> None:
    tree = unpack(write_app_tarball(tmp_path / "a"), tmp_path / "src")
    (tree / "Hello.app/Contents/Info.plist").unlink()
    with pytest.raises(FormatRejected, match=r"Info\.plist"):
        sign(dep.signer, retar(tree, tmp_path / "noplist.tar.gz"), tmp_path / "w")


# -- bad inputs -------------------------------------------------------------------------------------
def _tgz(path: Path, members: list[tuple[str, bytes, str]]) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            elif kind == "dev":
                info.type = tarfile.CHRTYPE
                tf.addfile(info)
            elif kind.startswith("link:"):
                info.type = tarfile.SYMTYPE
                info.linkname = kind[5:]
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    path.write_bytes(gzip.compress(buf.getvalue()))
    return path


PLIST = plistlib.dumps({"CFBundleIdentifier": "x.y"})
BAD_INPUTS: dict[str, tuple[list[tuple[str, bytes, str]] | bytes, str]] = {
    "random": (os.urandom(4096), "not a tarball"),
    "gzip-of-text": (gzip.compress(b"just text\n" * 200), "not a valid tarball"),
    "traversal": ([("A.app/Contents/Info.plist", PLIST, "f"), ("../evil", b"x", "f")], r"'\.\.'"),
    "absolute": ([("A.app/Contents/Info.plist", PLIST, "f"), ("/tmp/evil", b"x", "f")], "absolute"),
    "symlink-out": (
        [("A.app/Contents/Info.plist", PLIST, "f"), ("A.app/pw", b"", "link:/etc/passwd")],
        "absolute path",
    ),
    "symlink-up": ([("A.app/Contents/Info.plist", PLIST, "f"), ("A.app/up", b"", "link:../../x")], "outside"),
    "device": ([("A.app/Contents/Info.plist", PLIST, "f"), ("A.app/null", b"", "dev")], "device"),
    "no-app": ([("readme.txt", b"hello", "f"), ("Foo/Contents/Info.plist", PLIST, "f")], "no .app bundle"),
    "app-is-file": ([("A.app", b"not a folder", "f")], "no .app bundle"),
    "no-contents": ([("A.app/Info.plist", PLIST, "f")], "A.app has no Contents folder"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_inputs_rejected(dep: Deployment, tmp_path: Path, case: str) -> None:
    spec, reason = BAD_INPUTS[case]
    src = tmp_path / "in.tar.gz"
    if isinstance(spec, bytes):
        src.write_bytes(spec)
    else:
        _tgz(src, spec)
    with pytest.raises(FormatRejected, match=reason):
        sign(dep.signer, src, tmp_path / "w")
    assert not (tmp_path / "w/out.tar.gz").exists()
    assert not Path("/tmp/evil").exists()


def test_bz2_tarball_rejected(dep: Deployment, app_tgz: Path, tmp_path: Path) -> None:
    tree = unpack(app_tgz, tmp_path / "src")
    src = tmp_path / "in.tar.bz2"
    repack_tar(tree, src, "bz2")
    with pytest.raises(FormatRejected, match=r"tar\.gz.*tar\.bz2"):
        sign(dep.signer, src, tmp_path / "w")


def test_unpacked_size_bound(dep: Deployment, tmp_path: Path) -> None:
    tree = unpack(write_app_tarball(tmp_path / "a"), tmp_path / "src")
    (tree / "Hello.app/Contents/Resources/zeros").write_bytes(bytes(4 * 1024 * 1024))
    src = retar(tree, tmp_path / "big.tar.gz")
    signer = with_options(dep, max_unpacked_size=1024 * 1024)
    with pytest.raises(FormatRejected, match="more than 1048576 bytes"):
        sign(signer, src, tmp_path / "w")
    safe_extract_tar(src, tmp_path / "fine", allow_symlinks=True)  # the input itself is valid
