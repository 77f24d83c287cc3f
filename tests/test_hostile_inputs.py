"""Hostile and malformed inputs, through a real server, for every wire format a dev
deployment serves: each is signed (the formats that sign any bytes) or refused for good (a
4xx with a reason saying what is malformed, remembered: asking again is answered at once),
never a retried "signing failed: [Errno ...]", an internal error or a 5xx."""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import os
import random
import ssl
import struct
import tarfile
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from sealbox.archives import safe_extract_tar, safe_extract_zip
from sealbox.errors import FormatRejected
from sealbox.samples import android, mar, pe
from tests.servers import Deployment, ServerProcess, start_server

CAP = 300.0  # bound of a wait for one job
WAIT = "20"  # X-Sealbox-Wait: the POST answers with the job's outcome (get_hold is 20 s)


# -- talking to the server ----------------------------------------------------------------------
@dataclass(frozen=True)
class Outcome:
    status: int
    reason: str  # X-Sealbox-Error
    seconds: float


def outcome(sp: ServerProcess, fmt: str, filename: str, data: bytes) -> Outcome:
    """Upload ``data`` and wait (bounded) until its job is done; what the server answered."""
    sha1 = hashlib.sha1(data, usedforsecurity=False).hexdigest()
    fields = {"sha1": sha1, "filename": filename, "token": sp.token(), "nonce": ""}
    ctx = ssl.create_default_context(cafile=str(sp.deployment.ca))
    started = time.monotonic()
    with httpx.Client(verify=ctx, timeout=CAP) as c:
        r = c.post(
            f"{sp.server.url}/sign/{fmt}",
            data=fields,
            files={"filedata": (filename, data)},
            headers={"X-Sealbox-Wait": WAIT},
        )
        while r.status_code == 202 or r.headers.get("X-Pending"):  # still running: poll
            if time.monotonic() - started > CAP:
                raise AssertionError(f"{fmt}: no outcome after {CAP:g} s")
            r = c.get(f"{sp.server.url}/sign/{fmt}/{sha1}")
    return Outcome(r.status_code, r.headers.get("X-Sealbox-Error", ""), time.monotonic() - started)


# -- hostile archives (also used by tests/server/test_leftovers.py) -------------------------------
def _tgz(members: Iterable[tuple[str, bytes | None]]) -> bytes:
    """A tar.gz of ``(name, data)`` members (``None``: a folder), PAX names of any length."""
    buf = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=1, mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tf,
    ):
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@functools.cache
def deep_tree_tgz(depth: int) -> bytes:
    """A tar.gz of ``depth`` folders, each inside the one before (``d/``, ``d/d/``, ...)."""
    return _tgz(("d/" * i, None) for i in range(1, depth + 1))


@functools.cache
def deep_member_tgz(depth: int) -> bytes:
    """One file ``depth`` folders deep inside an app bundle."""
    return _tgz([("Hello.app/" + "a/" * depth + "f", b"x")])


@functools.cache
def many_members_tgz(count: int) -> bytes:
    return _tgz((f"Hello.app/Contents/f{i}", b"") for i in range(count))


def bogus_directory_offset(zip_bytes: bytes) -> bytes:
    """The zip with its end record's central-directory offset pointing far past the file."""
    b = bytearray(zip_bytes)
    struct.pack_into("<I", b, b.rfind(b"PK\x05\x06") + 16, 0x7FFFFFF0)
    return bytes(b)


def _patched(data: bytes, at: int, value: bytes) -> bytes:
    return data[:at] + value + data[at + len(value) :]


# -- samples per format family --------------------------------------------------------------------
@dataclass(frozen=True)
class Family:
    filename: str
    sample: Callable[[Path], bytes]  # a real, well-formed input
    corrupt: Callable[[bytes], bytes]  # the sample with a header field or offset broken
    signs_anything: bool = False  # detached or opaque signatures: any bytes are signable


def _pe(d: Path) -> bytes:
    return pe.write_pe(d).read_bytes()


def _app_tgz(d: Path) -> bytes:
    plist = b'<?xml version="1.0"?><plist version="1.0"><dict></dict></plist>\n'
    return _tgz([("Hello.app/", None), ("Hello.app/Contents/Info.plist", plist),
                 ("Hello.app/Contents/MacOS/Hello", os.urandom(4096))])  # fmt: skip


def _macho(d: Path) -> bytes:
    from sealbox.samples import macos

    return macos.binary("ninja").read_bytes()


def _rpm(d: Path) -> bytes:
    from sealbox.samples import linuxpkg

    return linuxpkg.write_rpm(d).read_bytes()


def _deb(d: Path) -> bytes:
    from sealbox.samples import linuxpkg

    return linuxpkg.write_deb(d).read_bytes()


def _release(d: Path) -> bytes:
    from sealbox.samples import linuxpkg

    return linuxpkg.write_release(d).read_bytes()


