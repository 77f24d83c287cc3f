"""The content store is private: its folder 0700 and every file in it 0600 (folders 0700),
whatever the umask the server starts with; a store with looser modes is tightened at start-up."""

from __future__ import annotations

import contextlib
import os
import stat
import tomllib
from collections.abc import Iterator
from pathlib import Path

import tomli_w

from sealbox.samples.mar import write_mar
from tests.servers import Deployment, ServerProcess, start_server


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    """The server process inherits the umask it is started with."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _deployment(tmp_path: Path, data_dir: Path) -> Deployment:
    """gpg and mar, with the store outside the (0700) deployment folder."""
    d = Deployment.create(tmp_path / "dep", "dep", ["gpg", "mar"])
    cfg = tomllib.loads(d.config.read_text())
    cfg["server"]["data_dir"] = str(data_dir)
    d.config.write_text(tomli_w.dumps(cfg))
    return d


def _start(d: Deployment) -> ServerProcess:
    with _umask(0o022):
        return start_server(d)


def _modes(root: Path) -> dict[str, int]:
    """Permission bits of the store and everything in it, by path relative to the store."""
    out = {".": stat.S_IMODE(root.stat().st_mode)}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = stat.S_IMODE(p.lstat().st_mode)
    return out


def _loose(root: Path) -> dict[str, str]:
    bad = {}
    for rel, mode in _modes(root).items():
        want = 0o700 if (root / rel).is_dir() else 0o600
        if mode != want:
            bad[rel] = oct(mode)
    return bad


def test_store_is_private_under_umask_022(tmp_path: Path) -> None:
    outside = tmp_path / "srv"
    outside.mkdir(mode=0o755)
    data = outside / "store"
    d = _deployment(tmp_path, data)
    sp = _start(d)
    try:
        with sp.client() as c:
            for i in range(3):  # small: signed by the worker processes, kept in SQLite
                small = tmp_path / f"small{i}.txt"
                small.write_text(f"a small input {i}\n" * 20)
                assert c.sign(small, ["gpg"]).ok
                assert c.sign(write_mar(tmp_path / "in", f"small{i}.mar", size=2048, seed=i), ["mar"]).ok
            # Over 256 KiB: signed in a thread, input and results kept as files.
            big = write_mar(tmp_path / "in", "big.mar", size=600 * 1024, seed=7)
            assert c.sign(big, ["mar", "gpg"]).ok
        seen = _modes(data)
        db = [f"small.sqlite3{s}" for s in ("", "-wal", "-shm")]
        for name in ["lock", "signed/gpg", "signed/mar", *db]:
            assert name in seen, sorted(seen)
        assert any(n.startswith("unsigned/") for n in seen), sorted(seen)
        assert _loose(data) == {}  # while it runs (the -wal and -shm files exist now)
        assert sp.stop() == 0
        assert _loose(data) == {}
    finally:
        sp.stop()


def test_loose_store_is_tightened_at_start(tmp_path: Path) -> None:
    data = tmp_path / "store"
    (data / "unsigned").mkdir(parents=True, mode=0o755)
    (data / "signed" / "gpg").mkdir(parents=True, mode=0o755)
    data.chmod(0o755)
    for p in (data / "unsigned" / ("0" * 40), data / "signed" / "gpg" / ("0" * 40), data / "lock"):
        p.write_bytes(b"kept from an earlier server\n")
        p.chmod(0o644)
    (data / "unsigned" / ("1" * 40)).write_bytes(b"read-only stays read-only\n")
    (data / "unsigned" / ("1" * 40)).chmod(0o444)
    d = _deployment(tmp_path, data)
    sp = _start(d)
    try:
        assert sp.stop() == 0
        tightened = [e for e in sp.log_lines() if e.get("event") == "store_private"]
        assert tightened and tightened[0]["tightened"] == 8, tightened  # 4 folders, 4 files
        modes = _modes(data)
        assert modes["unsigned/" + "1" * 40] == 0o400  # only group and other bits go
        del modes["unsigned/" + "1" * 40]
        assert {rel: oct(m) for rel, m in modes.items() if m not in (0o700, 0o600)} == {}
        assert _loose(data).keys() == {"unsigned/" + "1" * 40}
    finally:
        sp.stop()
