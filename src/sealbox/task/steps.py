"""The per-format steps of a run: archive inspection, signing every item, publishing outputs.

One :class:`~sealbox.client.SigningClient`, opened by the runner once the token is there, signs
every file of the run, checksums files included. Each item is copied into the scratch folder
and goes through its formats in order (:func:`sealbox.client.order_formats`): Authenticode
(a zip's members, or the file unless already signed), widevine (an archive's targets, or a
detached ``.sig``), gpg (a detached ``.asc``), or a format that signs the file in place.
"""

from __future__ import annotations

import os
import shutil
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ..client import ClientError, ServerUnavailable, SigningClient
from ..errors import SealboxError
from ..fsutil import remove_tree
from ..procs import child_env, run_process
from ..winfiles import is_signed
from . import behaviours as bh
from .checksums import write_checksums
from .exits import EXIT_FAILED, EXIT_MALFORMED, EXIT_UNAVAILABLE, Echo, TaskFailure
from .plan import DIFF_PATH, KEY_PATH, Item
from .schema import Task, WorkerConfig


@dataclass
class Run:
    """What the steps of one run share."""

    config: WorkerConfig
    level: str
    task: Task
    items: list[Item]
    #: emptied before the run, removed after it
    scratch: Path
    echo: Echo

    @property
    def limits(self) -> bh.Limits:
        return bh.Limits(self.config.limits.max_archive_size, self.config.limits.max_archive_members)


@dataclass
class Signed:
    """What signing staged in the scratch folder: files by published path, precomplete diffs."""

    staged: dict[str, Path] = field(default_factory=dict)
    diffs: list[str] = field(default_factory=list)


@dataclass
class ItemResult:
    outputs: dict[str, Path]
    diffs: list[str]
    notes: list[str]
    seconds: float


# -- inspection ---------------------------------------------------------------------------------
def inspect_items(run: Run) -> None:
    """Open every archive that will be signed inside (safe extraction, members to sign), so
    that a bad archive fails the task before a token is requested."""
    for item in run.items:
        assert item.source is not None
        if item.path.lower().endswith(".dmg"):
            continue  # inspected after conversion
        where = run.scratch / "inspect" / str(item.index)
        try:
            _inspect(item, item.source, where, run.limits)
        except bh.InputRejected as e:
            raise TaskFailure(EXIT_MALFORMED, f"input refused: {e}") from None
        except bh.BehaviourFailed as e:
            raise TaskFailure(EXIT_FAILED, str(e)) from None
        finally:
            remove_tree(where)


def _inspect(item: Item, source: Path, where: Path, limits: bh.Limits) -> None:
    fmts = set(item.formats)
    kind = bh.archive_kind(PurePosixPath(item.path).name)
    if kind == "zip" and fmts & bh.AUTHENTICODE:
        item.members["authenticode"] = bh.inspect_zip_authenticode(source, item.path, where / "a", limits)
    if kind is not None and fmts & bh.WIDEVINE:
        plan = bh.inspect_widevine(source, item.path, where / "w", limits)
        item.members["widevine"] = [m for m, _, _ in plan.targets]


# -- signing ------------------------------------------------------------------------------------
def sign_items(run: Run, client: SigningClient) -> Signed:
    """Sign every item, ``worker.jobs`` at a time; the first failure (in item order) is raised."""

    def sign_one(src: Path, fmt: str, dest: Path) -> None:
        client.sign_one(src, fmt, dest)

    def job(item: Item) -> ItemResult:
        return _sign_item(run, item, sign_one, run.scratch / "items" / str(item.index))

    with ThreadPoolExecutor(max_workers=min(run.config.worker.jobs, len(run.items))) as pool:
        futures = [(item, pool.submit(job, item)) for item in run.items]
        results: list[tuple[Item, ItemResult | BaseException]] = []
        for item, fut in futures:
            try:
                results.append((item, fut.result()))
            except BaseException as e:  # collected; the first one is reported
                results.append((item, e))
    signed = Signed()
    for item, res in results:
        if isinstance(res, BaseException):
            raise signing_failure(item.path, res)
        signed.staged.update(res.outputs)
        signed.diffs.extend(res.diffs)
        fmts = ",".join(item.formats) or "(none)"
        note = f" ({'; '.join(res.notes)})" if res.notes else ""
        run.echo(f"signed {item.path} [{fmts}] in {res.seconds:.2f} s{note}")
    return signed


