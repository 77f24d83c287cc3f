"""macOS app inputs for the ``dmg`` format, and the STAND-IN code signer used off macOS.

:func:`write_app_tarball` writes what a client sends for ``dmg``/``macapp``: a tar.gz whose
top level holds an ``.app`` bundle (``Info.plist`` made with :mod:`plistlib`, an executable
under ``Contents/MacOS``, a resource, and a framework with the usual version symlinks).

The **stand-in** is *not* Apple code signing. Real signing needs Apple's ``codesign`` on a
macOS host. The stand-in lets the ``dmg`` plumbing (unpack, one signer call per bundle,
key handed over a pipe, re-pack, verify) run and be tested anywhere:

``python -m sealbox.samples.macos stand-in-codesign --key KEYFILE APP``
    writes ``APP/Contents/_CodeSignature/CodeResources``: a plist holding a manifest of
    every file and symlink of the bundle (SHA-256) and an RSA PKCS#1 v1.5 SHA-256
    signature over the manifest bytes, made with the PEM private key read from KEYFILE
    (sealbox passes ``/dev/fd/N``). Exit status 65 means the bundle is unusable.

``python -m sealbox.samples.macos verify-stand-in --public-key PEM APP...``
    checks the signature and that the bundle's files match the manifest exactly.

The signature and manifest can also be checked with openssl alone (see docs/formats/macos.md).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import plistlib
import re
import stat
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

__all__ = [
    "STAND_IN_FORMAT",
    "StandInError",
    "main",
    "stand_in_sign",
    "stand_in_verify",
    "write_app_tarball",
]

#: the ``format`` value of every stand-in manifest
STAND_IN_FORMAT = "sealbox-stand-in-codesign/1"
STAND_IN_NOTICE = (
    "STAND-IN signature made by sealbox.samples.macos to test the dmg plumbing off macOS. "
    "This is NOT Apple code signing; macOS will not accept it."
)
SIGNATURE_PATH = "Contents/_CodeSignature/CodeResources"
EX_DATAERR = 65

_INFO_PLIST: dict[str, Any] = {
    "CFBundleDevelopmentRegion": "en",
    "CFBundleExecutable": "",
    "CFBundleIdentifier": "",
    "CFBundleInfoDictionaryVersion": "6.0",
    "CFBundleName": "",
    "CFBundlePackageType": "APPL",
    "CFBundleShortVersionString": "1.0",
    "CFBundleVersion": "1",
    "LSMinimumSystemVersion": "10.15",
    "NSHighResolutionCapable": True,
}


class StandInError(Exception):
    """The bundle cannot be stand-in signed, or its stand-in signature does not verify."""


# -- sample input ----------------------------------------------------------------------


def _app_tree(root: Path, app_name: str) -> Path:
    app = root / f"{app_name}.app"
    contents = app / "Contents"
    (contents / "MacOS").mkdir(parents=True)
    (contents / "Resources").mkdir()
    info = dict(_INFO_PLIST)
    info.update(
        CFBundleExecutable=app_name,
        CFBundleIdentifier=f"org.example.sealbox.{app_name.lower()}",
        CFBundleName=app_name,
    )
    (contents / "Info.plist").write_bytes(plistlib.dumps(info, fmt=plistlib.FMT_XML))
    (contents / "PkgInfo").write_bytes(b"APPL????")
    exe = contents / "MacOS" / app_name
    exe.write_text(f'#!/bin/sh\necho "hello from {app_name}"\n', encoding="utf-8")
    exe.chmod(0o755)
    (contents / "Resources" / "readme.txt").write_text(
        f"{app_name}: a sample application bundle made by sealbox for signing tests.\n", encoding="utf-8"
    )
    # A framework with the usual version symlinks (real bundles have them).
    fw = contents / "Frameworks" / "Helper.framework"
    (fw / "Versions" / "A" / "Resources").mkdir(parents=True)
    lib = fw / "Versions" / "A" / "Helper"
    lib.write_bytes(b"\xcf\xfa\xed\xfe" + bytes(range(256)) * 16)
    lib.chmod(0o755)
    (fw / "Versions" / "A" / "Resources" / "Info.plist").write_bytes(
        plistlib.dumps({"CFBundleIdentifier": "org.example.sealbox.helper", "CFBundlePackageType": "FMWK"})
    )
    os.symlink("A", fw / "Versions" / "Current")
    os.symlink("Versions/Current/Helper", fw / "Helper")
    os.symlink("Versions/Current/Resources", fw / "Resources")
    return app


def write_app_tarball(directory: Path, name: str = "App.tar.gz", app_name: str = "Hello") -> Path:
    """Write an unsigned ``<app_name>.app`` bundle packed as ``directory/name`` (tar.gz) the
    way the classic client does (``tar czf NAME .``: members start with ``./``)."""
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / name
    with tempfile.TemporaryDirectory(dir=directory, prefix=".app-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)
        _app_tree(root, app_name)
        paths = sorted(root.rglob("*"), key=lambda p: p.relative_to(root).parts)
        with tarfile.open(out, "x:gz") as tf:
            tf.add(root, arcname=".", recursive=False)
            for p in paths:
                tf.add(p, arcname="./" + p.relative_to(root).as_posix(), recursive=False)
    return out


# -- the stand-in signer -----------------------------------------------------------------


def _bundle_entries(app: Path) -> dict[str, dict[str, str]]:
    """Manifest entries for every file and symlink of the bundle except its signature folder."""
    entries: dict[str, dict[str, str]] = {}
    stack = [app]
    while stack:
        d = stack.pop()
        for entry in os.scandir(d):
            p = Path(entry.path)
            rel = p.relative_to(app).as_posix()
            if rel == "Contents/_CodeSignature":
                continue
            st = os.lstat(p)
            if stat.S_ISDIR(st.st_mode):
                stack.append(p)
            elif stat.S_ISLNK(st.st_mode):
                entries[rel] = {"symlink": os.readlink(p)}
            elif stat.S_ISREG(st.st_mode):
                with p.open("rb") as f:
                    digest = hashlib.file_digest(f, "sha256").hexdigest()
                entries[rel] = {"sha256": digest, "mode": oct(stat.S_IMODE(st.st_mode) & 0o777)}
            else:
                raise StandInError(f"{rel}: not a file, folder or symbolic link")
    return dict(sorted(entries.items()))


def _load_private_key(pem: bytes) -> rsa.RSAPrivateKey:
    m = re.search(
        rb"-----BEGIN (?:RSA |ENCRYPTED )?PRIVATE KEY-----.+?-----END [A-Z ]*PRIVATE KEY-----", pem, re.S
    )
    if m is None:
        raise StandInError("the key file holds no PEM private key")
    key = serialization.load_pem_private_key(m.group(0), None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise StandInError("the stand-in signer needs an RSA key")
    return key


def stand_in_sign(app: Path, key_pem: bytes) -> Path:
    """STAND-IN signing of one ``.app`` folder; returns the CodeResources path written."""
    if not app.is_dir() or app.is_symlink() or app.suffix != ".app":
        raise StandInError(f"{app.name}: not an .app folder")
    info_path = app / "Contents" / "Info.plist"
    try:
        info = plistlib.loads(info_path.read_bytes())
    except Exception as e:  # plistlib raises expat, value and type errors on bad input
        raise StandInError(f"{app.name}: cannot read Contents/Info.plist: {e}") from None
    if not isinstance(info, dict) or not isinstance(info.get("CFBundleIdentifier"), str):
        raise StandInError(f"{app.name}: Info.plist has no CFBundleIdentifier")
    key = _load_private_key(key_pem)
    manifest = {
        "format": STAND_IN_FORMAT,
        "identifier": info["CFBundleIdentifier"],
        "files": _bundle_entries(app),
    }
    manifest_bytes = plistlib.dumps(manifest, fmt=plistlib.FMT_XML, sort_keys=True)
    signature = key.sign(manifest_bytes, padding.PKCS1v15(), hashes.SHA256())
    sig_dir = app / "Contents" / "_CodeSignature"
    sig_dir.mkdir(exist_ok=True)
    out = sig_dir / "CodeResources"
    record = {"sealbox-stand-in": STAND_IN_NOTICE, "manifest": manifest_bytes, "signature": signature}
    out.write_bytes(plistlib.dumps(record, fmt=plistlib.FMT_XML, sort_keys=True))
    return out


def read_stand_in(app: Path) -> tuple[bytes, bytes] | None:
    """(manifest bytes, signature) of a stand-in signed bundle; None if the bundle has a
    CodeResources that is not a stand-in one (e.g. real codesign output)."""
    path = app / SIGNATURE_PATH
    try:
        record = plistlib.loads(path.read_bytes())
    except FileNotFoundError:
        raise StandInError(f"{app.name}: not signed (no {SIGNATURE_PATH})") from None
    except Exception as e:  # plistlib raises expat, value and type errors on bad input
        raise StandInError(f"{app.name}: unreadable {SIGNATURE_PATH}: {e}") from None
    if not isinstance(record, dict) or "sealbox-stand-in" not in record:
        return None
    manifest, signature = record.get("manifest"), record.get("signature")
    if not isinstance(manifest, bytes) or not isinstance(signature, bytes):
        raise StandInError(f"{app.name}: malformed stand-in CodeResources")
    return manifest, signature


def stand_in_verify(app: Path, public_key_pem: bytes) -> None:
    """Verify a STAND-IN signature: the RSA signature over the manifest, then every file
    and symlink of the bundle against it (nothing missing, nothing added)."""
    stored = read_stand_in(app)
    if stored is None:
        raise StandInError(
            f"{app.name}: not a stand-in signature (real codesign output verifies only on macOS)"
        )
    manifest_bytes, signature = stored
    public = serialization.load_pem_public_key(public_key_pem)
    if not isinstance(public, rsa.RSAPublicKey):
        raise StandInError("the stand-in public key must be RSA")
    try:
        public.verify(signature, manifest_bytes, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        raise StandInError(f"{app.name}: stand-in signature does not verify") from None
    manifest = plistlib.loads(manifest_bytes)
    if not isinstance(manifest, dict) or manifest.get("format") != STAND_IN_FORMAT:
        raise StandInError(f"{app.name}: unknown stand-in manifest format")
    expected = manifest.get("files")
    actual = _bundle_entries(app)
    if expected != actual:
        assert isinstance(expected, dict)
        changed = sorted(set(expected) ^ set(actual)) or sorted(k for k in actual if expected[k] != actual[k])
        raise StandInError(f"{app.name}: {changed[0]} differs from the stand-in signature")


# -- command line ------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sealbox.samples.macos",
        description="sealbox macOS samples and the STAND-IN code signer (not Apple code signing)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("stand-in-codesign", help="STAND-IN sign one .app (not Apple code signing)")
    s.add_argument("--key", required=True, help="PEM file with the RSA private key (e.g. /dev/fd/N)")
    s.add_argument("app", type=Path)
    v = sub.add_parser("verify-stand-in", help="verify STAND-IN signatures of .app folders")
    v.add_argument("--public-key", required=True, type=Path, help="PEM public key (public/dmg-standin.pem)")
    v.add_argument("apps", type=Path, nargs="+")
    w = sub.add_parser("write-app-tarball", help="write an unsigned sample .app tarball")
    w.add_argument("directory", type=Path)
    w.add_argument("--name", default="App.tar.gz")
    args = parser.parse_args(argv)
    try:
        if args.command == "stand-in-codesign":
            with open(args.key, "rb") as f:
                key_pem = f.read()
            stand_in_sign(args.app, key_pem)
            print(f"{args.app.name}: STAND-IN signed (not Apple code signing)")
        elif args.command == "verify-stand-in":
            pem = args.public_key.read_bytes()
            for app in args.apps:
                stand_in_verify(app, pem)
                print(f"{app.name}: stand-in signature OK")
        else:
            print(write_app_tarball(args.directory, args.name))
    except StandInError as e:
        print(f"stand-in: {e}", file=sys.stderr)
        return EX_DATAERR
    except (OSError, ValueError) as e:
        print(f"stand-in: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
