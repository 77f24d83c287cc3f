"""The content store: one interface over rows and files; atomic publication, torn results
refused, corrupt inputs never used, failures remembered, cleanup, earlier data folders read."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from pathlib import Path

import pytest

from sealbox.errors import ConfigError, SigningFailed
from sealbox.server.storage import Blob, Input, Storage
from sealbox.wire import SMALL_FILE

SHA = "a" * 40


def _sha1(data: bytes) -> str:
    return hashlib.sha1(data, usedforsecurity=False).hexdigest()


def _upload(data: bytes, name: str = "f.bin") -> Input:
    """An upload still in memory, as the HTTP layer hands it to a job."""
    return Input(data, len(data), sha1=_sha1(data), filename=name)


def _file(st: Storage, data: bytes, prefix: str = "out") -> Blob:
    """A file in the store's scratch, as a signing tool leaves its output."""
    path = st.temp_path(prefix)
    path.write_bytes(data)
    return Blob.of(path)


def _stored_file(st: Storage, data: bytes, name: str = "setup (x64).exe") -> Input:
    """A big upload, spooled and moved into the store, as the HTTP layer does."""
    spooled = _file(st, data, "up")
    return st.put_input(Input(spooled.content, spooled.size, sha1=_sha1(data), filename=name))


def _read(blob: Blob) -> bytes:
    with blob.open() as f:
        return f.read()


@pytest.fixture(params=[True, False], ids=["xattr", "sidecar"])
def xattrs(request: pytest.FixtureRequest, tmp_path: Path) -> bool:
    """File metadata in extended attributes, or in sidecar files (the fallback, forced)."""
    if request.param:
        probe = Storage(tmp_path / "probe")
        try:
            has = probe.xattrs
        finally:
            probe.close()
        if not has:
            pytest.skip("this file system has no user xattrs")
    return bool(request.param)


def test_result_roundtrip_and_torn_file(tmp_path: Path, xattrs: bool) -> None:
    st = Storage(tmp_path, xattrs=xattrs)
    item = _stored_file(st, b"input bytes")
    found = st.put_result("gpg", item, _file(st, b"signature bytes"), also_input=False)
    assert found.body == b"signature bytes"  # small: served from memory
    assert st.result("gpg", item.sha1) is found
    st.close()
    st = Storage(tmp_path, xattrs=xattrs)  # a restart: found on disk
    again = st.result("gpg", item.sha1)
    assert again is not None and again.digest == found.digest == _sha1(b"signature bytes")
    assert isinstance(again.content, Path) and _read(again) == b"signature bytes"
    again.content.write_bytes(b"")  # what a power loss can leave after an un-synced rename
    st.close()
    st = Storage(tmp_path, xattrs=xattrs)
    assert st.result("gpg", item.sha1) is None
    assert not (tmp_path / "signed" / "gpg" / item.sha1).exists()
    st.close()


def test_results_can_always_be_sent(tmp_path: Path) -> None:
    st = Storage(tmp_path)
    big = os.urandom(SMALL_FILE + 1)
    outputs = {
        "gpg": b"a worker's signature",  # bytes: a row
        "mar": b"a thread's small output",  # a file, served from memory
        "sha2signcode": big,  # a file, streamed
    }
    item = _upload(b"the input")
    for fmt, data in outputs.items():
        output = Blob.of(data) if fmt == "gpg" else _file(st, data)
        found = st.put_result(fmt, item, output, also_input=False)
        assert _read(found) == data and found.size == len(data) and found.digest == _sha1(data)
    st.close()
    st = Storage(tmp_path)  # a restart: read back from the row and the files
    for fmt, data in outputs.items():
        again = st.result(fmt, item.sha1)
        assert again is not None and _read(again) == data and again.size == len(data)
    st.close()


def test_one_server_per_data_folder(tmp_path: Path) -> None:
    st = Storage(tmp_path)
    with pytest.raises(ConfigError, match="in use by another sealbox server"):
        Storage(tmp_path)
    st.close()
    Storage(tmp_path).close()


def test_leftovers_in_tmp_are_cleared_on_start(tmp_path: Path) -> None:
    st = Storage(tmp_path)
    half, f = st.temp_file()
    f.write(b"half an upload")
    f.close()
    st.close()
    Storage(tmp_path).close()
    assert not half.exists()


