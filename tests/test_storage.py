"""The content store: atomic publication, torn results refused, failures remembered, cleanup."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from pathlib import Path

import pytest

from sealbox.errors import ConfigError
from sealbox.server.storage import Storage

SHA = "a" * 40


def _publish(st: Storage, data: bytes) -> str:
    out = st.temp_path()
    out.write_bytes(data)
    return st.add_result("gpg", SHA, out).digest


@pytest.mark.parametrize("xattrs", [True, False], ids=["xattr", "sidecar"])
def test_result_roundtrip_and_torn_file(tmp_path: Path, xattrs: bool) -> None:
    st = Storage(tmp_path)
    assert st.xattrs  # the test machine's file system has user xattrs; the fallback is forced below
    st.xattrs = xattrs
    digest = _publish(st, b"signature bytes")
    found = st.result("gpg", SHA)
    assert found is not None and found.digest == digest and found.path.read_bytes() == b"signature bytes"
    assert found.body == b"signature bytes"  # small: served from memory
    st.close()
    st = Storage(tmp_path)  # a restart: found on disk
    st.xattrs = xattrs
    found = st.result("gpg", SHA)
    assert found is not None and found.digest == digest and found.size == len(b"signature bytes")
    found.path.write_bytes(b"")  # what a power loss can leave after an un-synced rename
    st.close()
    st = Storage(tmp_path)
    st.xattrs = xattrs
    assert st.result("gpg", SHA) is None
    assert not (tmp_path / "signed" / "gpg" / SHA).exists()


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
    Storage(tmp_path)
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


def test_cleanup_removes_old_entries_only(tmp_path: Path) -> None:
    st = Storage(tmp_path)
    _publish(st, b"old result")
    old = time.time() - 1000
    for p in (tmp_path / "signed" / "gpg").iterdir():
        os.utime(p, (old, old))
    fresh = tmp_path / "unsigned" / ("c" * 40)
    fresh.write_bytes(b"fresh input")
    assert st.cleanup(max_age=500) == (1 if st.xattrs else 2)  # the result (and its sidecar)
    assert st.result("gpg", SHA) is None and fresh.exists()


@pytest.mark.parametrize("xattrs", [True, False], ids=["xattr", "sidecar"])
def test_inputs_keep_their_filename(tmp_path: Path, xattrs: bool) -> None:
    st = Storage(tmp_path)
    st.xattrs = xattrs
    st.add_input_bytes(SHA, "setup (x64).exe", b"input bytes")
    assert st.has_input(SHA) and st.input_filename(SHA) == "setup (x64).exe"
    assert st.input_path(SHA).read_bytes() == b"input bytes"
    names = sorted(p.name for p in (tmp_path / "unsigned").iterdir())
    assert names == ([SHA] if xattrs else [SHA, f"{SHA}.fn"])
    st.drop_input(SHA)
    assert not st.has_input(SHA) and list((tmp_path / "unsigned").iterdir()) == []


def test_small_jobs_live_in_the_small_store_and_survive_a_restart(tmp_path: Path) -> None:
    st = Storage(tmp_path)
    data, output = b"small input", b"signed small input"
    sha1 = hashlib.sha1(data, usedforsecurity=False).hexdigest()
    found = st.add_small_job("mar", sha1, "u.mar", data, output, output_is_input=True)
    assert found.path is None and found.body == output
    assert list((tmp_path / "unsigned").iterdir()) == [] and not (tmp_path / "signed" / "mar").exists()
    st.close()
    st = Storage(tmp_path)
    again = st.result("mar", sha1)
    assert again is not None and again.body == output and again.digest == found.digest
    assert st.has_input(sha1) and st.input_filename(sha1) == "u.mar"
    assert st.small_input(sha1) == ("u.mar", data)
    # The output is an input too, and signing it again with the same format gives it back.
    assert st.small_input(found.digest) == ("u.mar", output)
    identity = st.result("mar", found.digest)
    assert identity is not None and identity.body == output
    # Old rows go with the cleanup.
    assert st.cleanup(max_age=-1) >= 4
    assert st.result("mar", sha1) is None and not st.has_input(sha1)
    st.close()


def test_a_corrupt_small_input_is_never_used(tmp_path: Path) -> None:
    st = Storage(tmp_path)
    data = b"small input"
    sha1 = hashlib.sha1(data, usedforsecurity=False).hexdigest()
    st.add_small_job("gpg", sha1, "f.bin", data, b"sig", output_is_input=False)
    db = sqlite3.connect(tmp_path / "small.sqlite3")
    db.execute("UPDATE inputs SET data = ? WHERE sha1 = ?", (b"tampered", sha1))
    db.commit()
    db.close()
    assert st.small_input(sha1) is None and not st.has_input(sha1)  # dropped, to be uploaded again
    st.close()
