"""The signing log on disk: segments that rotate, checkpoints, group commit, a real full file
system, and the offline audit (``sealbox log verify``) naming each kind of tampering."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sealbox.signlog import LogCorrupt, LogUnavailable, SignLog, public_key_text
from sealbox.signlog.log import CHECKPOINTS, Checkpoint, encode, frame, read_frames
from sealbox.signlog.verify import verify_log
from tests.servers import BIN
from tests.signlog.fs import fill, small_tmpfs

ENTRIES = 30


def _entry(i: int) -> dict[str, Any]:
    fmt = "gpg" if i % 3 else "mar"
    return {
        "time": f"2026-01-01T00:{i:02d}:00.000Z",
        "level": "dep",
        "format": fmt,
        "key": {"name": f"{fmt}-key", "fingerprint": "sha256:" + f"{i % 3:02d}" * 32},
        "input": {"sha1": f"{i:040x}", "sha256": f"{i:064x}", "size": 100 + i, "filename": f"f{i}.bin"},
        "output": {"sha1": f"{i + 1000:040x}", "sha256": f"{i + 1000:064x}", "size": 800},
        "request": {"kind": "upload", "client": "127.0.0.1"},
        "server": {"instance": "test", "host": "test"},
        "ran_in": "worker",
    }


def _open(root: Path, key: Ed25519PrivateKey, segment_bytes: int = 4096) -> SignLog:
    return SignLog(root, key.sign, key.public_key(), "dep", segment_bytes, checkpoint_interval=3600)


def _make(root: Path) -> Ed25519PrivateKey:
    """A log of ENTRIES entries, one batch each, in several segments, checkpoints at 10, 20, 30."""
    key = Ed25519PrivateKey.generate()
    signlog = _open(root, key)
    for i in range(ENTRIES):
        assert signlog.append(_entry(i)).result(timeout=30) == i
        if i in (9, 19):
            assert signlog.covering(i + 1).result(timeout=30).size == i + 1
    signlog.close()  # the last checkpoint
    return key


def _frames(path: Path) -> list[bytes]:
    """The raw frames of a file."""
    data = path.read_bytes()
    with path.open("rb") as f:
        offsets = [fr.offset for fr in read_frames(f)]
    return [data[a:b] for a, b in zip(offsets, [*offsets[1:], len(data)], strict=True)]


def _locate(root: Path, index: int) -> tuple[Path, int]:
    """The segment holding entry ``index`` and its position there."""
    for seg in sorted(root.glob("segment-*.log")):
        for pos, raw in enumerate(_frames(seg)):
            if json.loads(raw[4:-32])["index"] == index:
                return seg, pos
    raise AssertionError(index)


def _flip_bit(root: Path, key: Ed25519PrivateKey) -> None:
    seg, pos = _locate(root, 7)
    frames = _frames(seg)
    raw = bytearray(frames[pos])
    raw[40] ^= 0x04  # inside the JSON
    frames[pos] = bytes(raw)
    seg.write_bytes(b"".join(frames))


def _forge(root: Path, key: Ed25519PrivateKey) -> None:
    """Change entry 12's content and make its frame whole again (what a forger would do)."""
    seg, pos = _locate(root, 12)
    frames = _frames(seg)
    entry = json.loads(frames[pos][4:-32])
    entry["request"]["client"] = "10.6.6.6"
    frames[pos] = frame(encode(entry))
    seg.write_bytes(b"".join(frames))


def _remove(root: Path, key: Ed25519PrivateKey) -> None:
    seg, pos = _locate(root, 7)
    frames = _frames(seg)
    del frames[pos]
    seg.write_bytes(b"".join(frames))


def _swap(root: Path, key: Ed25519PrivateKey, index: int = 7) -> None:
    seg, pos = _locate(root, index)
    frames = _frames(seg)
    frames[pos], frames[pos + 1] = frames[pos + 1], frames[pos]
    seg.write_bytes(b"".join(frames))


def _truncate_last(root: Path, key: Ed25519PrivateKey) -> None:
    seg = sorted(root.glob("segment-*.log"))[-1]
    os.truncate(seg, seg.stat().st_size - 50)  # the last entry, cut inside


def _truncate_first(root: Path, key: Ed25519PrivateKey) -> None:
    seg = sorted(root.glob("segment-*.log"))[0]
    os.truncate(seg, seg.stat().st_size - 50)


def _resign(root: Path, key: Ed25519PrivateKey) -> None:
    """The last checkpoint, signed again with another key (same tree, same time)."""
    other = Ed25519PrivateKey.generate()
    path = root / CHECKPOINTS
    frames = _frames(path)
    cp = Checkpoint.from_json(json.loads(frames[-1][4:-32]))
    forged = Checkpoint.sign(other.sign, cp.origin, cp.size, cp.root, cp.time)
    frames[-1] = frame(encode(forged.to_json()))
    path.write_bytes(b"".join(frames))


def _break_length(path: Path, pos: int) -> None:
    """Frame ``pos`` of ``path`` announces a length no frame has (not what a crash leaves)."""
    frames = _frames(path)
    frames[pos] = b"\xff\xff\xff\xff" + frames[pos][4:]
    path.write_bytes(b"".join(frames))