def signing_failure(path: str, e: BaseException) -> TaskFailure:
    """The task failure for ``e``, raised while signing ``path``: its exit code by its kind."""
    if isinstance(e, TaskFailure):
        return e
    if isinstance(e, ServerUnavailable):
        return TaskFailure(EXIT_UNAVAILABLE, f"server unavailable: {path}: {e}")
    if isinstance(e, ClientError):  # refused (the input, the token) or set up wrongly
        return TaskFailure(EXIT_FAILED, f"signing failed: {path}: {e}")
    if isinstance(e, bh.InputRejected):
        return TaskFailure(EXIT_MALFORMED, f"input refused: {e}")
    if isinstance(e, SealboxError | OSError):
        return TaskFailure(EXIT_FAILED, f"signing failed: {path}: {e}")
    detail = traceback.format_exception(e)
    return TaskFailure(
        EXIT_FAILED,
        f"internal error while signing {path}: {type(e).__name__}: {e}",
        [ln.rstrip() for chunk in detail for ln in chunk.splitlines()],
    )


@dataclass
class _Work:
    """One item on its way through its formats."""

    current: Path  # the file as signed so far
    rel: str  # where it is published
    sign_one: bh.SignOne
    limits: bh.Limits
    jobs: int
    zipalign: str | None  # as configured
    notes: list[str] = field(default_factory=list)
    diffs: list[str] = field(default_factory=list)
    outputs: dict[str, Path] = field(default_factory=dict)
    widevine_done: bool = False


def _sign_item(run: Run, item: Item, sign_one: bh.SignOne, scratch: Path) -> ItemResult:
    started = time.monotonic()
    assert item.source is not None
    stage = scratch / "file" / PurePosixPath(item.path).name
    stage.parent.mkdir(parents=True)
    # the run's own checked copy (trust.verify_upstreams), moved: no other copy is made
    os.replace(item.source, stage)
    item.source = stage
    tools = run.config.tools
    w = _Work(stage, item.path, sign_one, run.limits, run.config.worker.jobs, tools.zipalign)
    if item.path != item.output:  # .dmg -> .tar.gz
        converted = scratch / "converted" / PurePosixPath(item.output).name
        converted.parent.mkdir(parents=True)
        dmg_tool, hfsplus_tool = bh.tool_path(tools.dmg), bh.tool_path(tools.hfsplus)
        assert dmg_tool is not None and hfsplus_tool is not None
        bh.dmg_to_tar_gz(w.current, converted, w.rel, (dmg_tool, hfsplus_tool), scratch / "dmg", w.limits)
        w.current, w.rel = converted, item.output
        w.notes.append("converted from .dmg")
    for n, fmt in enumerate(item.formats):
        _step_for(fmt)(w, fmt, scratch / f"step{n}")
    w.outputs[w.rel] = w.current
    return ItemResult(w.outputs, w.diffs, w.notes, time.monotonic() - started)


Step = Callable[[_Work, str, Path], None]


def _step_for(fmt: str) -> Step:
    if fmt in bh.AUTHENTICODE:
        return _authenticode
    if fmt in bh.WIDEVINE:
        return _widevine
    if fmt == "gpg":
        return _gpg
    if fmt in bh.APT:
        return _apt
    return _in_place


def _authenticode(w: _Work, fmt: str, step: Path) -> None:
    if bh.archive_kind(w.current.name) == "zip":
        signed = bh.sign_zip_authenticode(w.current, w.rel, fmt, step, w.limits, w.sign_one, w.jobs)
        w.notes.append(f"{fmt}: {len(signed)} member(s) signed")
    elif is_signed(w.current):
        w.notes.append(f"{fmt}: already signed, left as is")
    else:
        w.sign_one(w.current, fmt, w.current)


