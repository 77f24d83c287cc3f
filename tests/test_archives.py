"""sealbox.archives: malicious tarballs and zips are refused, nothing lands outside the folder,
sizes are counted on real bytes, and re-packing is deterministic and root-owned."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import stat
import subprocess
import tarfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from sealbox.archives import (
    Compression,
    detect_tar_compression,
    is_zip,
    repack_tar,
    repack_zip,
    safe_extract_tar,
    safe_extract_zip,
)
from sealbox.errors import FormatRejected

MiB = 1024 * 1024


# -- builders ----------------------------------------------------------------------------
def _file(name: str, data: bytes = b"data\n", mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    return info, data


def _entry(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    return info, None


def make_tar(path: Path, members: Sequence[tuple[tarfile.TarInfo, bytes | None]], comp: str = "gz") -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    raw = buf.getvalue()
    compressors: dict[str, Callable[[bytes], bytes]] = {
        "gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress, "": bytes
    }  # fmt: skip
    packed = compressors[comp](raw)
    path.write_bytes(packed)
    return path


def outside_is_clean(tmp_path: Path) -> None:
    """Nothing but the archive and the extraction folder may exist in tmp_path."""
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name not in ("in", "dest"))
    assert leftovers == []


@pytest.fixture
def arc(tmp_path: Path) -> Path:
    return tmp_path / "in"


# -- tar: good inputs ----------------------------------------------------------------------
@pytest.mark.parametrize("comp", ["gz", "bz2", "xz", ""])
def test_tar_each_compression_extracts(tmp_path: Path, arc: Path, comp: str) -> None:
    make_tar(
        arc, [_entry("./", tarfile.DIRTYPE), _file("./a/b.txt", b"hello"), _file("c", b"x", 0o4755)], comp
    )
    assert detect_tar_compression(arc) == comp
    names = safe_extract_tar(arc, tmp_path / "dest")
    assert names == ["a/b.txt", "c"]
    assert (tmp_path / "dest/a/b.txt").read_bytes() == b"hello"
    # set-id bits dropped, executable bit kept
    assert stat.S_IMODE((tmp_path / "dest/c").stat().st_mode) == 0o755


def test_tar_compression_filter(tmp_path: Path, arc: Path) -> None:
    make_tar(arc, [_file("a")], "bz2")
    with pytest.raises(FormatRejected, match=r"tar\.gz.*it is a tar\.bz2"):
        safe_extract_tar(arc, tmp_path / "dest", compressions=("gz",))


def test_tar_inside_symlinks_allowed_on_request(tmp_path: Path, arc: Path) -> None:
    members = [
        _file("F.framework/Versions/A/Lib", b"lib"),
        _entry("F.framework/Versions/Current", tarfile.SYMTYPE, "A"),
        _entry("F.framework/Lib", tarfile.SYMTYPE, "Versions/Current/Lib"),
        _entry("F.framework/Versions/A/up", tarfile.SYMTYPE, "../../Lib"),
    ]
    make_tar(arc, members)
    with pytest.raises(FormatRejected, match="symbolic link"):
        safe_extract_tar(arc, tmp_path / "d1")
    safe_extract_tar(arc, tmp_path / "dest", allow_symlinks=True)
    assert (tmp_path / "dest/F.framework/Lib").read_bytes() == b"lib"
    assert os.readlink(tmp_path / "dest/F.framework/Versions/Current") == "A"


# -- tar: malicious inputs -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("../x", r"'\.\.'"),
        ("a/../../x", r"'\.\.'"),
        ("/etc/x", "absolute"),
    ],
)
def test_tar_traversal_names(tmp_path: Path, arc: Path, name: str, reason: str) -> None:
    make_tar(arc, [_file("ok.txt"), _file(name)])
    with pytest.raises(FormatRejected, match=reason) as e:
        safe_extract_tar(arc, tmp_path / "dest", allow_symlinks=True)
    assert name in str(e.value)
    outside_is_clean(tmp_path)


def test_tar_absolute_name_into_real_folder(tmp_path: Path, arc: Path) -> None:
    target = tmp_path / "outside" / "x"
    make_tar(arc, [_file(str(target))])
    with pytest.raises(FormatRejected, match="absolute"):
        safe_extract_tar(arc, tmp_path / "dest")
    assert not target.exists()


@pytest.mark.parametrize(
    ("link", "target", "reason"),
    [
        ("passwd", "/etc/passwd", "absolute path"),
        ("a/up", "../../x", "points outside"),
        ("a/sneaky", "b/../../..", "after a name"),
        ("dot", ".", None),  # harmless by itself; used below
    ],
)
def test_tar_symlink_targets(tmp_path: Path, arc: Path, link: str, target: str, reason: str | None) -> None:
    make_tar(arc, [_file("a/file"), _entry(link, tarfile.SYMTYPE, target)])
    with pytest.raises(FormatRejected, match="symbolic link"):
        safe_extract_tar(arc, tmp_path / "strict")  # links refused by default
    if reason is None:
        safe_extract_tar(arc, tmp_path / "dest", allow_symlinks=True)
        return
    with pytest.raises(FormatRejected, match=reason) as e:
        safe_extract_tar(arc, tmp_path / "dest", allow_symlinks=True)
    assert link in str(e.value)


def test_tar_write_through_symlink_refused(tmp_path: Path, arc: Path) -> None:
    # "d" -> "sub" is inside, but a later member must not be written through it
    make_tar(arc, [_entry("sub", tarfile.DIRTYPE), _entry("d", tarfile.SYMTYPE, "sub"), _file("d/x")])
    with pytest.raises(FormatRejected, match="lies under a symbolic link"):
        safe_extract_tar(arc, tmp_path / "dest", allow_symlinks=True)
    assert not (tmp_path / "dest/sub/x").exists()


def test_tar_symlink_then_same_name_file_refused(tmp_path: Path, arc: Path) -> None:
    outside = tmp_path / "victim"
    make_tar(arc, [_entry("l", tarfile.SYMTYPE, "x"), _file("l", b"overwrite")])
    with pytest.raises(FormatRejected, match="appears twice"):
        safe_extract_tar(arc, tmp_path / "dest", allow_symlinks=True)
    assert not outside.exists()


def test_tar_hardlink_refused(tmp_path: Path, arc: Path) -> None:
    make_tar(arc, [_file("a"), _entry("b", tarfile.LNKTYPE, "a")])
    with pytest.raises(FormatRejected, match="'b' is a hard link"):
        safe_extract_tar(arc, tmp_path / "dest", allow_symlinks=True)


def test_tar_hardlink_to_outside_refused(tmp_path: Path, arc: Path) -> None:
    make_tar(arc, [_entry("pw", tarfile.LNKTYPE, "/etc/passwd")])
    with pytest.raises(FormatRejected, match="hard link"):
        safe_extract_tar(arc, tmp_path / "dest", allow_symlinks=True)


@pytest.mark.parametrize("kind", [tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE])
def test_tar_device_and_fifo_refused(tmp_path: Path, arc: Path, kind: bytes) -> None:
    info, _ = _entry("dev/null", kind)
    info.devmajor, info.devminor = 1, 3
    make_tar(arc, [(info, None)])
    with pytest.raises(FormatRejected, match="'dev/null' is a device or fifo"):
        safe_extract_tar(arc, tmp_path / "dest", allow_symlinks=True)
    assert not (tmp_path / "dest/dev/null").exists()


def test_tar_gz_bomb(tmp_path: Path, arc: Path) -> None:
    # 64 MiB of zeros compresses to ~64 KiB; the bound is counted on decompressed bytes
    big = tarfile.TarInfo("zeros")
    big.size = 64 * MiB
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        tf.addfile(big, io.BytesIO(bytes(64 * MiB)))
    arc.write_bytes(gzip.compress(buf.getvalue(), 9))
    assert arc.stat().st_size < MiB
    with pytest.raises(FormatRejected, match=r"more than 8388608 bytes \(at member 'zeros'\)"):
        safe_extract_tar(arc, tmp_path / "dest", max_total=8 * MiB)
    written = tmp_path / "dest/zeros"
    assert written.stat().st_size <= 9 * MiB  # stopped near the bound


def test_tar_lying_header_sizes_counted_on_real_bytes(tmp_path: Path, arc: Path) -> None:
    # many members each under the bound: the total is what counts
    members = [_file(f"f{i}", bytes(MiB)) for i in range(5)]
    make_tar(arc, members)
    with pytest.raises(FormatRejected, match="more than"):
        safe_extract_tar(arc, tmp_path / "dest", max_total=3 * MiB)


def test_tar_huge_pax_header_bounded(tmp_path: Path, arc: Path) -> None:
    info, data = _file("a")
    info.pax_headers = {"comment": "x" * (16 * MiB)}
    make_tar(arc, [(info, data)])
    with pytest.raises(FormatRejected, match="unpacks to more than"):
        safe_extract_tar(arc, tmp_path / "dest", max_total=MiB, max_members=10)


def test_tar_too_many_members(tmp_path: Path, arc: Path) -> None:
    make_tar(arc, [_file(f"f{i}") for i in range(30)])
    with pytest.raises(FormatRejected, match="more than 20 members"):
        safe_extract_tar(arc, tmp_path / "dest", max_members=20)
    safe_extract_tar(arc, tmp_path / "ok", max_members=30)


@pytest.mark.parametrize(
    "data",
    [b"", b"not a tarball at all" * 40, gzip.compress(b"plain text, not tar" * 100), os.urandom(4096)],
    ids=["empty", "text", "gzip-of-text", "random"],
)
def test_tar_not_a_tarball(tmp_path: Path, arc: Path, data: bytes) -> None:
    arc.write_bytes(data)
    with pytest.raises(FormatRejected):
        safe_extract_tar(arc, tmp_path / "dest")


def test_tar_truncated(tmp_path: Path, arc: Path) -> None:
    make_tar(arc, [_file("a", os.urandom(200_000))])
    arc.write_bytes(arc.read_bytes()[:5000])
    with pytest.raises(FormatRejected, match="not a valid tarball"):
        safe_extract_tar(arc, tmp_path / "dest")


def test_tar_corrupt_bz2_and_xz(tmp_path: Path, arc: Path) -> None:
    for comp in ("bz2", "xz"):
        make_tar(arc, [_file("a", os.urandom(50_000))], comp)
        data = bytearray(arc.read_bytes())
        data[200:260] = bytes(60)
        arc.write_bytes(bytes(data))
        with pytest.raises(FormatRejected, match="not a valid tarball"):
            safe_extract_tar(arc, tmp_path / f"dest-{comp}")


# -- repack ---------------------------------------------------------------------------------
def test_repack_tar_sorted_root_owned_deterministic(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "b.app/Contents").mkdir(parents=True)
    (src / "b.app/Contents/exe").write_bytes(b"#!/bin/sh\n")
    (src / "b.app/Contents/exe").chmod(0o755)
    (src / "a.txt").write_text("a")
    (src / "a-b").write_text("x")
    os.symlink("Contents/exe", src / "b.app/link")
    one, two = tmp_path / "one.tar.gz", tmp_path / "two.tar.gz"
    repack_tar(src, one, "gz")
    repack_tar(src, two, "gz")
    assert one.read_bytes() == two.read_bytes()
    with tarfile.open(one) as tf:
        members = tf.getmembers()
    assert [m.name for m in members] == [
        "a-b",
        "a.txt",
        "b.app",
        "b.app/Contents",
        "b.app/Contents/exe",
        "b.app/link",
    ]
    assert {(m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, "root", "root")}
    listing = subprocess.run(["tar", "-tvzf", str(one)], capture_output=True, text=True, check=True).stdout
    assert all(" root/root " in line for line in listing.splitlines())
    assert "b.app/link -> Contents/exe" in listing
    # round trip through the safe extractor
    safe_extract_tar(one, tmp_path / "back", allow_symlinks=True)
    assert (tmp_path / "back/b.app/Contents/exe").read_bytes() == b"#!/bin/sh\n"
    assert os.access(tmp_path / "back/b.app/Contents/exe", os.X_OK)
    comps: tuple[Compression, ...] = ("bz2", "xz", "")
    for comp in comps:
        out = tmp_path / f"x.{comp or 'tar'}"
        repack_tar(src, out, comp)
        assert detect_tar_compression(out) == comp
        subprocess.run(["tar", "-tf", str(out)], capture_output=True, check=True)


# -- zip ------------------------------------------------------------------------------------
def make_zip(path: Path, entries: list[tuple[str | zipfile.ZipInfo, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return path


def _unix(name: str, mode: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = mode << 16
    return info


def test_zip_good(tmp_path: Path, arc: Path) -> None:
    make_zip(arc, [("dir/", b""), ("dir/a.txt", b"a"), (_unix("run.sh", stat.S_IFREG | 0o755), b"#!")])
    assert is_zip(arc)
    assert safe_extract_zip(arc, tmp_path / "dest") == ["dir", "dir/a.txt", "run.sh"]
    assert os.access(tmp_path / "dest/run.sh", os.X_OK)


@pytest.mark.parametrize(
    ("name", "reason"),
    [("../x", r"'\.\.'"), ("a/../../x", r"'\.\.'"), ("/etc/x", "absolute"), ("a\\..\\x", "backslash")],
)
def test_zip_traversal(tmp_path: Path, arc: Path, name: str, reason: str) -> None:
    make_zip(arc, [("ok", b"1"), (name, b"2")])
    with pytest.raises(FormatRejected, match=reason):
        safe_extract_zip(arc, tmp_path / "dest")
    outside_is_clean(tmp_path)


def test_zip_symlink(tmp_path: Path, arc: Path) -> None:
    make_zip(arc, [(_unix("pw", stat.S_IFLNK | 0o777), b"/etc/passwd")])
    with pytest.raises(FormatRejected, match="'pw' is a symbolic link"):
        safe_extract_zip(arc, tmp_path / "dest")
    with pytest.raises(FormatRejected, match="absolute path"):
        safe_extract_zip(arc, tmp_path / "dest2", allow_symlinks=True)


def test_zip_device(tmp_path: Path, arc: Path) -> None:
    make_zip(arc, [(_unix("dev", stat.S_IFCHR | 0o644), b"")])
    with pytest.raises(FormatRejected, match="device"):
        safe_extract_zip(arc, tmp_path / "dest")


def test_zip_bomb(tmp_path: Path, arc: Path) -> None:
    make_zip(arc, [("zeros", bytes(64 * MiB))])
    assert arc.stat().st_size < MiB
    with pytest.raises(FormatRejected, match=r"more than 8388608 bytes \(at member 'zeros'\)"):
        safe_extract_zip(arc, tmp_path / "dest", max_total=8 * MiB)


def test_zip_too_many_members(tmp_path: Path, arc: Path) -> None:
    make_zip(arc, [(f"f{i}", b"") for i in range(30)])
    with pytest.raises(FormatRejected, match=r"more than 20 members \(30\)"):
        safe_extract_zip(arc, tmp_path / "dest", max_members=20)


def test_zip_duplicate(tmp_path: Path, arc: Path) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_zip(arc, [("a", b"1"), ("a", b"2")])
    with pytest.raises(FormatRejected, match="appears twice"):
        safe_extract_zip(arc, tmp_path / "dest")


def test_zip_not_a_zip(tmp_path: Path, arc: Path) -> None:
    arc.write_bytes(os.urandom(1000))
    with pytest.raises(FormatRejected, match="not a zip"):
        safe_extract_zip(arc, tmp_path / "dest")
    make_zip(arc, [("a", os.urandom(10_000))])
    arc.write_bytes(arc.read_bytes()[:3000])
    with pytest.raises(FormatRejected, match="not a valid zip"):
        safe_extract_zip(arc, tmp_path / "dest2")


def test_repack_zip_round_trip(tmp_path: Path, arc: Path) -> None:
    make_zip(arc, [("b/x.dll", b"MZ" + os.urandom(100)), ("a.txt", b"a"), ("b/", b"")])
    names = safe_extract_zip(arc, tmp_path / "dest")
    out = tmp_path / "out.zip"
    repack_zip(tmp_path / "dest", out, names)
    with zipfile.ZipFile(out) as zf:
        assert zf.testzip() is None
        assert [i.filename for i in zf.infolist()] == ["b/x.dll", "a.txt", "b/"]
        assert all(i.compress_type == zipfile.ZIP_DEFLATED for i in zf.infolist() if not i.is_dir())
    subprocess.run(["unzip", "-tq", str(out)], check=True, capture_output=True)


def test_tar_decompression_bomb_is_refused_by_ratio(tmp_path: Path) -> None:
    import gzip
    import io

    zeros = 80 * 1024 * 1024
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tf:
        info = tarfile.TarInfo("zeros.bin")
        info.size = zeros
        tf.addfile(info, io.BytesIO(bytes(zeros)))
    bomb = tmp_path / "bomb.tar.gz"
    bomb.write_bytes(gzip.compress(raw.getvalue(), 9))
    assert bomb.stat().st_size < 200_000
    with pytest.raises(FormatRejected, match="decompression bomb"):
        safe_extract_tar(bomb, tmp_path / "out")


def test_a_zip64_locator_past_any_offset_is_a_refusal(tmp_path: Path) -> None:
    """A ZIP64 locator naming an end record at 2**64 - 16 (found by fuzzing): refused, not a
    ValueError from seek."""
    import struct

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("a.txt", "hello")
    raw = buf.getvalue()
    eocd = raw.rfind(b"PK\x05\x06")
    tail = bytearray(raw[eocd:])
    struct.pack_into("<H", tail, 10, 0xFFFF)
    locator = b"PK\x06\x07" + struct.pack("<IQI", 0, 0xFFFFFFFFFFFFFFF0, 1)
    path = tmp_path / "odd.zip"
    path.write_bytes(raw[:eocd] + locator + bytes(tail))
    with pytest.raises(FormatRejected):
        safe_extract_zip(path, tmp_path / "out")
