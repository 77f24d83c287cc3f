"""Unsigned Linux packages and repository metadata, built at run time: an RPM (``rpmbuild`` from
a tiny spec), a .deb (``dpkg-deb --build``) and an APT ``Release`` file over a one-package
repository."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

_SPEC = """\
Name: {name}
Version: {version}
Release: 1
Summary: sealbox sample package
License: MIT
BuildArch: noarch
%description
A sample package for sealbox's tests.
%install
mkdir -p %{{buildroot}}/usr/share/{name}
printf '%s\\n' '{payload}' > %{{buildroot}}/usr/share/{name}/README
%files
/usr/share/{name}/README
"""


def _run(argv: list[str], cwd: Path) -> None:
    res = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed: {(res.stderr or res.stdout).strip()[-500:]}")


def write_rpm(directory: Path, name: str = "hello", version: str = "1.0", payload: str = "hello") -> Path:
    """``<name>-<version>-1.noarch.rpm`` in ``directory``, built by rpmbuild in a private topdir."""
    top = Path(tempfile.mkdtemp(prefix="sbrpm"))
    try:
        (top / "hello.spec").write_text(_SPEC.format(name=name, version=version, payload=payload))
        _run(
            [
                "rpmbuild",
                "-bb",
                "--define",
                f"_topdir {top}",
                "--define",
                f"_tmppath {top}/tmp",
                str(top / "hello.spec"),
            ],
            top,
        )
        built = next((top / "RPMS" / "noarch").glob("*.rpm"))
        directory.mkdir(parents=True, exist_ok=True)
        out = directory / built.name
        shutil.copyfile(built, out)
        return out
    finally:
        shutil.rmtree(top, ignore_errors=True)


def write_deb(directory: Path, name: str = "hello", version: str = "1.0", payload: str = "hello") -> Path:
    """``<name>_<version>_all.deb`` in ``directory``, built by dpkg-deb."""
    root = Path(tempfile.mkdtemp(prefix="sbdeb"))
    try:
        pkg = root / "pkg"
        (pkg / "DEBIAN").mkdir(parents=True)
        (pkg / "DEBIAN" / "control").write_text(
            f"Package: {name}\nVersion: {version}\nArchitecture: all\n"
            "Maintainer: sealbox <sealbox@example.invalid>\nDescription: sealbox sample package\n"
        )
        (pkg / "usr" / "share" / name).mkdir(parents=True)
        (pkg / "usr" / "share" / name / "README").write_text(payload + "\n")
        directory.mkdir(parents=True, exist_ok=True)
        out = directory / f"{name}_{version}_all.deb"
        _run(["dpkg-deb", "--root-owner-group", "--build", str(pkg), str(out)], root)
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


def release_for(packages: dict[str, bytes], suite: str = "stable") -> str:
    """A ``Release`` file over index files (path under the suite -> content), as
    ``apt-ftparchive release`` writes it."""
    head = (
        f"Origin: sealbox\nLabel: sealbox\nSuite: {suite}\nCodename: {suite}\n"
        "Date: Thu, 01 Jan 2026 00:00:00 UTC\nArchitectures: all\nComponents: main\n"
        "Description: sealbox sample repository\n"
    )
    parts = [head]
    for title, algo in (("MD5Sum", "md5"), ("SHA256", "sha256")):
        parts.append(f"{title}:\n")
        for path, data in sorted(packages.items()):
            parts.append(f" {hashlib.new(algo, data).hexdigest()} {len(data):16d} {path}\n")
    return "".join(parts)


def write_release(directory: Path, name: str = "Release", suite: str = "stable", indexes: int = 1) -> Path:
    """A ``Release`` file for a repository of ``indexes`` one-package indexes."""
    files = {}
    for n in range(indexes):
        files[f"main/binary-arch{n}/Packages"] = (
            f"Package: hello\nVersion: 1.0\nArchitecture: arch{n}\n"
            "Filename: pool/main/h/hello/hello_1.0_all.deb\nSize: 1214\nDescription: sealbox sample\n"
        ).encode()
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / name
    out.write_text(release_for(files, suite))
    return out