def test_failures_permanent_and_transient(tmp_path: Path) -> None:
    st = Storage(tmp_path)
    st.add_failure("mar", SHA, True, "not a MAR file")
    f = st.failure("mar", SHA, transient_ttl=60)
    assert f is not None and f.permanent and f.reason == "not a MAR file"
    st.add_failure("mar", "b" * 40, False, "tool crashed")
    assert st.failure("mar", "b" * 40, transient_ttl=60) is not None
    later = time.time() + 120
    assert st.failure("mar", "b" * 40, transient_ttl=60, now=later) is None  # forgotten: may be retried
    assert st.failure("mar", SHA, transient_ttl=60, now=later) is not None  # permanent stays
    st.clear_failure("mar", SHA)
    assert st.failure("mar", SHA, transient_ttl=60) is None
    st.close()


def test_cleanup_removes_old_entries_only(tmp_path: Path) -> None:
    st = Storage(tmp_path)
    item = _stored_file(st, b"an input")
    st.put_result("gpg", item, _file(st, b"old result"), also_input=False)
    old = time.time() - 1000
    for p in (tmp_path / "signed" / "gpg").iterdir():
        os.utime(p, (old, old))
    assert st.cleanup(max_age=500) == (1 if st.xattrs else 2)  # the result (and its sidecar)
    assert st.result("gpg", item.sha1) is None and st.has_input(item.sha1)
    st.close()


def test_inputs_keep_their_filename(tmp_path: Path, xattrs: bool) -> None:
    st = Storage(tmp_path, xattrs=xattrs)
    item = _stored_file(st, b"input bytes", "setup (x64).exe")
    assert item.content == tmp_path / "unsigned" / item.sha1
    found = st.get_input(item.sha1)
    assert found is not None and found.filename == "setup (x64).exe" and _read(found) == b"input bytes"
    names = sorted(p.name for p in (tmp_path / "unsigned").iterdir())
    assert names == ([item.sha1] if xattrs else [item.sha1, f"{item.sha1}.fn"])
    st.drop_input(item.sha1)
    assert not st.has_input(item.sha1) and st.get_input(item.sha1) is None
    assert list((tmp_path / "unsigned").iterdir()) == []
    st.close()


def test_a_workers_job_is_rows_only_and_survives_a_restart(tmp_path: Path) -> None:
    st = Storage(tmp_path)
    data, output = b"small input", b"signed small input"
    sha1 = _sha1(data)
    found = st.put_result("mar", _upload(data, "u.mar"), Blob.of(output), also_input=True)
    assert found.body == output and found.digest == _sha1(output)
    assert list((tmp_path / "unsigned").iterdir()) == [] and not (tmp_path / "signed" / "mar").exists()
    st.close()
    st = Storage(tmp_path)
    again = st.result("mar", sha1)
    assert again is not None and again.body == output and again.digest == found.digest
    held = st.get_input(sha1)
    assert st.has_input(sha1) and held is not None and (held.filename, held.body) == ("u.mar", data)
    # The output is an input too, and signing it again with the same format gives it back.
    chained = st.get_input(found.digest)
    assert chained is not None and (chained.filename, chained.body) == ("u.mar", output)
    identity = st.result("mar", found.digest)
    assert identity is not None and identity.body == output
    # Old rows go with the cleanup.
    assert st.cleanup(max_age=-1) >= 4
    assert st.result("mar", sha1) is None and not st.has_input(sha1)
    st.close()


def test_a_threads_output_that_replaces_the_file_is_kept_as_an_input(tmp_path: Path, xattrs: bool) -> None:
    st = Storage(tmp_path, xattrs=xattrs)
    item = _upload(b"a small upload signed in a thread", "setup.exe")
    found = st.put_result("sha2signcode", item, _file(st, b"the signed setup.exe"), also_input=True)
    digest = found.digest
    held = st.get_input(item.sha1)  # the upload, stored with its result
    assert held is not None and held.body == item.body
    st.close()
    st = Storage(tmp_path, xattrs=xattrs)
    chained = st.get_input(digest)
    assert (
        chained is not None and chained.filename == "setup.exe" and _read(chained) == b"the signed setup.exe"
    )
    assert chained.content == tmp_path / "unsigned" / digest  # a file, like the result
    identity = st.result("sha2signcode", digest)
    assert identity is not None and identity.digest == digest
    # A detached signature is not kept as an input.
    sig = st.put_result("gpg", item, _file(st, b"a detached signature"), also_input=False)
    assert not st.has_input(sig.digest)
    st.close()


