from __future__ import annotations

from pathlib import Path

import click

from ._common import fail


@click.command()
@click.option(
    "--base",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Folder the listed names are relative to (default: the current folder).",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Where SHA256SUMS/SHA512SUMS go (default: --base).",
)
@click.option(
    "--algorithm",
    "algorithms",
    multiple=True,
    type=click.Choice(["sha256", "sha512"]),
    help="Repeatable; default both.",
)
@click.option(
    "--check",
    "check",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=None,
    help="Verify an existing sums file instead of writing one.",
)
@click.argument("files", nargs=-1, type=click.Path(path_type=Path, exists=True, dir_okay=False))
def checksums(
    base: Path | None,
    out_dir: Path | None,
    algorithms: tuple[str, ...],
    check: Path | None,
    files: tuple[Path, ...],
) -> None:
    """Write coreutils-format SHA256SUMS/SHA512SUMS for artifacts (then sign them with gpg)."""
    from ..errors import SealboxError
    from ..task.checksums import verify_checksums, write_checksums

    try:
        if check is not None:
            verify_checksums(check, base)
            click.echo(f"{check}: every listed file matches")
            return
        if not files:
            fail("no files given", 2)
        base = base or Path.cwd()
        written = write_checksums(
            list(files), out_dir or base, base, tuple(algorithms) or ("sha256", "sha512")
        )
    except (SealboxError, ValueError) as e:
        fail(str(e))
    except OSError as e:
        fail(f"{e.filename}: {e.strerror}")
    for path in written:
        click.echo(str(path))