def _entry_length(root: Path, key: Ed25519PrivateKey) -> None:
    seg, pos = _locate(root, 25)
    _break_length(seg, pos)


def _checkpoint_length(root: Path, key: Ed25519PrivateKey) -> None:
    """Along with a forged entry: with its checkpoints unreadable, the log seemed whole."""
    _forge(root, key)
    _break_length(root / CHECKPOINTS, 0)


def _deep_entry(root: Path, key: Ed25519PrivateKey) -> None:
    seg, pos = _locate(root, 7)
    frames = _frames(seg)
    frames[pos] = frame(b"[" * 100_000 + b"]" * 100_000)
    seg.write_bytes(b"".join(frames))


def _far_time(root: Path, key: Ed25519PrivateKey) -> None:
    """The last checkpoint's time moved past any date (its frame redone, its signature not)."""
    path = root / CHECKPOINTS
    frames = _frames(path)
    cp = json.loads(frames[-1][4:-32])
    cp["time"] = 10**20
    frames[-1] = frame(encode(cp))
    path.write_bytes(b"".join(frames))


TAMPERING = {
    "bit flipped": (_flip_bit, ["entry 7 (segment-", "does not match its hash"]),
    "entry forged, its hash redone": (_forge, ["checkpoint 1 (size 20", "entries 10..19 changed"]),
    "entry removed": (_remove, ["entry 7 (segment-", "holds entry 8", "removed or reordered"]),
    "two entries swapped": (_swap, ["entry 7 (segment-", "holds entry 8", "removed or reordered"]),
    "last segment truncated": (
        _truncate_last,
        ["checkpoint 2 (size 30", "entries 29..29 are gone", "cut at byte"],
    ),
    "a middle segment truncated": (_truncate_first, ["segment-00000000.log is cut at byte", "inside entry"]),
    "checkpoint re-signed with another key": (
        _resign,
        ["checkpoint 2 (size 30", "signature does not verify with the given public key"],
    ),
    "an entry's length prefix broken": (
        _entry_length,
        ["(entry 25)", "frame length 4294967295 is not plausible"],
    ),
    "checkpoints' length prefix broken": (_checkpoint_length, ["checkpoints.log, byte 0 (checkpoint 0)"]),
    "an entry nesting too deeply": (_deep_entry, ["entry 7 (segment-", "is not JSON"]),
    "a checkpoint's time past any date": (
        _far_time,
        ["checkpoint 2 (size 30, time 100000000000000000000 ms)", "signature does not verify"],
    ),
}


def _verify_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "sealbox"), "log", "verify", *args], capture_output=True, text=True, check=False
    )


def test_a_whole_log_verifies_across_its_segments(tmp_path: Path) -> None:
    key = _make(tmp_path / "log")
    report = verify_log(tmp_path / "log", key.public_key())
    assert report.ok, report.problem
    assert report.entries == ENTRIES and report.checkpoints == 3 and report.segments >= 3
    assert (report.first, report.last) == (_entry(0)["time"], _entry(ENTRIES - 1)["time"])
    assert report.warnings == []
    pub = tmp_path / "signlog.pub"
    pub.write_text(public_key_text(key.public_key()) + "\n")
    done = _verify_cli(str(tmp_path / "log"), "--public", str(pub))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f": ok: {ENTRIES} entries in {report.segments} segment(s), 3 checkpoint(s)" in done.stdout
    assert f"{_entry(0)['time']} .. {_entry(ENTRIES - 1)['time']}" in done.stdout
    # And the log opens again where it was, its tree whole.
    signlog = _open(tmp_path / "log", key)
    try:
        assert signlog.size == ENTRIES and signlog.checkpoint is not None
        assert signlog.checkpoint.root == signlog.tree.root()
        assert json.loads(signlog.entry(17))["input"]["sha1"] == _entry(17)["input"]["sha1"]
        assert signlog.lookup("gpg", _entry(17)["input"]["sha1"]) == 17
    finally:
        signlog.close()


@pytest.mark.parametrize("case", list(TAMPERING))
def test_tampering_is_detected_and_named(tmp_path: Path, case: str) -> None:
    tamper, named = TAMPERING[case]
    root = tmp_path / "log"
    key = _make(root)
    tamper(root, key)
    report = verify_log(root, key.public_key())
    assert not report.ok
    for words in named:
        assert words in str(report.problem), report.problem
    pub = tmp_path / "signlog.pub"
    pub.write_text(public_key_text(key.public_key()))
    done = _verify_cli(str(root), "--public", str(pub))
    assert done.returncode == 1 and ": FAILED: " in done.stdout and str(report.problem) in done.stdout
    # A server will not extend a log that does not match itself or its last checkpoint.
    with pytest.raises(LogCorrupt):
        _open(root, key)


