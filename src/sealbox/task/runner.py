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

This module is the order of work; the work itself is in :mod:`.scopes` (2), :mod:`.plan` (3),
:mod:`.trust` (4) and :mod:`.steps` (5-7); :mod:`.exits` holds the exit codes.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import stat
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .. import __version__
from ..client import (
    ClientError,
    LogProof,
    Server,
    ServerUnavailable,
    SigningClient,
    TokenRefused,
    load_log_key,
    parse_host,
    request_token,
)
from ..errors import ConfigError
from ..fsutil import read_bounded, read_small_text, remove_tree, short_name
from . import cot, steps
from .exits import EXIT_FAILED, EXIT_MALFORMED, EXIT_OK, EXIT_UNAVAILABLE, Echo, TaskFailure
from .plan import check_wire_names, plan
from .schema import TASK_ID, Task, WorkerConfig, load_worker_config, parse_task
from .scopes import Grant, NotAllowed, check_formats, check_scopes, check_tree
from .trust import verify_upstreams

__all__ = [
    "EXIT_FAILED",
    "EXIT_MALFORMED",
    "EXIT_OK",
    "EXIT_UNAVAILABLE",
    "Outcome",
    "TaskFailure",
    "run_task",
]

#: the most ``task.json`` may hold, and how deeply it may nest (a task definition is small and
#: flat; its copy in the chain-of-trust record must be writable)
MAX_TASK_BYTES = 4 * 1024 * 1024
MAX_TASK_DEPTH = 32


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
        task_id = self._task_id(task)
        grant, tree = self._scopes(config, task)
        items = plan(config, task)
        check_wire_names(config, grant, items)
        self.echo(
            f"task {task_id}: level '{grant.level}' ({grant.cert_scope})"
            + (f", tree {tree}" if tree else "")
            + f", {len(items)} file(s), worker {config.worker.id}"
            + (" (production)" if config.worker.production else " (dep worker)")
        )
        self._lap("checks")
        scratch = self._scratch()
        staged = scratch / "publish"  # all that is published, moved into place once whole
        try:
            # the inputs, copied once into the scratch folder: checked there, signed from there
            verify_upstreams(config, items, self.work, scratch / "verified", self.echo, self.live)
            self._lap("chain of trust")
            run = steps.Run(config, grant.level, task, items, scratch, self.echo)
            steps.inspect_items(run)
            self._lap("inspection")
            level = config.levels[grant.level]
            servers = [parse_host(h) for h in level.hosts]
            ca = config.path(level.ca)
            log_key = self._log_key(config, grant.level)
            token = self._token(config, grant, servers, ca)
            self._lap("token")
            proof = log_key is not None
            with SigningClient(
                servers, ca, token, timeout=config.worker.timeout, log_proof=proof, log_key=log_key
            ) as client:
                signed = steps.sign_items(run, client)
                self._lap("signing")
                outputs = steps.finish(run, signed, client, staged)
                proofs = client.log_proofs
            outputs.update(self._record(config, raw, task_id, key, proofs if proof else None, staged))
            published = _move_into(staged, self.artifacts, outputs)
            self._lap("publish")
        finally:
            remove_tree(scratch)  # never raises: a failure above stays the one reported
        return Outcome(task_id, grant.level, published, self.timings)

    # -- 1. inputs ----------------------------------------------------------------------------
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
            # (not blocking on a FIFO: what is not a regular file is refused before any read)
            with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    raise TaskFailure(EXIT_MALFORMED, f"{path} is not a regular file")
                data = read_bounded(f, "task.json", MAX_TASK_BYTES)
        except FileNotFoundError:
            raise TaskFailure(EXIT_UNAVAILABLE, f"{path} does not exist") from None
        except OSError as e:
            raise TaskFailure(EXIT_UNAVAILABLE, f"cannot read {path}: {e.strerror}") from None
        except ConfigError:
            raise TaskFailure(EXIT_MALFORMED, f"task.json is larger than {MAX_TASK_BYTES} bytes") from None
        too_deep = TaskFailure(EXIT_MALFORMED, f"task.json nests deeper than {MAX_TASK_DEPTH} levels")
        try:
            raw = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:  # (a JSONDecodeError is a ValueError)
            raise TaskFailure(EXIT_MALFORMED, f"task.json is not valid JSON: {e}") from None
        except RecursionError:
            raise too_deep from None
        if not isinstance(raw, dict):
            raise TaskFailure(EXIT_MALFORMED, "task.json: (top level): must be a JSON object")
        if _depth(raw) > MAX_TASK_DEPTH:  # its copy in the record must not be too deep to write
            raise too_deep
        try:
            return raw, parse_task(raw)
        except ValueError as e:
            raise TaskFailure(EXIT_MALFORMED, str(e)) from None

    def _task_id(self, task: Task) -> str:
        task_id = self.requested_id or task.taskId or os.environ.get("TASK_ID") or _slugid()
        if not TASK_ID.fullmatch(task_id):
            raise TaskFailure(EXIT_MALFORMED, f"bad task id {task_id!r}")
        if self.artifacts.exists() and not self.artifacts.is_dir():
            raise TaskFailure(EXIT_FAILED, f"artifact dir {self.artifacts} is not a folder")
        if self.artifacts.exists() and any(self.artifacts.iterdir()):
            raise TaskFailure(EXIT_FAILED, f"artifact dir {self.artifacts} is not empty")
        return task_id

    # -- 2. scopes ----------------------------------------------------------------------------
    def _scopes(self, config: WorkerConfig, task: Task) -> tuple[Grant, str | None]:
        """The cert level and format scopes granted, and the source tree a restricted level
        is limited to."""
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
        return grant, tree

    # -- 5-7. where inspection and signing work ------------------------------------------------
    def _scratch(self) -> Path:
        scratch = self.work / ".sealbox-task"
        kept = remove_tree(scratch)  # an earlier task's, which may have died half-way
        if kept:
            raise TaskFailure(EXIT_FAILED, f"cannot clear the scratch folder: {kept[0]}")
        scratch.mkdir(parents=True, mode=0o700)  # private: what is checked there is what is signed
        return scratch

    # -- 6. token -------------------------------------------------------------------------------
    def _token(self, config: WorkerConfig, grant: Grant, servers: list[Server], ca: Path) -> str:
        """A token from the first server of the level that mints one (in random order).

        Exit 5 when every server refused (wrong credentials), else 4 (some did not answer)."""
        level = config.levels[grant.level]
        cred_path = config.path(level.credentials)
        try:
            user, sep, password = read_small_text(cred_path).strip().partition(":")
        except OSError as e:
            raise TaskFailure(
                EXIT_FAILED, f"cannot read token-issuer credentials {cred_path}: {e.strerror}"
            ) from None
        except ConfigError as e:
            raise TaskFailure(EXIT_FAILED, f"token-issuer credentials: {e}") from None
        if not sep or not user:
            raise TaskFailure(EXIT_FAILED, f"token-issuer credentials {cred_path} must hold user:password")
        errors: list[str] = []
        refused = 0
        for server in random.sample(servers, len(servers)):
            try:
                token = request_token(
                    server, ca, user, password, config.worker.ip, config.worker.token_duration
                )
            except (TokenRefused, ServerUnavailable) as e:
                errors.append(str(e))
                refused += isinstance(e, TokenRefused)
                continue
            except ClientError as e:  # not a server's answer: the level's CA bundle is unusable
                raise TaskFailure(EXIT_FAILED, f"level '{grant.level}': {e}") from None
            if token:
                return token
            errors.append(f"{server.url}: empty token")
        code = EXIT_FAILED if refused == len(servers) else EXIT_UNAVAILABLE
        raise TaskFailure(
            code, f"no signing server of level '{grant.level}' gave a token ({len(servers)} tried)", errors
        )

    def _log_key(self, config: WorkerConfig, level: str) -> Ed25519PublicKey | None:
        """The level's signing log key: with one, every signature's log inclusion is checked."""
        path = config.levels[level].log_pubkey
        if path is None:
            return None
        where = f"worker config: levels.{level}.log_pubkey"
        try:
            return load_log_key(config.path(path))
        except OSError as e:
            raise TaskFailure(EXIT_FAILED, f"{where}: cannot read {e.filename}: {e.strerror}") from None
        except ConfigError as e:
            raise TaskFailure(EXIT_FAILED, f"{where}: {e}") from None

    # -- 7. publish -----------------------------------------------------------------------------
    def _record(
        self,
        config: WorkerConfig,
        raw: dict[str, Any],
        task_id: str,
        key: Ed25519PrivateKey | None,
        proofs: list[LogProof] | None,
        staged: Path,
    ) -> dict[str, Path]:
        """The worker's chain-of-trust record over ``staged``; with ``proofs`` (a level with
        ``log_pubkey``), its environment lists where each signature is in its server's signing log."""
        w = config.worker
        environment: dict[str, Any] = {"sealbox": __version__, "production": w.production}
        if proofs is not None:
            environment["signingLog"] = [p.to_json() for p in proofs]
        paths = cot.write_record(
            staged,
            raw,
            task_id,
            w.worker_class,
            w.id,
            w.group,
            key if w.production else None,
            environment,
        )
        return {p.relative_to(staged).as_posix(): p for p in paths}


