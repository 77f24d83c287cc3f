"""Leftovers never take the server down: a scratch area holding a 10,000-deep tree (paths far
beyond PATH_MAX), folders with mode 000, a fifo and a file without permissions is cleared at
start-up, the periodic cleaner removes such trees and keeps running, and a tarball that would
unpack to one is refused at once, for good, with a reason that names the depth."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import tomli_w

from sealbox.fsutil import remove_tree
from sealbox.server.storage import Storage
from tests.servers import Deployment, ServerProcess, start_server
from tests.test_hostile_inputs import deep_tree_tgz, outcome

DEPTH = 10_000
CAP = 120.0  # bound of every wait
OLD = time.time() - 3 * 86400  # older than any max_file_age used here


def make_deep_tree(top: Path, depth: int = DEPTH) -> Path:
    """``top/d/d/.../d/f``, ``depth`` folders deep, built by descriptor (no path could name it)."""
    top.mkdir()
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            sub = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = sub
        os.close(os.open("f", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=fd))
    finally:
        os.close(fd)
    return top


def make_odd_entries(folder: Path, outside: Path) -> list[Path]:
    """What a crashed or hostile job can leave in the scratch area; the entries made."""
    locked = folder / "job-1-2"
    (locked / "inner").mkdir(parents=True)
    (locked / "inner" / "f").write_bytes(b"x")
    os.chmod(locked / "inner", 0)
    os.chmod(locked, 0)
    fifo = folder / "up-1-3"
    os.mkfifo(fifo)
    bare = folder / "up-1-4"
    bare.write_bytes(b"no permissions")
    bare.chmod(0)
    link = folder / "t-1-5"
    link.symlink_to(outside)  # removing it must not touch what it points to
    return [make_deep_tree(folder / "job-1-1"), locked, fifo, bare, link]


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    d = tmp_path / "outside"
    d.mkdir()
    (d / "keep").write_bytes(b"not ours to remove")
    return d


@pytest.fixture
def sweep(tmp_path: Path) -> Iterator[None]:
    """Whatever a failing test leaves is removed here: pytest's own cleanup would recurse."""
    yield
    with contextlib.suppress(OSError):
        for p in tmp_path.rglob(".immutable-*"):
            subprocess.run(["chattr", "-i", str(p)], check=False, capture_output=True)
    remove_tree(tmp_path)


def _immutable(path: Path) -> bool:
    """Make ``path`` impossible to remove, even for root (False where chattr +i is unavailable)."""
    chattr = shutil.which("chattr")
    if chattr is None:
        return False
    return subprocess.run([chattr, "+i", str(path)], check=False, capture_output=True).returncode == 0


def _until(what: str, check: Callable[[], object], cap: float = CAP) -> None:
    deadline = time.monotonic() + cap
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {cap:g} s waiting for {what}")
        time.sleep(0.05)


# -- the removal helper and the store, without a server ------------------------------------------
def test_remove_tree_deep_and_odd(tmp_path: Path, outside: Path, sweep: None) -> None:
    top = tmp_path / "scratch"
    top.mkdir()
    made = make_odd_entries(top, outside)
    assert remove_tree(top) == []
    assert not top.exists() and not any(os.path.lexists(p) for p in made)
    assert (outside / "keep").read_bytes() == b"not ours to remove"
    assert remove_tree(top) == []  # gone already: nothing to report, nothing raised


def test_remove_tree_reports_what_it_cannot_remove(tmp_path: Path, sweep: None) -> None:
    top = make_deep_tree(tmp_path / "t", 3000)
    stuck = top / "d" / ".immutable-f"
    stuck.write_bytes(b"x")
    if not _immutable(stuck):
        pytest.skip("chattr +i is not available here")
    left = remove_tree(top)
    assert left == [f"{stuck}: Operation not permitted"]
    assert [p.name for p in top.iterdir()] == ["d"]
    assert [p.name for p in (top / "d").iterdir()] == [stuck.name]  # the rest went


def test_cleanup_removes_deep_trees(tmp_path: Path, outside: Path, sweep: None) -> None:
    storage = Storage(tmp_path / "data")
    try:
        made = make_odd_entries(storage.tmp, outside)
        for p in made:
            os.utime(p, (OLD, OLD), follow_symlinks=False)
        assert storage.cleanup(86400) == len(made)
        assert list(storage.tmp.iterdir()) == []
        assert (outside / "keep").exists()
    finally:
        storage.close()


def test_start_up_clears_leftovers(tmp_path: Path, outside: Path, sweep: None) -> None:
    (tmp_path / "data" / "tmp").mkdir(parents=True)
    make_odd_entries(tmp_path / "data" / "tmp", outside)
    make_deep_tree(tmp_path / "data" / "failed", 2000)  # what earlier versions kept
    storage = Storage(tmp_path / "data")
    try:
        assert list(storage.tmp.iterdir()) == []
        assert not (tmp_path / "data" / "failed").exists()
    finally:
        storage.close()


# -- a real server ------------------------------------------------------------------------------
def _deployment(root: Path, formats: list[str] | None = None) -> Deployment:
    """gpg and dmg; cleanups every second (max_file_age stays a day: only planted trees are old)."""
    d = Deployment.create(root, "dep", formats or ["gpg", "dmg"])
    cfg = tomllib.loads(d.config.read_text())
    cfg["server"]["cleanup_interval"] = 1
    d.config.write_text(tomli_w.dumps(cfg))
    return d


def _events(sp: ServerProcess, event: str) -> list[dict[str, object]]:
    return [line for line in sp.log_lines() if line.get("event") == event]