def _payload(d: Path) -> bytes:
    from sealbox.samples import sigstore

    return sigstore.write_payload(d).read_bytes()


BAD_LFANEW = functools.partial(_patched, at=0x3C, value=(0x7FFFFFF0).to_bytes(4, "little"))
FAMILIES: dict[str, Family] = {
    "gpg": Family("input.bin", _pe, BAD_LFANEW, signs_anything=True),
    "emevoucher": Family("voucher.bin", _pe, BAD_LFANEW, signs_anything=True),
    "authenticode": Family("setup.exe", _pe, BAD_LFANEW),
    "widevine": Family("libwidevinecdm.so", _pe, BAD_LFANEW),
    "mar": Family(
        "update.mar",
        lambda d: mar.write_mar(d, size=4096).read_bytes(),
        functools.partial(_patched, at=4, value=(0x7FFFFFF0).to_bytes(4, "big")),  # index offset
    ),
    "jar": Family("lib.jar", lambda d: android.write_jar(d).read_bytes(), bogus_directory_offset),
    "apk": Family("app.apk", lambda d: android.write_apk(d).read_bytes(), bogus_directory_offset),
    "dmg": Family("App.tar.gz", _app_tgz, functools.partial(_patched, at=3, value=b"\xff")),  # gzip flags
    "macho": Family("Hello", _macho, functools.partial(_patched, at=16, value=b"\xff\xff\x00\x00")),  # ncmds
    # the signature header's index count (after the 96-byte lead and the 8-byte header magic)
    "rpm": Family(
        "hello.rpm", _rpm, functools.partial(_patched, at=104, value=(0x7FFFFFF0).to_bytes(4, "big"))
    ),
    # the first ar member's size field
    "deb": Family("hello.deb", _deb, functools.partial(_patched, at=8 + 48, value=b"9999999999")),
    # any UTF-8 deb822 paragraph is a Release to sign; a NUL makes it none
    "apt": Family(
        "Release", _release, functools.partial(_patched, at=10, value=b"\x00"), signs_anything=True
    ),
    "sigstore": Family("payload.json", _payload, functools.partial(_patched, at=0, value=b"[")),
}
FAMILY_OF = {
    "gpg": "gpg",
    "emevoucher": "emevoucher",
    "sha2signcode": "authenticode",
    "sha2signcodestub": "authenticode",
    "sha2signcode-v2": "authenticode",
    "sha2signcodestub-v2": "authenticode",
    "signcode": "authenticode",
    "osslsigncode": "authenticode",
    "widevine": "widevine",
    "widevine_blessed": "widevine",
    "mar": "mar",
    "mar_sha384": "mar",
    "jar": "jar",
    "focus-jar": "jar",
    "apk": "apk",
    "focus-apk": "apk",
    "dmg": "dmg",
    "macho": "macho",
    "rpm": "rpm",
    "deb": "deb",
    "apt-inrelease": "apt",
    "apt-release-gpg": "apt",
    "sigstore": "sigstore",
}


@functools.cache
def _jar_bytes() -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return android.write_jar(Path(tmp)).read_bytes()


@functools.cache
def _app_tgz_bytes() -> bytes:
    return _app_tgz(Path())


