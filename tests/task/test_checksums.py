"""SHA256SUMS / SHA512SUMS: coreutils accepts what we write (`sha256sum -c --strict`), our
lines equal sha256sum's own output, and a modified file fails both checkers."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from sealbox.errors import VerificationFailed
from sealbox.task.checksums import parse_checksums, verify_checksums, write_checksums

NAMES = [
    "a.txt",
    "with space.bin",
    "sub/dir/c.dat",
    "back\\slash.txt",
    "new\nline.txt",
    "cr\rname",
    "Ünïcode.txt",
]


@pytest.fixture
def tree(tmp_path: Path) -> list[Path]:
    base = tmp_path / "release"
    files = []
    for i, name in enumerate(NAMES):
        p = base / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(os.urandom(1000 + i) + name.encode())
        files.append(p)
    big = base / "big.bin"
    big.write_bytes(os.urandom(3 * 1024 * 1024 + 7))  # more than one read chunk
    files.append(big)
    return files


def coreutils_check(tool: str, base: Path, sums: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool, "-c", "--strict", sums], cwd=base, capture_output=True, text=True, check=False
    )


def test_coreutils_accept_both_files(tree: list[Path], tmp_path: Path) -> None:
    base = tmp_path / "release"
    written = write_checksums(tree, base, base)
    assert [p.name for p in written] == ["SHA256SUMS", "SHA512SUMS"]
    for tool, sums in (("sha256sum", "SHA256SUMS"), ("sha512sum", "SHA512SUMS")):
        res = coreutils_check(tool, base, sums)
        assert res.returncode == 0, res.stdout + res.stderr
        assert res.stdout.count(": OK") == len(tree)
    verify_checksums(base / "SHA256SUMS")
    verify_checksums(base / "SHA512SUMS")


def test_lines_equal_coreutils_output(tree: list[Path], tmp_path: Path) -> None:
    base = tmp_path / "release"
    write_checksums(tree, base, base)
    names = sorted(p.relative_to(base).as_posix() for p in tree)
    for tool, sums in (("sha256sum", "SHA256SUMS"), ("sha512sum", "SHA512SUMS")):
        theirs = subprocess.run([tool, "--", *names], cwd=base, capture_output=True, check=True).stdout
        assert (base / sums).read_bytes() == theirs


def test_format_details(tree: list[Path], tmp_path: Path) -> None:
    base = tmp_path / "release"
    out = tmp_path / "sums"
    write_checksums(tree, out, base, algorithms=("sha256",))
    data = (out / "SHA256SUMS").read_bytes()
    assert b"\r\n" not in data and data.endswith(b"\n")
    assert not (out / "SHA512SUMS").exists()
    lines = data.decode().split("\n")[:-1]
    assert len(lines) == len(tree)
    plain = [ln for ln in lines if not ln.startswith("\\")]
    digest = hashlib.sha256((base / "sub/dir/c.dat").read_bytes()).hexdigest()
    assert f"{digest}  sub/dir/c.dat" in plain
    assert any(ln.endswith("  with space.bin") for ln in plain)
    assert any(ln.startswith("\\") and ln.endswith("  new\\nline.txt") for ln in lines)
    assert any(ln.startswith("\\") and ln.endswith("  back\\\\slash.txt") for ln in lines)
    parsed = parse_checksums(out / "SHA256SUMS")
    assert [name for _, _, name in parsed] == sorted(p.relative_to(base).as_posix() for p in tree)
    # sums in another folder verify against the base
    verify_checksums(out / "SHA256SUMS", base)


def test_sums_files_excluded(tree: list[Path], tmp_path: Path) -> None:
    base = tmp_path / "release"
    write_checksums(tree, base, base)
    again = write_checksums([*tree, base / "SHA256SUMS", base / "SHA512SUMS"], base, base)
    for sums in again:
        names = [n for _, _, n in parse_checksums(sums)]
        assert "SHA256SUMS" not in names and "SHA512SUMS" not in names
        assert len(names) == len(tree)


def test_modified_file_fails(tree: list[Path], tmp_path: Path) -> None:
    base = tmp_path / "release"
    write_checksums(tree, base, base)
    target = base / "with space.bin"
    data = bytearray(target.read_bytes())
    data[10] ^= 1
    target.write_bytes(bytes(data))
    for tool, sums in (("sha256sum", "SHA256SUMS"), ("sha512sum", "SHA512SUMS")):
        res = coreutils_check(tool, base, sums)
        assert res.returncode != 0
        assert "with space.bin: FAILED" in res.stdout
        with pytest.raises(VerificationFailed, match=r"with space\.bin"):
            verify_checksums(base / sums)


def test_missing_file_and_bad_lines(tree: list[Path], tmp_path: Path) -> None:
    base = tmp_path / "release"
    write_checksums(tree, base, base)
    (base / "a.txt").unlink()
    with pytest.raises(VerificationFailed, match=r"a\.txt"):
        verify_checksums(base / "SHA256SUMS")
    bad = tmp_path / "BAD"
    for text, reason in [
        ("", "lists no files"),
        ("zz  a.txt\n", "not a"),
        ("0123  a.txt\n", "not a"),
        (f"{'0' * 64}  ../etc/passwd\n", "refusing"),
        (f"{'0' * 64}  /etc/passwd\n", "refusing"),
        (f"\\{'0' * 64}  bad\\qescape\n", "bad escape"),
    ]:
        bad.write_text(text)
        with pytest.raises(VerificationFailed, match=reason):
            verify_checksums(bad)


def test_write_refusals(tree: list[Path], tmp_path: Path) -> None:
    base = tmp_path / "release"
    outside = tmp_path / "outside.txt"
    outside.write_text("x")
    with pytest.raises(ValueError, match="not inside"):
        write_checksums([outside], base, base)
    with pytest.raises(ValueError, match="unsupported"):
        write_checksums(tree, base, base, algorithms=("md5",))
    with pytest.raises(ValueError, match="no files"):
        write_checksums([], base, base)
    with pytest.raises(ValueError, match="not a regular file"):
        write_checksums([base / "sub"], base, base)
    assert not (base / "SHA256SUMS").exists()


def test_sums_signed_with_gpg_format(tree: list[Path], tmp_path: Path) -> None:
    """The documented flow: SHA256SUMS is an ordinary gpg input; gpg --verify accepts the .asc."""
    from sealbox.deploy.dev import init_dev
    from sealbox.formats import SignRequest, signer_class
    from sealbox.keys import PassphraseSource, load_key
    from sealbox.server.config import load_config

    base = tmp_path / "release"
    sums = write_checksums(tree, base, base)[0]
    root = tmp_path / "dep"
    cfg = load_config(init_dev(root, "dep", formats=["gpg"]))
    passphrases = PassphraseSource.from_file(root / "passphrases")
    cls = signer_class("gpg")
    signer = cls(cfg.format_settings("gpg"), lambda n: load_key(cfg.key_spec(n), passphrases.get(n)))
    asc = base / "SHA256SUMS.asc"
    work = tmp_path / "work"
    work.mkdir()
    signer.sign(SignRequest(input=sums, output=asc, filename=sums.name, work_dir=work))
    cls.verify("gpg", asc, sums, root / "public")
    sums.write_bytes(sums.read_bytes().replace(b"a.txt", b"b.txt"))
    with pytest.raises(VerificationFailed):
        cls.verify("gpg", asc, sums, root / "public")
