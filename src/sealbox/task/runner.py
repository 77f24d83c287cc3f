"""``sealbox task run``: check a signing task, verify its inputs, sign them, publish the results.

Order of work (every check comes before a token is requested):

1. worker config, ``W/task.json`` and its schema;
2. scopes (one cert level, format scopes), restricted levels against the source tree;
3. the planned inputs and outputs (no duplicate paths, no clashes, formats that apply);
4. the chain of trust of every upstream task: record signature (production workers), record
   taskId, every consumed artifact listed and its sha256 equal to the bytes fetched;
5. archive inspection (safe extraction, what will be signed);
6. a token from the level's pool, signing through :class:`sealbox.client.SigningClient`;
7. outputs into ``A/``, checksums, ``public/build/KEY``, ``public/logs/precomplete.diff``,
   then the worker's own ``public/chain-of-trust.json`` (and ``.sig`` on a production worker).

Exit codes: 0 done; 3 malformed or not allowed; 4 an input or server unavailable; 5 signing
or internal failure. The first line of every failure is ``sealbox task: error: <what and why>``.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .. import __version__
from ..checksums import SUMS_FILES, write_checksums
from ..client import ClientError, Server, SigningClient, order_formats, parse_host, request_token
from ..errors import ConfigError, SealboxError
from ..formats.authenticode import is_signable_name, is_signed, name_rejection
from . import behaviours as bh
from . import cot
from .artifacts import Progress, Unavailable, fetch
from .schema import TASK_ID, Task, UpstreamArtifact, WorkerConfig, load_worker_config, parse_task
from .scopes import Grant, NotAllowed, check_formats, check_scopes, check_tree

EXIT_OK = 0
EXIT_MALFORMED = 3
EXIT_UNAVAILABLE = 4
EXIT_FAILED = 5

KEY_PATH = "public/build/KEY"
DIFF_PATH = "public/logs/precomplete.diff"
RESERVED = (cot.RECORD, cot.SIGNATURE, KEY_PATH, DIFF_PATH)

Echo = Callable[[str], None]


class TaskFailure(Exception):
    def __init__(self, code: int, message: str, details: list[str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details or []


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


@dataclass
class ItemResult:
    outputs: dict[str, Path]
    diffs: list[str]
    notes: list[str]
    seconds: float


@dataclass
class Outcome:
    task_id: str
    level: str
    outputs: dict[str, Path]
    timings: dict[str, float]


def _err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _out(text: str) -> None:
    print(text, flush=True)


def run_task(
    config_path: Path,
    work_dir: Path,
    artifact_dir: Path,
    task_id: str | None = None,
    echo: Echo = _out,
    live_progress: bool | None = None,
    echo_error: Echo | None = None,
) -> int:
    """Run one task; returns the exit code.

    Progress and the summary go to ``echo`` (stdout by default); a failure goes to
    ``echo_error`` (default: stderr, or ``echo`` when only that is given): first the line
    ``sealbox task: error: <what and why>``, then any detail, indented."""
    if echo_error is None:
        echo_error = _err if echo is _out else echo
    try:
        outcome = _Runner(config_path, work_dir, artifact_dir, task_id, echo, live_progress).run()
    except TaskFailure as f:
        echo_error(f"sealbox task: error: {f.message}")
        for line in f.details:
            echo_error(f"  {line}")
        return f.code
    except Exception as e:  # any other failure is internal: say so, then show where
        echo_error(f"sealbox task: error: internal error: {type(e).__name__}: {e}")
        for line in traceback.format_exc().rstrip().splitlines():
            echo_error(f"  {line}")
        return EXIT_FAILED
    n = len(outcome.outputs)
    echo(f"task {outcome.task_id} done at level '{outcome.level}': {n} file(s) in {artifact_dir}")
    for rel in sorted(outcome.outputs):
        echo(f"  {artifact_dir / rel}")
    echo("  timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in outcome.timings.items()))
    return EXIT_OK


class _Runner:
    def __init__(
        self,
        config_path: Path,
        work_dir: Path,
        artifact_dir: Path,
        task_id: str | None,
        echo: Echo,
        live_progress: bool | None,
    ) -> None:
        self.config_path = config_path
        self.work = work_dir
        self.artifacts = artifact_dir
        self.requested_id = task_id
        self.echo = echo
        self.live = live_progress
        self.timings: dict[str, float] = {}
        self._t0 = time.monotonic()

    def _lap(self, name: str) -> None:
        now = time.monotonic()
        self.timings[name] = now - self._t0
        self._t0 = now

    # -- orchestration ----------------------------------------------------------------------
    def run(self) -> Outcome:
        config = self._config()
        key = self._worker_key(config)
        raw, task = self._task()
        task_id = self.requested_id or task.taskId or os.environ.get("TASK_ID") or _slugid()
        if not TASK_ID.match(task_id):
            raise TaskFailure(EXIT_MALFORMED, f"bad task id {task_id!r}")
        if self.artifacts.exists() and any(self.artifacts.iterdir()):
            raise TaskFailure(EXIT_FAILED, f"artifact dir {self.artifacts} is not empty")
        try:
            grant = check_scopes(config, task)
            requested = {f for u in task.payload.upstreamArtifacts for f in u.formats}
            sums = task.payload.checksums
            if sums is not None and sums.sign:
                requested.add("gpg")
            check_formats(config, grant, requested)
            tree = check_tree(config, grant, task)
        except NotAllowed as e:
            raise TaskFailure(EXIT_MALFORMED, str(e)) from None
        level = config.levels[grant.level]
        if "gpg" in requested and (level.gpg_pubkey is None or not config.path(level.gpg_pubkey).is_file()):
            raise TaskFailure(
                EXIT_FAILED,
                f"worker config: levels.{grant.level}.gpg_pubkey must name the level's gpg public key",
            )
        items = self._plan(config, task)
        self.echo(
            f"task {task_id}: level '{grant.level}' ({grant.cert_scope})"
            + (f", tree {tree}" if tree else "")
            + f", {len(items)} file(s), worker {config.worker.id}"
            + (" (production)" if config.worker.production else " (dep worker)")
        )
        self._lap("checks")
        self._chain_of_trust(config, task, items)
        self._lap("chain of trust")
        scratch = self.work / ".sealbox-task"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        try:
            self._inspect(config, items, scratch / "inspect")
            self._lap("inspection")
            servers = [parse_host(h) for h in level.hosts]
            ca = config.path(level.ca)
            token = self._token(config, grant, servers, ca)
            self._lap("token")
            staged, diffs = self._sign(config, items, servers, ca, token, scratch)
            self._lap("signing")
            outputs = self._finish(config, grant, task, items, staged, diffs, scratch, servers, ca, token)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        outputs.update(self._publish(config, raw, task_id, key))
        self._lap("publish")
        return Outcome(task_id, grant.level, outputs, self.timings)

    # -- inputs -------------------------------------------------------------------------------
    def _config(self) -> WorkerConfig:
        try:
            return load_worker_config(self.config_path)
        except ConfigError as e:
            raise TaskFailure(EXIT_FAILED, str(e)) from None

    def _worker_key(self, config: WorkerConfig) -> Ed25519PrivateKey | None:
        if not config.worker.production or config.worker.private_key is None:
            return None
        try:
            return cot.load_private_key(config.path(config.worker.private_key))
        except cot.CotError as e:
            raise TaskFailure(EXIT_FAILED, f"worker config: {e}") from None

    def _task(self) -> tuple[dict[str, Any], Task]:
        path = self.work / "task.json"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise TaskFailure(EXIT_UNAVAILABLE, f"{path} does not exist") from None
        except OSError as e:
            raise TaskFailure(EXIT_UNAVAILABLE, f"cannot read {path}: {e.strerror}") from None
        try:
            raw = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise TaskFailure(EXIT_MALFORMED, f"task.json is not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise TaskFailure(EXIT_MALFORMED, "task.json: (top level): must be a JSON object")
        try:
            return raw, parse_task(raw)
        except ValueError as e:
            raise TaskFailure(EXIT_MALFORMED, str(e)) from None

    def _plan(self, config: WorkerConfig, task: Task) -> list[Item]:
        items: list[Item] = []
        owner: dict[str, str] = {}
        for up in task.payload.upstreamArtifacts:
            for path in up.paths:
                if path in owner:
                    raise TaskFailure(
                        EXIT_MALFORMED,
                        f"path {path} is supplied by two upstream entries "
                        f"(tasks {owner[path]} and {up.taskId})",
                    )
                owner[path] = up.taskId
                items.append(Item(len(items), up, path, order_formats(up.formats)))
        outputs: dict[str, str] = {}

        def claim(out: str, by: str) -> None:
            if out in RESERVED or out.startswith("public/logs/"):
                raise TaskFailure(EXIT_MALFORMED, f"{by}: output {out} is reserved for the task runner")
            if out in outputs:
                raise TaskFailure(
                    EXIT_MALFORMED, f"{by}: output {out} clashes with the output of {outputs[out]}"
                )
            outputs[out] = by

        for item in items:
            name = PurePosixPath(item.path).name
            fmts = set(item.formats)
            kind = bh.archive_kind(name)
            is_dmg = name.lower().endswith(".dmg")
            if is_dmg and fmts & (bh.MACAPP | bh.WIDEVINE):
                tools = (bh.tool_path(config.tools.dmg), bh.tool_path(config.tools.hfsplus))
                if None in tools:
                    raise TaskFailure(
                        EXIT_FAILED,
                        f"{item.path}: converting a .dmg needs the dmg and hfsplus tools, which this "
                        "worker does not have (worker config [tools] dmg / hfsplus)",
                    )
                item.output = bh.dmg_output_name(item.path)
                kind = "tar"
            else:
                item.output = item.path
            for fmt in fmts & bh.AUTHENTICODE:
                if kind != "zip" and not is_signable_name(name):
                    raise TaskFailure(
                        EXIT_MALFORMED,
                        f"{item.path}: format {fmt} does not apply: {name_rejection(name)} or .zip",
                    )
            if fmts & bh.MACAPP and not (is_dmg or name.lower().endswith((".tar.gz", ".tgz"))):
                raise TaskFailure(EXIT_MALFORMED, f"{item.path}: macapp signs a .dmg or a .tar.gz of an .app")
            if len(fmts & bh.WIDEVINE) > 1 and kind is None:
                raise TaskFailure(
                    EXIT_MALFORMED,
                    f"{item.path}: widevine and widevine_blessed would both write {item.path}.sig",
                )
            claim(item.output, item.path)
            if "gpg" in fmts:
                claim(item.output + ".asc", item.path)
            if fmts & bh.WIDEVINE and kind is None:
                claim(item.output + ".sig", item.path)
        sums = task.payload.checksums
        if sums is not None:
            under = [i for i in items if i.output.startswith(sums.path + "/")]
            if not under:
                raise TaskFailure(EXIT_MALFORMED, f"payload.checksums.path: no input lies under {sums.path}/")
            for a in sums.algorithms:
                claim(f"{sums.path}/{SUMS_FILES[a]}", "payload.checksums")
                if sums.sign:
                    claim(f"{sums.path}/{SUMS_FILES[a]}.asc", "payload.checksums")
        return items

    # -- chain of trust -----------------------------------------------------------------------
    def _trusted_keys(self, config: WorkerConfig) -> dict[str, list[Ed25519PublicKey]]:
        out: dict[str, list[Ed25519PublicKey]] = {}
        for name, cls in config.trusted.items():
            try:
                out[name] = [cot.parse_public_key(k) for k in cls.keys]
            except cot.CotError as e:
                raise TaskFailure(EXIT_FAILED, f"worker config: trusted.{name}.keys: {e}") from None
        return out

    def _chain_of_trust(self, config: WorkerConfig, task: Task, items: list[Item]) -> None:
        trusted = self._trusted_keys(config) if config.worker.production else {}
        by_task: dict[str, list[Item]] = {}
        for item in items:
            by_task.setdefault(item.upstream.taskId, []).append(item)
        limits = config.limits
        store = config.worker.artifact_store
        store_ca = config.path(config.worker.artifact_store_ca) if config.worker.artifact_store_ca else None
        with Progress(self.echo, self.live) as progress:

            def get(tid: str, rel: str) -> Path:
                dest = self.work / "cot" / tid / rel
                try:
                    return fetch(
                        tid, rel, dest, store, progress, ca=store_ca, max_size=limits.max_download_size
                    )
                except Unavailable as e:
                    raise TaskFailure(EXIT_UNAVAILABLE, f"input unavailable: {e}") from None

            for tid, group in by_task.items():
                task_types = {i.upstream.taskType for i in group}
                what = f"upstream task {tid} ({'/'.join(sorted(task_types))})"
                record_path = get(tid, cot.RECORD)
                data = record_path.read_bytes()
                if config.worker.production:
                    try:
                        sig_path = get(tid, cot.SIGNATURE)
                    except TaskFailure:
                        raise TaskFailure(
                            EXIT_MALFORMED,
                            f"chain of trust: {what}: its record is not signed ({cot.SIGNATURE} missing); "
                            "a production worker only consumes signed records (a dep worker's are not)",
                        ) from None
                    cls = cot.verify_signature(data, sig_path.read_bytes(), trusted)
                    if cls is None:
                        raise TaskFailure(
                            EXIT_MALFORMED,
                            f"chain of trust: {what}: the record's Ed25519 signature does not verify under "
                            f"any key of a trusted worker class ({', '.join(trusted) or 'none configured'})",
                        )
                    allowed = config.trusted[cls].task_types
                    if allowed is not None and not task_types <= set(allowed):
                        raise TaskFailure(
                            EXIT_MALFORMED,
                            f"chain of trust: {what}: signed by worker class '{cls}', which may only produce "
                            f"task types {', '.join(allowed)}",
                        )
                try:
                    record = cot.parse_record(data)
                except cot.CotError as e:
                    raise TaskFailure(EXIT_MALFORMED, f"chain of trust: {what}: {e}") from None
                if record["taskId"] != tid:
                    raise TaskFailure(
                        EXIT_MALFORMED,
                        f"chain of trust: {what}: the record is for task {record['taskId']}, not {tid}",
                    )
                for item in group:
                    if item.path not in record["artifacts"]:
                        raise TaskFailure(
                            EXIT_MALFORMED,
                            f"chain of trust: {what}: {item.path} is not listed in its chain-of-trust record",
                        )
                files = {item.path: get(tid, item.path) for item in group}
                try:
                    cot.check_files(record, files)
                except cot.CotError as e:
                    raise TaskFailure(EXIT_MALFORMED, f"chain of trust: {what}: {e}") from None
                for item in group:
                    item.source = files[item.path]
                self.echo(
                    f"chain of trust: {what}: "
                    + (
                        "signature verified, "
                        if config.worker.production
                        else "signature not checked (dep worker), "
                    )
                    + f"{len(group)} artifact(s) match their sha256"
                )

    # -- inspection ---------------------------------------------------------------------------
    def _limits(self, config: WorkerConfig) -> bh.Limits:
        return bh.Limits(config.limits.max_archive_size, config.limits.max_archive_members)

    def _inspect(self, config: WorkerConfig, items: list[Item], scratch: Path) -> None:
        limits = self._limits(config)
        for item in items:
            assert item.source is not None
            fmts = set(item.formats)
            name = PurePosixPath(item.path).name
            if name.lower().endswith(".dmg"):
                continue  # inspected after conversion
            kind = bh.archive_kind(name)
            where = scratch / str(item.index)
            try:
                if kind == "zip" and fmts & bh.AUTHENTICODE:
                    item.members["authenticode"] = bh.inspect_zip_authenticode(
                        item.source, item.path, where / "a", limits
                    )
                if kind is not None and fmts & bh.WIDEVINE:
                    plan = bh.inspect_widevine(item.source, item.path, where / "w", limits)
                    item.members["widevine"] = [m for m, _, _ in plan.targets]
            except bh.InputRejected as e:
                raise TaskFailure(EXIT_MALFORMED, f"input refused: {e}") from None
            except bh.BehaviourFailed as e:
                raise TaskFailure(EXIT_FAILED, str(e)) from None
            finally:
                shutil.rmtree(where, ignore_errors=True)

    # -- token ----------------------------------------------------------------------------------
    def _token(self, config: WorkerConfig, grant: Grant, servers: list[Server], ca: Path) -> str:
        level = config.levels[grant.level]
        cred_path = config.path(level.credentials)
        try:
            user, sep, password = cred_path.read_text(encoding="utf-8").strip().partition(":")
        except OSError as e:
            raise TaskFailure(
                EXIT_FAILED, f"cannot read token-issuer credentials {cred_path}: {e.strerror}"
            ) from None
        if not sep or not user:
            raise TaskFailure(EXIT_FAILED, f"token-issuer credentials {cred_path} must hold user:password")
        errors: list[str] = []
        refused = 0
        for server in random.sample(servers, len(servers)):
            try:
                token = request_token(
                    server, ca, user, password, config.worker.ip, config.worker.token_duration
                )
            except ClientError as e:
                errors.append(str(e))
                refused += "token request refused" in str(e)
                continue
            if token:
                return token
            errors.append(f"{server.url}: empty token")
        code = EXIT_FAILED if refused == len(servers) else EXIT_UNAVAILABLE
        raise TaskFailure(
            code, f"no signing server of level '{grant.level}' gave a token ({len(servers)} tried)", errors
        )

    # -- signing --------------------------------------------------------------------------------
    def _sign(
        self,
        config: WorkerConfig,
        items: list[Item],
        servers: list[Server],
        ca: Path,
        token: str,
        scratch: Path,
    ) -> tuple[dict[str, Path], list[str]]:
        staged: dict[str, Path] = {}
        diffs: list[str] = []
        with SigningClient(servers, ca, token, timeout=config.worker.timeout) as client:

            def sign_one(src: Path, fmt: str, dest: Path) -> None:
                client.sign_one(src, fmt, dest)

            def job(item: Item) -> ItemResult:
                return self._sign_item(config, item, sign_one, scratch / "items" / str(item.index))

            jobs = config.worker.jobs
            with ThreadPoolExecutor(max_workers=min(jobs, len(items))) as pool:
                futures = [(item, pool.submit(job, item)) for item in items]
                results: list[tuple[Item, ItemResult | BaseException]] = []
                for item, fut in futures:
                    try:
                        results.append((item, fut.result()))
                    except BaseException as e:  # collected; the first one is reported
                        results.append((item, e))
        for item, res in results:
            if isinstance(res, BaseException):
                raise self._signing_failure(item, res)
            staged.update(res.outputs)
            diffs.extend(res.diffs)
            fmts = ",".join(item.formats) or "(none)"
            note = f" ({'; '.join(res.notes)})" if res.notes else ""
            self.echo(f"signed {item.path} [{fmts}] in {res.seconds:.2f} s{note}")
        return staged, diffs

    def _signing_failure(self, item: Item, e: BaseException) -> TaskFailure:
        if isinstance(e, TaskFailure):
            return e
        if isinstance(e, ClientError):
            text = str(e)
            code = EXIT_UNAVAILABLE if "gave up after" in text else EXIT_FAILED
            what = "server unavailable" if code == EXIT_UNAVAILABLE else "signing failed"
            return TaskFailure(code, f"{what}: {item.path}: {text}")
        if isinstance(e, bh.InputRejected):
            return TaskFailure(EXIT_MALFORMED, f"input refused: {e}")
        if isinstance(e, SealboxError | OSError):
            return TaskFailure(EXIT_FAILED, f"signing failed: {item.path}: {e}")
        detail = traceback.format_exception(e)
        return TaskFailure(
            EXIT_FAILED,
            f"internal error while signing {item.path}: {type(e).__name__}: {e}",
            [ln.rstrip() for chunk in detail for ln in chunk.splitlines()],
        )

    def _sign_item(self, config: WorkerConfig, item: Item, sign_one: bh.SignOne, scratch: Path) -> ItemResult:
        started = time.monotonic()
        assert item.source is not None
        limits = self._limits(config)
        jobs = config.worker.jobs
        base = PurePosixPath(item.path).name
        stage = scratch / "file" / base
        stage.parent.mkdir(parents=True)
        shutil.copyfile(item.source, stage)
        current = stage
        rel = item.path
        notes: list[str] = []
        diffs: list[str] = []
        outputs: dict[str, Path] = {}
        fmts = item.formats
        if rel != item.output:  # .dmg -> .tar.gz
            converted = scratch / "converted" / PurePosixPath(item.output).name
            converted.parent.mkdir(parents=True)
            dmg_tool, hfsplus_tool = bh.tool_path(config.tools.dmg), bh.tool_path(config.tools.hfsplus)
            assert dmg_tool is not None and hfsplus_tool is not None
            bh.dmg_to_tar_gz(current, converted, rel, (dmg_tool, hfsplus_tool), scratch / "dmg", limits)
            current, rel = converted, item.output
            notes.append("converted from .dmg")
        widevine_done = False
        for n, fmt in enumerate(fmts):
            kind = bh.archive_kind(current.name)
            step = scratch / f"step{n}"
            if fmt in bh.AUTHENTICODE:
                if kind == "zip":
                    signed = bh.sign_zip_authenticode(current, rel, fmt, step, limits, sign_one, jobs)
                    notes.append(f"{fmt}: {len(signed)} member(s) signed")
                elif is_signed(current):
                    notes.append(f"{fmt}: already signed, left as is")
                else:
                    sign_one(current, fmt, current)
            elif fmt in bh.WIDEVINE:
                if kind is not None:
                    if not widevine_done:
                        signed, diff = bh.sign_widevine_archive(current, rel, step, limits, sign_one, jobs)
                        notes.append(
                            f"widevine: {len(signed)} file(s) signed"
                            if signed
                            else "widevine: nothing to sign"
                        )
                        if diff:
                            diffs.append(diff)
                    widevine_done = True
                else:
                    sig = current.with_name(current.name + ".sig")
                    sign_one(current, fmt, sig)
                    outputs[rel + ".sig"] = sig
            elif fmt == "gpg":
                asc = current.with_name(current.name + ".asc")
                sign_one(current, fmt, asc)
                outputs[rel + ".asc"] = asc
            else:
                sign_one(current, fmt, current)
                if fmt in bh.APK_FORMATS and current.name.lower().endswith(".apk"):
                    notes.append(self._check_alignment(config, current, rel))
        outputs[rel] = current
        return ItemResult(outputs, diffs, notes, time.monotonic() - started)

    def _check_alignment(self, config: WorkerConfig, apk: Path, rel: str) -> str:
        tool = bh.tool_path(config.tools.zipalign)
        if tool is None:
            return "zipalign not available: alignment not re-checked"
        res = subprocess.run(
            [tool, "-c", "-p", "4", str(apk)],
            capture_output=True,
            check=False,
            timeout=300,
            stdin=subprocess.DEVNULL,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"},
        )
        if res.returncode != 0:
            raise TaskFailure(EXIT_FAILED, f"signing failed: {rel}: the signed APK fails zipalign -c -p 4")
        return "zipalign -c -p 4 ok"

    # -- outputs ---------------------------------------------------------------------------------
    def _finish(
        self,
        config: WorkerConfig,
        grant: Grant,
        task: Task,
        items: list[Item],
        staged: dict[str, Path],
        diffs: list[str],
        scratch: Path,
        servers: list[Server],
        ca: Path,
        token: str,
    ) -> dict[str, Path]:
        out_dir = self.artifacts
        out_dir.mkdir(parents=True, exist_ok=True)
        published: dict[str, Path] = {}
        for rel, src in staged.items():
            dest = out_dir / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(src, dest)
            published[rel] = dest
        level = config.levels[grant.level]
        sums = task.payload.checksums
        if sums is not None:
            base = out_dir / sums.path
            files = [out_dir / i.output for i in items if i.output.startswith(sums.path + "/")]
            written = write_checksums(files, base, base, sums.algorithms)
            with SigningClient(servers, ca, token, timeout=config.worker.timeout) as client:
                for path in written:
                    rel = path.relative_to(out_dir).as_posix()
                    published[rel] = path
                    if sums.sign:
                        try:
                            client.sign_one(path, "gpg", path.with_name(path.name + ".asc"))
                        except ClientError as e:
                            raise self._signing_failure(
                                Item(-1, items[0].upstream, rel, ["gpg"]), e
                            ) from None
                        published[rel + ".asc"] = path.with_name(path.name + ".asc")
            self.echo(
                f"checksums: {', '.join(p.name for p in written)} over {len(files)} file(s) in {sums.path}"
            )
        gpg_used = any("gpg" in i.formats for i in items) or (sums is not None and sums.sign)
        if gpg_used:
            assert level.gpg_pubkey is not None
            key = out_dir / KEY_PATH
            key.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(config.path(level.gpg_pubkey), key)
            published[KEY_PATH] = key
        if diffs:
            diff = out_dir / DIFF_PATH
            diff.parent.mkdir(parents=True, exist_ok=True)
            diff.write_text("".join(diffs), encoding="utf-8")
            published[DIFF_PATH] = diff
        return published

    def _publish(
        self, config: WorkerConfig, raw: dict[str, Any], task_id: str, key: Ed25519PrivateKey | None
    ) -> dict[str, Path]:
        w = config.worker
        paths = cot.write_record(
            self.artifacts,
            raw,
            task_id,
            w.worker_class,
            w.id,
            w.group,
            key if w.production else None,
            {"sealbox": __version__, "production": w.production},
        )
        return {p.relative_to(self.artifacts).as_posix(): p for p in paths}


def _slugid() -> str:
    return secrets.token_urlsafe(16)[:22]
