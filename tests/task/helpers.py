"""Helpers of the task-runner tests: worker configs, task and upstream builders, a runner."""

from __future__ import annotations

import json
import shutil
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from sealbox.deploy.taskdev import DEV_SOURCES, SCOPE_PREFIX, init_worker_dev
from sealbox.task import cot
from sealbox.task.runner import run_task
from tests.servers import ServerProcess


@dataclass
class Worker:
    dir: Path
    config: Path

    def settings(self) -> dict[str, Any]:
        return tomllib.loads(self.config.read_text())

    def public_key(self) -> str:
        return str(self.settings()["trusted"]["signing"]["keys"][0])

    def variant(self, name: str, change: Any) -> Path:
        """A copy of the config (same folder, so relative key paths hold) changed by ``change``."""
        data = self.settings()
        change(data)
        path = self.dir / f"{name}.toml"
        path.write_bytes(tomli_w.dumps(data).encode())
        return path


def _worker(root: Path, servers: dict[str, ServerProcess], levels: list[str], production: bool) -> Worker:
    config = init_worker_dev(
        root,
        [servers[lv].deployment.root for lv in levels],
        production=production,
        samples=False,
        hosts={lv: [servers[lv].hostspec] for lv in levels},
    )
    return Worker(root, config)


@dataclass
class Result:
    code: int
    lines: list[str]

    @property
    def first(self) -> str:
        errors = [ln for ln in self.lines if ln.startswith("sealbox task: error:")]
        return errors[0] if errors else ""

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def run(config: Path, work: Path, out: Path, task_id: str | None = None) -> Result:
    lines: list[str] = []
    code = run_task(config, work, out, task_id=task_id, echo=lines.append, live_progress=False)
    return Result(code, lines)


def write_upstream(
    work: Path,
    task_id: str,
    files: Mapping[str, bytes | Path],
    key_file: Path | None,
    record_task_id: str | None = None,
    worker_type: str = "build",
) -> Path:
    """Artifacts under ``work/cot/<task_id>/`` with a record (signed when ``key_file`` is given)."""
    folder = work / "cot" / task_id
    for rel, content in files.items():
        p = folder / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            shutil.copyfile(content, p)
        else:
            p.write_bytes(content)
    key = cot.load_private_key(key_file) if key_file else None
    cot.write_record(folder, {"scopes": []}, record_task_id or task_id, worker_type, "w1", "g", key)
    return folder


def write_task(
    work: Path,
    entries: list[dict[str, Any]],
    level: str = "dep",
    scopes: list[str] | None = None,
    source: str | None = None,
    **extra: Any,
) -> Path:
    formats = sorted({f for e in entries for f in e.get("formats", [])})
    payload: dict[str, Any] = {"upstreamArtifacts": entries}
    if "checksums" in extra:
        payload["checksums"] = extra.pop("checksums")
        formats = sorted({*formats, "gpg"})
    task: dict[str, Any] = {
        "scopes": scopes
        if scopes is not None
        else [f"{SCOPE_PREFIX}cert:{level}-signing", *(f"{SCOPE_PREFIX}format:{f}" for f in formats)],
        "payload": payload,
        "metadata": {"source": source or DEV_SOURCES[level], "name": "test"},
        **extra,
    }
    work.mkdir(parents=True, exist_ok=True)
    path = work / "task.json"
    path.write_text(json.dumps(task))
    return path


def entry(task_id: str, paths: list[str], formats: list[str], task_type: str = "build") -> dict[str, Any]:
    return {"taskId": task_id, "taskType": task_type, "paths": paths, "formats": formats}
