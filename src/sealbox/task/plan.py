"""The plan of a task: which upstream file gets which formats, and where every output goes.

All of it is decided from ``task.json`` and the worker config alone, before anything is fetched
or signed: no path supplied twice, formats that apply to the file (Authenticode names, macapp
containers, the dmg tools a .dmg needs), no two outputs on one path and none on a path the
runner writes itself, checksums over planned outputs, and wire names the level serves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ..client import order_formats
from ..winfiles import is_signable_name, name_rejection
from . import behaviours as bh
from . import cot
from .checksums import SUMS_FILES
from .exits import EXIT_FAILED, EXIT_MALFORMED, TaskFailure
from .schema import Task, UpstreamArtifact, WorkerConfig
from .scopes import Grant, level_serves

KEY_PATH = "public/build/KEY"
DIFF_PATH = "public/logs/precomplete.diff"
RESERVED = (cot.RECORD, cot.SIGNATURE, KEY_PATH, DIFF_PATH)


@dataclass
class Item:
    """One upstream path to sign."""

    index: int
    upstream: UpstreamArtifact
    path: str
    formats: list[str]
    source: Path | None = None
    #: where the result is published (differs from ``path`` when a .dmg becomes a .tar.gz)
    output: str = ""
    #: inspection results, shown in the summary
    members: dict[str, list[str]] = field(default_factory=dict)


def plan(config: WorkerConfig, task: Task) -> list[Item]:
    """The items of ``task``, each with its output path; raises :class:`TaskFailure`."""
    items = _items(task)
    claims = _Claims()
    for item in items:
        _plan_item(config, item, claims)
    _plan_checksums(task, items, claims)
    return items


def check_wire_names(config: WorkerConfig, grant: Grant, items: list[Item]) -> None:
    """A format that travels under another wire name for some file (an ``.apk`` asked for as
    ``jar`` is sent as ``apk``) needs a level that serves that name too."""
    level = config.levels[grant.level]
    for item in items:
        name = PurePosixPath(item.output).name
        for fmt in item.formats:
            wire = bh.wire_format(fmt, name)
            if wire != fmt and not level_serves(level, wire):
                raise TaskFailure(
                    EXIT_MALFORMED,
                    f"{item.path}: {fmt} on an .apk is sent as {wire} (v1+v2+v3), which cert "
                    f"level '{grant.level}' does not serve here",
                )


def _items(task: Task) -> list[Item]:
    items: list[Item] = []
    owner: dict[str, str] = {}
    for up in task.payload.upstreamArtifacts:
        for path in up.paths:
            if path in owner:
                raise TaskFailure(
                    EXIT_MALFORMED,
                    f"path {path} is supplied by two upstream entries (tasks {owner[path]} and {up.taskId})",
                )
            owner[path] = up.taskId
            items.append(Item(len(items), up, path, order_formats(up.formats)))
    return items


class _Claims:
    """The outputs planned so far, each with what writes it."""

    def __init__(self) -> None:
        self.by: dict[str, str] = {}

    def claim(self, out: str, by: str) -> None:
        if out in RESERVED or out.startswith("public/logs/"):
            raise TaskFailure(EXIT_MALFORMED, f"{by}: output {out} is reserved for the task runner")
        if out in self.by:
            raise TaskFailure(EXIT_MALFORMED, f"{by}: output {out} clashes with the output of {self.by[out]}")
        self.by[out] = by


def _plan_item(config: WorkerConfig, item: Item, claims: _Claims) -> None:
    name = PurePosixPath(item.path).name
    fmts = set(item.formats)
    kind = _set_output(config, item, name, fmts)
    _check_formats_apply(item, name, fmts, kind)
    claims.claim(item.output, item.path)
    if "gpg" in fmts:
        claims.claim(item.output + ".asc", item.path)
    if fmts & bh.WIDEVINE and kind is None:
        claims.claim(item.output + ".sig", item.path)
    for fmt in sorted(fmts & bh.APT):
        claims.claim(bh.apt_output(item.output, fmt), item.path)


def _set_output(config: WorkerConfig, item: Item, name: str, fmts: set[str]) -> bh.ArchiveKind | None:
    """Set where the item's result goes; returns the archive kind of that result.

    A .dmg signed as macapp or widevine is published as a .tar.gz, made with the dmg tools."""
    if not (name.lower().endswith(".dmg") and fmts & (bh.MACAPP | bh.WIDEVINE)):
        item.output = item.path
        return bh.archive_kind(name)
    if None in (bh.tool_path(config.tools.dmg), bh.tool_path(config.tools.hfsplus)):
        raise TaskFailure(
            EXIT_FAILED,
            f"{item.path}: converting a .dmg needs the dmg and hfsplus tools, which this "
            "worker does not have (worker config [tools] dmg / hfsplus)",
        )
    item.output = bh.dmg_output_name(item.path)
    return "tar"


def _check_formats_apply(item: Item, name: str, fmts: set[str], kind: bh.ArchiveKind | None) -> None:
    authenticode = [f for f in item.formats if f in bh.AUTHENTICODE]
    if authenticode and kind != "zip" and not is_signable_name(name):
        raise TaskFailure(
            EXIT_MALFORMED,
            f"{item.path}: format {authenticode[0]} does not apply: {name_rejection(name)} or .zip",
        )
    if fmts & bh.MACAPP and not name.lower().endswith((".dmg", ".tar.gz", ".tgz")):
        raise TaskFailure(EXIT_MALFORMED, f"{item.path}: macapp signs a .dmg or a .tar.gz of an .app")
    if fmts & bh.APT and name != bh.APT_RELEASE:
        raise TaskFailure(
            EXIT_MALFORMED, f"{item.path}: the apt formats sign a repository's {bh.APT_RELEASE} file"
        )
    if len(fmts & bh.WIDEVINE) > 1 and kind is None:
        raise TaskFailure(
            EXIT_MALFORMED, f"{item.path}: widevine and widevine_blessed would both write {item.path}.sig"
        )


def _plan_checksums(task: Task, items: list[Item], claims: _Claims) -> None:
    sums = task.payload.checksums
    if sums is None:
        return
    if not any(i.output.startswith(sums.path + "/") for i in items):
        raise TaskFailure(EXIT_MALFORMED, f"payload.checksums.path: no input lies under {sums.path}/")
    for a in sums.algorithms:
        claims.claim(f"{sums.path}/{SUMS_FILES[a]}", "payload.checksums")
        if sums.sign:
            claims.claim(f"{sums.path}/{SUMS_FILES[a]}.asc", "payload.checksums")