def test_replicas_are_each_reported(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    pub = tmp_path / "signlog.pub"
    pub.write_text(public_key_text(key.public_key()))
    for name in ("a", "b"):
        signlog = _open(tmp_path / name, key)
        for i in range(3):
            signlog.append(_entry(i)).result(timeout=30)
        signlog.close()
    _swap(tmp_path / "b", key, 1)
    done = _verify_cli(str(tmp_path / "a"), str(tmp_path / "b"), "--public", str(pub), "--json")
    assert done.returncode == 1
    a, b = json.loads(done.stdout)
    assert a["ok"] and a["entries"] == 3 and a["origin"] != b["origin"]  # each replica its own log
    assert not b["ok"] and "entry 1 (segment-00000000.log" in b["problem"]


def test_one_fsync_covers_every_entry_queued_meanwhile(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    signlog = _open(tmp_path / "log", key, segment_bytes=1 << 20)
    try:
        signlog.append(_entry(0)).result(timeout=30)
        before = signlog.flushes
        # The writer cannot take the queue while it is held: 50 concurrent appends wait together.
        with signlog._cond:
            futures = [signlog.append(_entry(i)) for i in range(1, 51)]
        assert [f.result(timeout=30) for f in futures] == list(range(1, 51))
        assert signlog.flushes == before + 1
    finally:
        signlog.close()
    assert verify_log(tmp_path / "log", key.public_key()).ok


def test_a_torn_tail_is_a_warning_and_dropped_at_start(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    root = tmp_path / "log"
    signlog = _open(root, key)
    for i in range(3):
        signlog.append(_entry(i)).result(timeout=30)
    signlog.close()
    seg = sorted(root.glob("segment-*.log"))[-1]
    with seg.open("ab") as f:
        f.write(frame(encode({"index": 3}))[:20])  # a crash in the middle of a batch
    report = verify_log(root, key.public_key())
    assert report.ok and report.entries == 3
    assert any("ends inside entry 3" in w for w in report.warnings), report.warnings
    signlog = _open(root, key)
    try:
        assert signlog.size == 3
        assert signlog.append(_entry(3)).result(timeout=30) == 3
    finally:
        signlog.close()
    report = verify_log(root, key.public_key())
    assert report.ok and report.entries == 4 and report.warnings == []


def test_a_full_file_system_refuses_entries_until_space_is_back(tmp_path: Path) -> None:
    """A real tmpfs of 256 KiB, filled: every append fails with the system's reason, nothing
    half-written stays, the probe fails; with the space back, the log goes on and verifies."""
    key = Ed25519PrivateKey.generate()
    with small_tmpfs(tmp_path / "fs") as fs:
        root = fs / "log"
        signlog = _open(root, key, segment_bytes=1 << 20)
        try:
            assert signlog.append(_entry(0)).result(timeout=30) == 0
            signlog.covering(1).result(timeout=30)
            filler = fill(fs)
            # The segment's last page still has room for a few entries (tmpfs allocates pages);
            # the first that needs a new page fails, within a page's worth of entries.
            written = 1
            while signlog.size < 20:
                try:
                    signlog.append(_entry(written)).result(timeout=30)
                except LogUnavailable as e:
                    assert "No space left on device" in str(e)
                    break
                written += 1
            assert written < 20 and signlog.size == written and signlog.failures == 1
            sizes = {p.name: p.stat().st_size for p in root.iterdir()}
            for i in range(3):
                with pytest.raises(LogUnavailable, match="No space left on device"):
                    signlog.append(_entry(written + i)).result(timeout=30)
            assert signlog.size == written and signlog.failures == 4
            assert "No space left on device" in str(signlog.probe())
            assert {p.name: p.stat().st_size for p in root.iterdir()} == sizes  # cut back whole
            filler.unlink()
            assert signlog.probe() is None
            assert signlog.append(_entry(written)).result(timeout=30) == written
        finally:
            signlog.close()
        report = verify_log(root, key.public_key())
        assert report.ok and report.entries == written + 1, report.problem


def test_show_lists_and_filters(tmp_path: Path) -> None:
    key = _make(tmp_path / "log")
    del key

    def show(*args: str) -> list[dict[str, Any]]:
        done = subprocess.run(
            [str(BIN / "sealbox"), "log", "show", str(tmp_path / "log"), "--json", *args],
            capture_output=True,
            text=True,
            check=True,
        )
        return [json.loads(line) for line in done.stdout.splitlines()]

    assert [e["index"] for e in show()] == list(range(ENTRIES))
    assert {e["format"] for e in show("--format", "mar")} == {"mar"}
    assert [e["index"] for e in show("--format", "mar")] == list(range(0, ENTRIES, 3))
    assert [
        e["index"]
        for e in show("--key", "gpg-key", "--since", "2026-01-01T00:10:00Z", "--until", "2026-01-01T00:14:00")
    ] == [10, 11, 13]
    assert [e["index"] for e in show("--sha256", _entry(21)["output"]["sha256"])] == [21]
    text = subprocess.run(
        [str(BIN / "sealbox"), "log", "show", str(tmp_path / "log"), "--format", "gpg"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert len(text) == 20 and text[0].split()[:3] == ["1", _entry(1)["time"], "gpg"]