def _signs(sp: ServerProcess, tmp: Path, name: str) -> bool:
    p = tmp / name
    p.write_bytes(b"still serving " + name.encode() + os.urandom(32))
    with sp.client() as c:
        return c.sign(p, ["gpg"]).ok


def _plant_and_wait(top: Path) -> None:
    """Plant a deep tree old enough to go, and wait for the periodic cleaner to remove it."""
    make_deep_tree(top)
    os.utime(top, (OLD, OLD))
    _until(f"the cleaner to remove {top.name}", lambda: not top.exists())


def test_serve_survives_leftovers_and_hostile_trees(tmp_path: Path, outside: Path, sweep: None) -> None:
    d = _deployment(tmp_path / "dep")
    if "dmg" not in tomllib.loads(d.config.read_text())["formats"]:
        pytest.skip("dmg is not available on this host")
    scratch = d.root / "data" / "tmp"
    scratch.mkdir(parents=True)
    made = make_odd_entries(scratch, outside)
    sp = start_server(d)
    try:
        cleared = _events(sp, "scratch_cleared")
        assert cleared and cleared[0]["removed"] == len(made), sp.log.read_text()
        assert not any(os.path.lexists(p) for p in made)
        assert not _events(sp, "leftovers_kept")
        assert _signs(sp, tmp_path, "a.txt")

        # The tarball that planted such trees: refused by the shared archive rules, for good.
        tarball = deep_tree_tgz(DEPTH)
        first = outcome(sp, "dmg", "App.tar.gz", tarball)
        assert first.status == 404, first
        assert "is nested 129 levels deep (at most 128)" in first.reason, first
        again = outcome(sp, "dmg", "App.tar.gz", tarball)
        assert (again.status, again.reason) == (400, first.reason), again  # remembered
        _until("the refused job's scratch to go", lambda: not list(scratch.glob("job-*")))

        # The periodic cleaner removes planted trees, one pass after another.
        for n in (1, 2):
            _plant_and_wait(scratch / f"job-9-{n}")
        assert _signs(sp, tmp_path, "b.txt")
        assert not _events(sp, "cleanup_failed")
    finally:
        rc = sp.stop()
    assert rc == 0, sp.log.read_text()
    assert _events(sp, "stopped")


def test_cleaner_survives_a_failing_pass(tmp_path: Path, sweep: None) -> None:
    d = _deployment(tmp_path / "dep", ["gpg"])
    sp = start_server(d)
    signed = d.root / "data" / "signed"
    try:
        signed.rename(signed.with_name("signed.away"))
        signed.write_bytes(b"not a folder: every cleanup pass fails")
        sp.wait_log(lambda lines: sum(e.get("event") == "cleanup_failed" for e in lines) >= 2, CAP)
        signed.unlink()
        signed.with_name("signed.away").rename(signed)
        _plant_and_wait(d.root / "data" / "tmp" / "job-9-1")  # the passes go on, and work again
        assert _signs(sp, tmp_path, "d.txt")
    finally:
        rc = sp.stop()
    assert rc == 0, sp.log.read_text()
    failed = _events(sp, "cleanup_failed")[0]
    assert failed["level"] == "error" and "NotADirectoryError" in str(failed["error"])


def test_serve_logs_leftovers_it_cannot_remove(tmp_path: Path, sweep: None) -> None:
    d = Deployment.create(tmp_path / "dep", "dep", ["gpg"])
    stuck = d.root / "data" / "tmp" / "job-1-1" / ".immutable-f"
    stuck.parent.mkdir(parents=True)
    stuck.write_bytes(b"x")
    if not _immutable(stuck):
        pytest.skip("chattr +i is not available here")
    sp = start_server(d)
    try:
        kept = _events(sp, "leftovers_kept")
        assert kept and kept[0]["kept"] == [f"{stuck}: Operation not permitted"], sp.log.read_text()
        assert _signs(sp, tmp_path, "c.txt")
    finally:
        rc = sp.stop()
    assert rc == 0, sp.log.read_text()


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda db: db.write_bytes(b"not a database at all\n" * 100), id="not-a-database"),
        pytest.param(lambda db: _overwrite(db, 0, b"\xff" * 100), id="damaged-header"),
        pytest.param(lambda db: _overwrite(db, 4096, b"\xff" * 4096), id="damaged-table"),
    ],
)
def test_serve_moves_a_damaged_row_store_aside(
    tmp_path: Path, sweep: None, damage: Callable[[Path], None]
) -> None:
    """The SQLite file of small inputs and results, left damaged (a disk fault, a copy taken
    of a live file): it is a cache of signatures, so it is moved aside once the damage shows
    (at start-up, or when a table is first read), named in the log, and a new one serves.
    (Before, every small job failed with an internal error for as long as the file stayed.)"""
    d = Deployment.create(tmp_path / "dep", "dep", ["gpg"])
    sp = start_server(d)
    try:
        assert _signs(sp, tmp_path, "a.txt")
    finally:
        assert sp.stop() == 0
    db = d.root / "data" / "small.sqlite3"
    damage(db)
    sp = start_server(d)
    try:
        assert _signs(sp, tmp_path, "b.txt") and _signs(sp, tmp_path, "a.txt")
        (damaged,) = _events(sp, "store_rows_damaged")  # found at start-up, or at first use
        assert damaged["level"] == "warning", damaged
        assert [p.name for p in db.parent.glob("small.sqlite3.damaged-*")] == [damaged["moved_to"]]
        assert not any(e.get("level") == "error" for e in sp.log_lines())
    finally:
        assert sp.stop() == 0


def _overwrite(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(data)
