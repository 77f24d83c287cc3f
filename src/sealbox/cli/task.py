"""``sealbox task``: run a signing task; make a dev worker config."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ._common import fail


@click.group()
def task() -> None:
    """Signing tasks: scopes, cert levels, chain of trust, per-format packaging."""


@task.command("run")
@click.option(
    "--config", "config", type=click.Path(path_type=Path), required=True, help="Worker config (TOML)."
)
@click.option(
    "--work-dir", type=click.Path(path_type=Path), required=True, help="Holds task.json and cot/<taskId>/."
)
@click.option(
    "--artifact-dir", type=click.Path(path_type=Path), required=True, help="Signed outputs go here (empty)."
)
@click.option("--task-id", default=None, help="This task's id (default: task.json taskId, $TASK_ID, random).")
@click.option("--no-progress", is_flag=True, help="No live progress bar, even on a terminal.")
def run(config: Path, work_dir: Path, artifact_dir: Path, task_id: str | None, no_progress: bool) -> None:
    """Check, verify and sign the task in WORK_DIR/task.json.

    Exit codes: 0 done; 3 malformed or not allowed; 4 an input or server unavailable;
    5 signing or internal failure.
    """
    from ..task.runner import run_task

    live = False if no_progress else None
    sys.exit(run_task(config, work_dir, artifact_dir, task_id, live_progress=live))


@task.command("init")
@click.option(
    "--dev", "dev_dir", type=click.Path(path_type=Path), required=True, help="Create the worker here."
)
@click.option(
    "--servers",
    "servers",
    type=click.Path(path_type=Path),
    multiple=True,
    required=True,
    help="A folder made by 'sealbox init --dev' (one per level; more may follow as arguments).",
)
@click.option("--dep-worker", is_flag=True, help="A dep worker: checks hashes, never signs its record.")
@click.argument("more", nargs=-1, type=click.Path(path_type=Path))
def init(dev_dir: Path, servers: tuple[Path, ...], dep_worker: bool, more: tuple[Path, ...]) -> None:
    """Write a worker config, Ed25519 keys and a sample task per level for dev deployments."""
    from ..deploy.taskdev import init_worker_dev
    from ..errors import SealboxError

    try:
        path = init_worker_dev(dev_dir, [*servers, *more], production=not dep_worker)
    except SealboxError as e:
        fail(str(e), 2)
    click.echo(f"created {path}")
    for sample in sorted(dev_dir.glob("sample-*")):
        level = sample.name.removeprefix("sample-")
        click.echo(
            f"  run the sample {level} task: sealbox task run --config {path} --work-dir {sample} "
            f"--artifact-dir {dev_dir / ('out-' + level)}"
        )
