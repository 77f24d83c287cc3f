"""The content store: atomic publication, torn results refused, failures remembered, cleanup."""

from __future__ import annotations

import os
import time
from pathlib import Path

from sealbox.server.storage import Storage

SHA = "a" * 40


def _publish(st: Storage, data: bytes) -> str:
    out = st.temp_dir() / "out"
    out.write_bytes(data)
    return st.add_result("gpg", SHA, out)


def test_result_roundtrip_and_torn_file(tmp_path: Path) -> None:
    st = Storage(tmp_path)
    digest = _publish(st, b"signature bytes")
    found = st.result("gpg", SHA)
    assert found is not None and found[1] == digest and found[0].read_bytes() == b"signature bytes"
    found[0].write_bytes(b"")  # what a power loss can leave after an un-synced rename
    assert st.result("gpg", SHA) is None
    assert not (tmp_path / "signed" / "gpg" / SHA).exists()


def test_leftovers_in_tmp_are_cleared_on_start(tmp_path: Path) -> None:
    st = Storage(tmp_path)
    fd, half = st.temp_file()
    os.write(fd, b"half an upload")
    os.close(fd)
    Storage(tmp_path)
    assert not half.exists()


def test_failures_permanent_and_transient(tmp_path: Path) -> None:
    st = Storage(tmp_path)
    st.add_failure("mar", SHA, True, "not a MAR file")
    f = st.failure("mar", SHA, transient_ttl=60)
    assert f is not None and f.permanent and f.reason == "not a MAR file"
    st.add_failure("mar", "b" * 40, False, "tool crashed")
    old = time.time() - 120
    os.utime(tmp_path / "failed" / "mar" / ("b" * 40), (old, old))
    assert st.failure("mar", "b" * 40, transient_ttl=60) is None  # forgotten: may be retried


def test_cleanup_removes_old_entries_only(tmp_path: Path) -> None:
    st = Storage(tmp_path)
    _publish(st, b"old result")
    old = time.time() - 1000
    for p in (tmp_path / "signed" / "gpg").iterdir():
        os.utime(p, (old, old))
    fresh = tmp_path / "unsigned" / ("c" * 40)
    fresh.write_bytes(b"fresh input")
    assert st.cleanup(max_age=500) == 2
    assert st.result("gpg", SHA) is None and fresh.exists()