def test_a_corrupt_row_is_never_used(tmp_path: Path) -> None:
    st = Storage(tmp_path)
    item = _upload(b"small input")
    st.put_result("gpg", item, Blob.of(b"sig"), also_input=False)
    db = sqlite3.connect(tmp_path / "small.sqlite3")
    db.execute("UPDATE inputs SET data = ? WHERE sha1 = ?", (b"tampered", item.sha1))
    db.commit()
    db.close()
    assert st.get_input(item.sha1) is None and not st.has_input(item.sha1)  # dropped: uploaded again
    st.close()


def test_a_stored_file_is_checked_before_it_is_signed(tmp_path: Path) -> None:
    st = Storage(tmp_path)
    data = b"a stored input"
    _stored_file(st, data)
    found = st.get_input(_sha1(data))
    assert found is not None and not found.checked  # a file no one has hashed since it arrived
    checked = st.checked(found)
    assert checked.checked and checked.digests["sha256"].hexdigest() == hashlib.sha256(data).hexdigest()
    (tmp_path / "unsigned" / _sha1(data)).write_bytes(b"bit rot")
    with pytest.raises(SigningFailed, match="corrupt"):
        st.checked(found)
    assert not st.has_input(_sha1(data))  # dropped: uploaded again
    st.close()


def test_bytes_are_on_disk_only_while_a_signer_reads_them(tmp_path: Path) -> None:
    st = Storage(tmp_path)
    item = _upload(b"held in memory")
    with st.on_disk(item) as path:
        assert path.parent == st.tmp and path.read_bytes() == b"held in memory"
    assert not path.exists()
    stored = _stored_file(st, b"a file already")
    with st.on_disk(stored) as same:
        assert same == stored.content
    assert same.exists()
    st.close()


def test_a_data_folder_of_an_earlier_version_is_read(tmp_path: Path, xattrs: bool) -> None:
    """The layout on disk is unchanged: a server restarted on its data folder finds its
    inputs and results, as files (with either kind of metadata) and as rows."""
    data = tmp_path / "data"
    (data / "signed" / "gpg").mkdir(parents=True)
    (data / "unsigned").mkdir()
    big_in, big_sig = b"a big input\n" * 100, b"its signature"
    unsigned, signed = data / "unsigned" / _sha1(big_in), data / "signed" / "gpg" / _sha1(big_in)
    unsigned.write_bytes(big_in)
    signed.write_bytes(big_sig)
    meta = {unsigned: ("fn", "big.bin"), signed: ("sha1", f"{_sha1(big_sig)} {len(big_sig)}")}
    for path, (name, value) in meta.items():
        if xattrs:
            os.setxattr(path, f"user.sealbox.{name}", value.encode())
        else:
            path.with_name(f"{path.name}.{name}").write_text(value)
    small_in, small_sig = b"a small input", b"a small signature"
    db = sqlite3.connect(data / "small.sqlite3")
    db.executescript(
        """
        CREATE TABLE inputs (sha1 TEXT PRIMARY KEY, filename TEXT NOT NULL, data BLOB NOT NULL,
                             touched REAL NOT NULL);
        CREATE TABLE results (fmt TEXT NOT NULL, sha1 TEXT NOT NULL, digest TEXT NOT NULL,
                              data BLOB NOT NULL, touched REAL NOT NULL, PRIMARY KEY (fmt, sha1));
        """
    )
    now = time.time()
    db.execute("INSERT INTO inputs VALUES (?, ?, ?, ?)", (_sha1(small_in), "small.bin", small_in, now))
    db.execute(
        "INSERT INTO results VALUES (?, ?, ?, ?, ?)",
        ("gpg", _sha1(small_in), _sha1(small_sig), small_sig, now),
    )
    db.commit()
    db.close()
    st = Storage(data, xattrs=xattrs)
    for content, name, sig in ((big_in, "big.bin", big_sig), (small_in, "small.bin", small_sig)):
        item = st.get_input(_sha1(content))
        assert item is not None and item.filename == name and _read(item) == content
        found = st.result("gpg", _sha1(content))
        assert found is not None and found.digest == _sha1(sig) and _read(found) == sig
    st.close()
