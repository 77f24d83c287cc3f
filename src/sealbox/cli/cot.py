"""``sealbox cot``: Ed25519 chain-of-trust keys and records (keygen, sign, verify)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ._common import fail


@click.group()
def cot() -> None:
    """Chain-of-trust records: public/chain-of-trust.json and its Ed25519 .sig."""


@cot.command()
@click.argument("key_file", type=click.Path(path_type=Path))
@click.option(
    "--public", "public_file", type=click.Path(path_type=Path), default=None, help="Also write it here."
)
def keygen(key_file: Path, public_file: Path | None) -> None:
    """Write a new Ed25519 private key (base64 seed, mode 0600) and print its public key."""
    from ..task import cot as c

    if key_file.exists():
        fail(f"{key_file} exists; refusing to overwrite a key", 2)
    key = c.generate_key()
    try:
        c.write_private_key(key_file, key)
        if public_file is not None:
            public_file.write_text(c.public_key_text(key) + "\n")
    except OSError as e:
        fail(f"cannot write {e.filename}: {e.strerror}", 2)
    click.echo(c.public_key_text(key))


@cot.command()
@click.option("--key", "key_file", type=click.Path(path_type=Path), required=True, help="Ed25519 key file.")
@click.option("--artifact-dir", type=click.Path(path_type=Path), required=True, help="The task's artifacts.")
@click.option("--task-id", required=True)
@click.option(
    "--task", "task_file", type=click.Path(path_type=Path), default=None, help="The task definition."
)
@click.option("--worker-type", default="build", show_default=True, help="This worker's class.")
@click.option("--worker-id", default="worker-1", show_default=True)
@click.option("--worker-group", default="sealbox", show_default=True)
def sign(
    key_file: Path,
    artifact_dir: Path,
    task_id: str,
    task_file: Path | None,
    worker_type: str,
    worker_id: str,
    worker_group: str,
) -> None:
    """Write ARTIFACT_DIR/public/chain-of-trust.json over every file there, and its .sig."""
    from ..task import cot as c
    from ..task.schema import TASK_ID

    if not TASK_ID.fullmatch(task_id):
        fail(f"bad task id {task_id!r}", 2)
    if not artifact_dir.is_dir():
        fail(f"{artifact_dir} is not a folder", 2)
    try:
        key = c.load_private_key(key_file)
        task = json.loads(task_file.read_text()) if task_file else {}
        paths = c.write_record(artifact_dir, task, task_id, worker_type, worker_id, worker_group, key)
    except c.CotError as e:
        fail(str(e), 2)
    except (OSError, ValueError) as e:
        fail(f"cannot read the task definition: {e}", 2)
    record = json.loads(paths[0].read_text())
    click.echo(f"wrote {paths[0]} ({len(record['artifacts'])} artifact(s)) and {paths[1]}")


@cot.command()
@click.argument("artifact_dir", type=click.Path(path_type=Path))
@click.option("--task-id", default=None, help="The record must be for this task.")
@click.option("--pubkey", "pubkeys", multiple=True, help="Trusted Ed25519 public key (base64), repeatable.")
@click.option(
    "--config",
    "config",
    type=click.Path(path_type=Path),
    default=None,
    help="Trust the keys of a worker config.",
)
@click.option("--no-files", is_flag=True, help="Check the record only, not the files beside it.")
def verify(
    artifact_dir: Path, task_id: str | None, pubkeys: tuple[str, ...], config: Path | None, no_files: bool
) -> None:
    """Verify ARTIFACT_DIR/public/chain-of-trust.json: signature, taskId, and every file's sha256.

    Exit status 0 when it verifies, 3 when it does not, 2 on a usage error.
    """
    from ..errors import ConfigError
    from ..task import cot as c

    trusted: dict[str, list[c.Ed25519PublicKey]] = {}
    try:
        if pubkeys:
            trusted["--pubkey"] = [c.parse_public_key(k) for k in pubkeys]
        if config is not None:
            from ..task.schema import load_worker_config

            for name, entry in load_worker_config(config).trusted.items():
                trusted[name] = [c.parse_public_key(k) for k in entry.keys]
    except (c.CotError, ConfigError) as e:
        fail(str(e), 2)
    if not trusted:
        fail("no trusted key: give --pubkey or --config", 2)
    try:
        data = (artifact_dir / c.RECORD).read_bytes()
        sig = (artifact_dir / c.SIGNATURE).read_bytes()
    except OSError as e:
        fail(f"cannot read {e.filename}: {e.strerror}", 3)
    cls = c.verify_signature(data, sig, trusted)
    if cls is None:
        fail(f"{artifact_dir / c.RECORD}: the signature does not verify under any trusted key", 3)
    try:
        record = c.parse_record(data)
        if task_id is not None and record["taskId"] != task_id:
            raise c.CotError(f"the record is for task {record['taskId']}, not {task_id}")
        if not no_files:
            files = c.list_artifacts(artifact_dir)
            unlisted = sorted(set(files) - set(record["artifacts"]))
            if unlisted:
                raise c.CotError(f"{unlisted[0]} is not listed in the record")
            missing = sorted(set(record["artifacts"]) - set(files))
            if missing:
                raise c.CotError(f"{missing[0]} is listed in the record but missing")
            c.check_files(record, files)
    except c.CotError as e:
        fail(str(e), 3)
    n = len(record["artifacts"])
    click.echo(
        f"ok: task {record['taskId']}, signed by a '{cls}' key, {n} artifact(s)"
        + ("" if no_files else " match")
    )
    sys.exit(0)