#: case -> the bytes, from the family's sample
CASES: dict[str, Callable[[bytes, Family], bytes]] = {
    "empty-ish": lambda s, f: bytes(16),
    "truncated sample": lambda s, f: s[: len(s) // 2],
    "random bytes": lambda s, f: random.Random(7).randbytes(4096),
    "corrupted header": lambda s, f: f.corrupt(s),
    "zip with bogus central directory offset": lambda s, f: bogus_directory_offset(_jar_bytes()),
    "tar.gz with truncated gzip stream": lambda s, f: _app_tgz_bytes()[: len(_app_tgz_bytes()) * 2 // 3],
    "tar member 5,000 folders deep": lambda s, f: deep_member_tgz(5000),
    "tar with 100k tiny members": lambda s, f: many_members_tgz(100_000),
    "tar.gz of a 10,000-deep folder tree": lambda s, f: deep_tree_tgz(10_000),
}
#: what the reason must name, where it is the archive rules that refuse
NAMED = {
    ("dmg", "tar member 5,000 folders deep"): "is nested 5002 levels deep (at most 128)",
    ("dmg", "tar.gz of a 10,000-deep folder tree"): "is nested 129 levels deep (at most 128)",
    ("dmg", "tar with 100k tiny members"): "more than 50000 members",
    ("dmg", "tar.gz with truncated gzip stream"): "not a valid tarball",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    sp = start_server(Deployment.create(tmp_path_factory.mktemp("hostile") / "dep", "dep"))
    yield sp
    assert sp.stop() == 0, sp.log.read_text()


@pytest.fixture(scope="module")
def served(server: ServerProcess) -> set[str]:
    with httpx.Client(verify=ssl.create_default_context(cafile=str(server.deployment.ca))) as c:
        return set(c.get(f"{server.server.url}/__heartbeat__").json()["formats"])


class Samples(dict[str, bytes]):
    """Each family's sample, made when first needed (in its own folder)."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def __missing__(self, name: str) -> bytes:
        (self.root / name).mkdir()
        self[name] = FAMILIES[name].sample(self.root / name)
        return self[name]


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> Samples:
    return Samples(tmp_path_factory.mktemp("samples"))


def test_every_served_format_is_swept(served: set[str]) -> None:
    assert served <= set(FAMILY_OF), "add the new format to this sweep"
    assert {"gpg", "sha2signcode", "mar", "jar", "emevoucher", "widevine"} <= served


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("fmt", list(FAMILY_OF))
def test_malformed_input(
    server: ServerProcess, served: set[str], samples: Samples, fmt: str, case: str
) -> None:
    if fmt not in served:
        pytest.skip(f"{fmt} is not served on this host")
    family = FAMILIES[FAMILY_OF[fmt]]
    data = CASES[case](samples[FAMILY_OF[fmt]], family)
    first = outcome(server, fmt, family.filename, data)
    if first.status == 200 and family.signs_anything:
        return
    assert first.status == 404 and first.reason.startswith("signing failed: "), first
    why = first.reason.removeprefix("signing failed: ")
    assert why.isascii() and why.isprintable() and len(why) < 500, first
    for word in ("Errno", "internal error", "Traceback", "timed out"):
        assert word not in why, first
    if (fmt, case) in NAMED:
        assert NAMED[fmt, case] in why, first
    again = outcome(server, fmt, family.filename, data)
    assert (again.status, again.reason) == (400, first.reason), again  # remembered, not retried


def test_server_still_serves(server: ServerProcess, tmp_path: Path) -> None:
    p = tmp_path / "after.txt"
    p.write_bytes(b"after the sweep " + os.urandom(16))
    with server.client() as c:
        assert c.sign(p, ["gpg"]).ok
    assert not [line for line in server.log_lines() if line.get("level") == "error"], server.log.read_text()


# -- the archive rules themselves -----------------------------------------------------------------
def _zip(members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _member_offset(zip_bytes: bytes, offset: int) -> bytes:
    at = zip_bytes.rfind(b"PK\x01\x02")  # the last central-directory entry
    return _patched(zip_bytes, at + 42, offset.to_bytes(4, "little"))


def _corrupt_bz2_member() -> bytes:
    data = bytearray(_zip({"a": random.Random(1).randbytes(5000)}, zipfile.ZIP_BZIP2))
    data[100] ^= 0xFF
    return bytes(data)


def _pax_times() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, when in (("nan", "nan"), ("far", "1e300"), ("before", "-5")):
            info = tarfile.TarInfo(name)
            info.size, info.pax_headers = 1, {"mtime": when}
            tf.addfile(info, io.BytesIO(b"x"))
    return gzip.compress(buf.getvalue())


@pytest.mark.parametrize(
    "data, reason",
    [
        (bogus_directory_offset(_zip({"a": b"x" * 100})), "central directory (offset 2147483632"),
        (_member_offset(_zip({"a": b"x", "b": b"y"}), 1 << 31), "member 'b' starts at offset 2147483648"),
        (_corrupt_bz2_member(), "not a valid zip: Invalid data stream"),
    ],
)
def test_zip_malformations_are_refusals(tmp_path: Path, data: bytes, reason: str) -> None:
    (tmp_path / "in.zip").write_bytes(data)
    with pytest.raises(FormatRejected, match=reason.replace("(", r"\(")):
        safe_extract_zip(tmp_path / "in.zip", tmp_path / "out")


@pytest.mark.parametrize(
    "data, reason",
    [
        (deep_member_tgz(300), "is nested 302 levels deep"),
        (_tgz([("a/" * 120 + "b" * 900, b"x")]), "path is 1140 bytes long (at most 1024)"),
        (_tgz([("x" * 256, b"x")]), "a name in its path is over 255 bytes"),
        (_tgz([("\u00e9\r\n" + "y" * 300, b"x")]), r"'\xe9\r\n"),  # escaped, cut short
    ],
)
def test_tar_malformations_are_refusals(tmp_path: Path, data: bytes, reason: str) -> None:
    (tmp_path / "in.tgz").write_bytes(data)
    with pytest.raises(FormatRejected) as e:
        safe_extract_tar(tmp_path / "in.tgz", tmp_path / "out")
    assert reason in str(e.value) and str(e.value).isascii() and len(str(e.value)) < 300


def test_unsettable_member_times_are_dropped(tmp_path: Path) -> None:
    (tmp_path / "in.tgz").write_bytes(_pax_times())
    assert safe_extract_tar(tmp_path / "in.tgz", tmp_path / "out") == ["nan", "far", "before"]