def _widevine(w: _Work, fmt: str, step: Path) -> None:
    if bh.archive_kind(w.current.name) is None:
        sig = w.current.with_name(w.current.name + ".sig")
        w.sign_one(w.current, fmt, sig)
        w.outputs[w.rel + ".sig"] = sig
        return
    if w.widevine_done:  # both widevine formats: one pass signs each target with its own
        return
    signed, diff = bh.sign_widevine_archive(w.current, w.rel, step, w.limits, w.sign_one, w.jobs)
    w.notes.append(f"widevine: {len(signed)} file(s) signed" if signed else "widevine: nothing to sign")
    if diff:
        w.diffs.append(diff)
    w.widevine_done = True


def _gpg(w: _Work, fmt: str, step: Path) -> None:
    asc = w.current.with_name(w.current.name + ".asc")
    w.sign_one(w.current, fmt, asc)
    w.outputs[w.rel + ".asc"] = asc


def _apt(w: _Work, fmt: str, step: Path) -> None:
    """InRelease or Release.gpg beside the Release, which is published unchanged."""
    rel = bh.apt_output(w.rel, fmt)
    dest = step / PurePosixPath(rel).name
    step.mkdir(parents=True, exist_ok=True)
    w.sign_one(w.current, fmt, dest)
    w.outputs[rel] = dest


def _in_place(w: _Work, fmt: str, step: Path) -> None:
    wire = bh.wire_format(fmt, w.current.name)
    if wire != fmt:
        w.notes.append(f"{fmt}: sent as {wire}")
    w.sign_one(w.current, wire, w.current)
    if fmt in bh.APK_FORMATS and w.current.name.lower().endswith(".apk"):
        w.notes.append(_check_alignment(bh.tool_path(w.zipalign), w.current, w.rel))


def _check_alignment(tool: str | None, apk: Path, rel: str) -> str:
    if tool is None:
        return "zipalign not available: alignment not re-checked"
    res = run_process(
        [tool, "-c", "-p", "4", str(apk)],
        what="zipalign -c",
        timeout=300,
        failure=lambda message: TaskFailure(EXIT_FAILED, f"signing failed: {rel}: {message}"),
        env=child_env(apk.parent),
    )
    if res.returncode != 0:
        raise TaskFailure(EXIT_FAILED, f"signing failed: {rel}: the signed APK fails zipalign -c -p 4")
    return "zipalign -c -p 4 ok"


# -- outputs ------------------------------------------------------------------------------------
def finish(run: Run, signed: Signed, client: SigningClient, out_dir: Path) -> dict[str, Path]:
    """Move the signed outputs into ``out_dir`` (where the task's files are gathered before
    they are published), then write (and sign) the checksums, the gpg key and the precomplete
    diff; returns every file to publish, by relative path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    published: dict[str, Path] = {}
    for rel, src in signed.staged.items():
        dest = out_dir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(src, dest)
        published[rel] = dest
    published.update(_checksums(run, client, out_dir))
    sums = run.task.payload.checksums
    if any("gpg" in i.formats for i in run.items) or (sums is not None and sums.sign):
        gpg_pubkey = run.config.levels[run.level].gpg_pubkey
        assert gpg_pubkey is not None
        key = out_dir / KEY_PATH
        key.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run.config.path(gpg_pubkey), key)
        published[KEY_PATH] = key
    if signed.diffs:
        diff = out_dir / DIFF_PATH
        diff.parent.mkdir(parents=True, exist_ok=True)
        diff.write_text("".join(signed.diffs), encoding="utf-8")
        published[DIFF_PATH] = diff
    return published


def _checksums(run: Run, client: SigningClient, out_dir: Path) -> dict[str, Path]:
    sums = run.task.payload.checksums
    if sums is None:
        return {}
    base = out_dir / sums.path
    files = [out_dir / i.output for i in run.items if i.output.startswith(sums.path + "/")]
    written = write_checksums(files, base, base, sums.algorithms)
    published: dict[str, Path] = {}
    for path in written:
        rel = path.relative_to(out_dir).as_posix()
        published[rel] = path
        if sums.sign:
            asc = path.with_name(path.name + ".asc")
            try:
                client.sign_one(path, "gpg", asc)
            except ClientError as e:
                raise signing_failure(rel, e) from None
            published[rel + ".asc"] = asc
    run.echo(f"checksums: {', '.join(p.name for p in written)} over {len(files)} file(s) in {sums.path}")
    return published
