"""``sealbox log``: audit a server's signing log offline (``verify``) and list its entries (``show``)."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import click

from ._common import fail, small_text


@click.group()
def log() -> None:
    """The signing log: every signature a server released, in a signed Merkle tree."""


@log.command()
@click.argument("dirs", nargs=-1, required=True, type=click.Path(path_type=Path, file_okay=False))
@click.option(
    "--public",
    "public_file",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="The log's public key (DIR/public/signlog.pub of the deployment).",
)
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable report on stdout.")
def verify(dirs: tuple[Path, ...], public_file: Path, as_json: bool) -> None:
    """Recompute each log folder's tree and check every checkpoint (one folder per replica).

    Exits 1 if any log does not match, naming its first entry or checkpoint that does not."""
    from ..errors import ConfigError
    from ..signlog import parse_public_key
    from ..signlog.verify import verify_log

    text = small_text(public_file)
    try:
        public = parse_public_key(text)
    except ConfigError as e:
        fail(f"{public_file}: {e}", 2)
    reports = [verify_log(d, public) for d in dirs]
    if as_json:
        json.dump(
            [
                {
                    "dir": str(r.root),
                    "ok": r.ok,
                    "origin": r.origin,
                    "entries": r.entries,
                    "segments": r.segments,
                    "checkpoints": r.checkpoints,
                    "first": r.first,
                    "last": r.last,
                    "problem": r.problem,
                    "warnings": r.warnings,
                }
                for r in reports
            ],
            sys.stdout,
            indent=2,
        )
        sys.stdout.write("\n")
    else:
        for r in reports:
            span = f", {r.first} .. {r.last}" if r.first else ""
            state = "ok" if r.ok else "FAILED"
            click.echo(
                f"{r.root}: {state}: {r.entries} entries in {r.segments} segment(s), "
                f"{r.checkpoints} checkpoint(s){span}"
            )
            if r.problem:
                click.echo(f"  {r.problem}")
            for w in r.warnings:
                click.echo(f"  warning: {w}")
    sys.exit(0 if all(r.ok for r in reports) else 1)


def _time(value: str | None, what: str) -> str | None:
    """An ISO 8601 time as the entries write it (UTC, milliseconds, ``Z``): comparable as text."""
    if value is None:
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"not an ISO 8601 time: {value!r}", param_hint=what) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    when = when.astimezone(UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


@log.command()
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.option("--format", "fmt", default=None, help="Only entries of this wire format.")
@click.option("--key", "key", default=None, help="Only entries signed with this key name (or fingerprint).")
@click.option("--since", default=None, help="Only entries at or after this time (ISO 8601, UTC if no zone).")
@click.option("--until", default=None, help="Only entries before this time.")
@click.option("--sha256", "sha256", default=None, help="Only entries whose input or output has this SHA-256.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line, as logged.")
def show(
    directory: Path,
    fmt: str | None,
    key: str | None,
    since: str | None,
    until: str | None,
    sha256: str | None,
    as_json: bool,
) -> None:
    """List the entries of a log folder (no verification: see ``sealbox log verify``)."""
    from ..signlog.verify import entries

    start, end = _time(since, "--since"), _time(until, "--until")
    digest = sha256.lower() if sha256 else None
    for index, entry in entries(directory):
        when = str(entry.get("time", ""))
        k = entry.get("key") or {}
        if fmt is not None and entry.get("format") != fmt:
            continue
        if key is not None and key not in (k.get("name"), k.get("fingerprint"), f"sha256:{key}"):
            continue
        if (start is not None and when < start) or (end is not None and when >= end):
            continue
        src, out = entry.get("input") or {}, entry.get("output") or {}
        if digest is not None and digest not in (src.get("sha256"), out.get("sha256")):
            continue
        if as_json:
            click.echo(json.dumps(entry, sort_keys=True))
            continue
        req = entry.get("request") or {}
        click.echo(
            f"{index:>7} {when} {entry.get('format')} key={k.get('name')} "
            f"in={src.get('sha256')} out={out.get('sha256')} {src.get('filename') or '-'} "
            f"client={req.get('client')} via={req.get('kind')}"
        )
