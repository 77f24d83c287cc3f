"""Offline audit of a signing log folder (``sealbox log verify``): recompute the whole tree
from the entries, check every checkpoint's signature, its root and its consistency with the
one before; stop at the first entry or checkpoint that does not match, and name it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from . import merkle
from .log import CHECKPOINTS, META, SEGMENT, Checkpoint, TornFrame, read_frames, segment_name


@dataclass
class Report:
    """What :func:`verify_log` found; ``problem`` is the first mismatch (None: the log is whole)."""

    root: Path
    origin: str | None = None
    entries: int = 0
    segments: int = 0
    checkpoints: int = 0
    first: str | None = None  # time of the first entry
    last: str | None = None
    problem: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.problem is None


class _Stop(Exception):
    pass


@dataclass
class _Torn:
    segment: str
    offset: int
    index: int  # the entry the cut falls in


def entries(root: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Every entry as (index, object), in order, for listing; stops at anything unreadable."""
    for n in _segment_numbers(root):
        try:
            with (root / segment_name(n)).open("rb") as f:
                for fr in read_frames(f):
                    entry = json.loads(fr.data)
                    if isinstance(entry, dict) and isinstance(entry.get("index"), int):
                        yield entry["index"], entry
        except (TornFrame, ValueError, RecursionError):
            return


def _segment_numbers(root: Path) -> list[int]:
    return sorted(int(m[1]) for p in root.iterdir() if (m := SEGMENT.match(p.name)))


def verify_log(root: Path, public: Ed25519PublicKey) -> Report:
    report = Report(root)
    try:
        _verify(root, public, report)
    except _Stop:
        pass
    except OSError as e:
        report.problem = f"cannot read {e.filename or root}: {e.strerror or e}"
    return report


def _fail(report: Report, problem: str) -> None:
    report.problem = problem
    raise _Stop


def _verify(root: Path, public: Ed25519PublicKey, report: Report) -> None:
    if not root.is_dir():
        _fail(report, f"{root} is not a folder")
    try:
        meta = json.loads((root / META).read_text("utf-8"))
        report.origin = str(meta["origin"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        _fail(report, f"{META} is missing or unreadable ({e}): not a signing log")
    tree = merkle.Tree()
    torn = _read_entries(root, tree, report)
    _read_checkpoints(root, public, tree, torn, report)


def _read_entries(root: Path, tree: merkle.Tree, report: Report) -> _Torn | None:
    numbers = _segment_numbers(root)
    report.segments = len(numbers)
    torn = None
    for i, n in enumerate(numbers):
        name = segment_name(n)
        if n != i:
            _fail(report, f"{segment_name(i)} is missing: entries from {tree.size} on are gone")
        if torn is not None:
            _fail(report, f"{torn.segment} is cut at byte {torn.offset}, inside entry {torn.index}")
        with (root / name).open("rb") as f:
            try:
                for fr in read_frames(f):
                    where = f"entry {tree.size} ({name}, byte {fr.offset})"
                    if not fr.intact:
                        _fail(report, f"{where} does not match its hash: it was changed")
                    try:
                        entry = json.loads(fr.data)
                    except (ValueError, RecursionError):
                        _fail(report, f"{where} is not JSON")
                    got = entry.get("index") if isinstance(entry, dict) else None
                    if got != tree.size:
                        _fail(report, f"{where} holds entry {got}: entries were removed or reordered")
                    tree.append(merkle.leaf_hash(fr.data))
                    report.entries = tree.size
                    when = entry.get("time")
                    if isinstance(when, str):
                        report.first = report.first or when
                        report.last = when
            except TornFrame as t:
                if not t.cut:  # not what a crash leaves: the file was changed
                    _fail(report, f"{name}, byte {t.offset} (entry {tree.size}): {t.why}")
                torn = _Torn(name, t.offset, tree.size)
    report.entries = tree.size
    return torn


def _load_checkpoints(root: Path, report: Report) -> list[Checkpoint]:
    """The checkpoints as read (a crash's cut tail dropped, with a warning)."""
    checkpoints: list[Checkpoint] = []
    try:
        with (root / CHECKPOINTS).open("rb") as f:
            for fr in read_frames(f):
                n = len(checkpoints)
                if not fr.intact:
                    _fail(report, f"checkpoint {n} (byte {fr.offset}) does not match its hash: changed")
                try:
                    checkpoints.append(Checkpoint.from_json(json.loads(fr.data)))
                except (ValueError, RecursionError) as e:
                    _fail(report, f"checkpoint {n} (byte {fr.offset}): {type(e).__name__}: {e}"[:300])
                report.checkpoints = len(checkpoints)
    except FileNotFoundError:
        pass
    except TornFrame as t:
        if not t.cut:
            _fail(report, f"{CHECKPOINTS}, byte {t.offset} (checkpoint {len(checkpoints)}): {t.why}")
        report.warnings.append(f"{CHECKPOINTS} ends inside a checkpoint at byte {t.offset} (a crash)")
    report.checkpoints = len(checkpoints)
    return checkpoints


def _read_checkpoints(
    root: Path, public: Ed25519PublicKey, tree: merkle.Tree, torn: _Torn | None, report: Report
) -> None:
    checkpoints = _load_checkpoints(root, report)
    previous: Checkpoint | None = None
    matched = 0  # entries covered by a checkpoint that matched
    for n, cp in enumerate(checkpoints):
        what = f"checkpoint {n} (size {cp.size}, {_time(cp.time)})"
        if not cp.verify(public):
            _fail(report, f"{what}: its signature does not verify with the given public key")
        if cp.origin != report.origin:
            _fail(report, f"{what} is for log {cp.origin}, this log is {report.origin}")
        if previous is not None and cp.size < previous.size:
            _fail(report, f"{what} is smaller than checkpoint {n - 1} (size {previous.size}): a rollback")
        if cp.size > tree.size:
            cut = f" ({torn.segment} is cut at byte {torn.offset}, inside entry {torn.index})" if torn else ""
            _fail(
                report,
                f"{what} covers {cp.size} entries, the log holds {tree.size}: "
                f"entries {tree.size}..{cp.size - 1} are gone{cut}",
            )
        if tree.root(cp.size) != cp.root:
            span = f"entry {matched}" if cp.size - matched == 1 else f"entries {matched}..{cp.size - 1}"
            _fail(report, f"{what} does not match the entries: {span} changed since it was signed")
        if previous is not None and previous.size > 0:
            try:
                proof = tree.consistency_proof(previous.size, cp.size)
                merkle.verify_consistency(previous.size, cp.size, previous.root, cp.root, proof)
            except merkle.ProofError as e:
                _fail(report, f"{what} is not consistent with checkpoint {n - 1}: {e}")
        matched, previous = cp.size, cp
    if torn is not None:
        report.warnings.append(
            f"{torn.segment} ends inside entry {torn.index} at byte {torn.offset}: a write cut short "
            "(the server drops it at its next start)"
        )
    if tree.size > matched:
        report.warnings.append(
            f"entries {matched}..{tree.size - 1} are not covered by a signed checkpoint yet"
            if tree.size - matched > 1
            else f"entry {matched} is not covered by a signed checkpoint yet"
        )


def _time(ms: int) -> str:
    """An entry's or checkpoint's time as ISO 8601 (as the number itself if no date can hold it:
    a damaged checkpoint must still be named)."""
    try:
        when = datetime.fromtimestamp(ms / 1000, UTC)
    except (ValueError, OverflowError, OSError):
        return f"time {ms} ms"
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")