def _move_into(staged: Path, artifacts: Path, files: dict[str, Path]) -> dict[str, Path]:
    """Publish the task's files (the record included): gathered beside the artifact folder (on
    its file system: ``staged`` may be on another), then renamed into its place in one step, so
    the folder holds all of them or none. (A mount point, which cannot be renamed over, gets
    them moved one by one.)"""
    artifacts.parent.mkdir(parents=True, exist_ok=True)
    gathered = artifacts.parent / f".{short_name(artifacts.name, 200)}.{secrets.token_hex(6)}.publishing"
    gathered.mkdir()  # (mode as the umask says, as the artifact folder's would be)
    try:
        for rel in files:
            (gathered / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(staged / rel, gathered / rel)
        try:
            os.replace(gathered, artifacts)  # replaces a missing or empty folder
        except OSError:
            for rel in files:
                (artifacts / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.move(gathered / rel, artifacts / rel)
    finally:
        remove_tree(gathered)  # gone once renamed; otherwise what a failure left
    return {rel: artifacts / rel for rel in files}


def _depth(value: object) -> int:
    """How deeply ``value`` (parsed JSON) nests, counted without recursion."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, level = todo.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, level)
            todo.extend((child, level + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def _slugid() -> str:
    return secrets.token_urlsafe(16)[:22]
