from __future__ import annotations

import fnmatch
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ..wire import KNOWN
from ._common import fail, finish, server_options, small_text, trust_only

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from ..client import SignOutcome


def _log_key(path: Path | None) -> Ed25519PublicKey | None:
    from ..client import load_log_key

    return load_log_key(path) if path is not None else None


def find_files(paths: Sequence[Path], includes: Sequence[str], excludes: Sequence[str]) -> Iterator[Path]:
    """Files given directly, plus files under given folders filtered by basename globs."""
    for p in paths:
        if p.is_dir():
            for root, dirs, names in os.walk(p):
                dirs.sort()
                for name in sorted(names):
                    if any(fnmatch.fnmatch(name, g) for g in includes or ["*"]) and not any(
                        fnmatch.fnmatch(name, g) for g in excludes
                    ):
                        yield Path(root) / name
        else:
            yield p


def _files(
    paths: Sequence[Path], includes: Sequence[str], excludes: Sequence[str], quiet: bool
) -> list[Path]:
    """What the command signs: :func:`find_files`, each a regular file (else exit 2)."""
    files = list(find_files(paths, includes, excludes))
    for p in files:
        if not p.is_file():
            fail(f"not a regular file: {p}" if p.exists() else f"no such file: {p}", 2)
    if not files and not quiet:
        # not an error (signtool signs nothing and succeeds: a filter may rightly match
        # nothing), but a wrong folder should not pass unnoticed
        click.echo("sealbox: warning: no files to sign in the folders given", err=True)
    return files


def _destinations(files: Sequence[Path], dest_of: Callable[[Path], Path]) -> list[tuple[Path, Path]]:
    """(file, where it is signed to) for each file named once; exit 2 if two files would be
    signed to one place (``-d`` with two files of one name): one output would be lost."""
    taken: dict[str, Path] = {}
    out = []
    for p in files:
        dest = dest_of(p)
        other = taken.setdefault(os.path.abspath(dest), p)
        if other is p:
            out.append((p, dest))
        elif os.path.abspath(other) != os.path.abspath(p):  # (the same file named twice: once)
            fail(f"{other} and {p} would both be signed to {dest}", 2)
    return out


@click.command()
@server_options
@click.option(
    "-n",
    "--nonce-file",
    type=click.Path(path_type=Path),
    default=None,
    help="Accepted for signtool compatibility (the nonce is unused).",
)
@click.option(
    "-f", "--formats", "formats", multiple=True, required=True, help="Repeatable or comma-separated."
)
@click.option("-o", "--output-file", type=click.Path(path_type=Path), default=None)
@click.option("-d", "--output-dir", type=click.Path(path_type=Path), default=None)
@click.option("-i", "--include", "includes", multiple=True, help="Glob on basenames inside folders.")
@click.option("-x", "--exclude", "excludes", multiple=True)
@click.option("--cachedir", type=click.Path(path_type=Path), default=None)
@click.option("-j", "--jobs", type=click.IntRange(1, 64), default=4, show_default=True)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=600.0,
    show_default=True,
    help="Seconds allowed per file and format; unreachable servers are retried until then.",
)
@click.option(
    "--log-proof",
    is_flag=True,
    help="Check that each signature is in its server's signing log (inclusion proof); fail if not.",
)
@click.option(
    "--log-key",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="The signing log's public key (public/signlog.pub): the checkpoints must be signed by it."
    " Implies --log-proof.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
@click.option("-v", "--verbose", is_flag=True)
@click.option("-q", "--quiet", is_flag=True)
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
def sign(
    hosts: tuple[str, ...],
    ca: Path,
    token_file: Path,
    nonce_file: Path | None,
    formats: tuple[str, ...],
    output_file: Path | None,
    output_dir: Path | None,
    includes: tuple[str, ...],
    excludes: tuple[str, ...],
    cachedir: Path | None,
    jobs: int,
    timeout: float,
    log_proof: bool,
    log_key: Path | None,
    as_json: bool,
    verbose: bool,
    quiet: bool,
    paths: tuple[str, ...],
) -> None:
    """Sign files through signing servers (signtool-compatible options)."""
    trust_only(ca)
    from ..client import SigningClient, parse_host
    from ..errors import SealboxError

    fmts = [f.strip() for spec in formats for f in spec.split(",") if f.strip()]
    for f in fmts:
        if f not in KNOWN:
            fail(f"invalid format: {f}", 2)
    if not ca.is_file():
        fail(f"certificate not found: {ca}", 2)
    token = small_text(token_file).strip()
    try:
        servers = [parse_host(h) for h in hosts]
        pinned = _log_key(log_key)
    except OSError as e:
        fail(f"cannot read {e.filename or token_file}: {e.strerror}", 2)
    except SealboxError as e:
        fail(str(e), 2)
    if not token:
        fail(f"the token file {token_file} is empty", 2)
    files = _files([Path(p) for p in paths], includes, excludes, quiet)
    if output_file is not None and len(files) != 1:
        fail("-o / --output-file can only be used when signing a single file", 2)
    if output_file is not None and output_dir is not None:
        fail("-o and -d cannot be used together", 2)

    def dest_of(p: Path) -> Path:
        if output_file is not None:
            return output_file
        if output_dir is not None:
            return output_dir / p.name
        return p

    def retrying(src: Path, fmt: str, error: str) -> None:
        click.echo(f"sealbox: retrying {src} ({fmt}): {error}", err=True)

    show_progress = sys.stderr.isatty() and not quiet and not as_json
    items = [(p, fmts, dest) for p, dest in _destinations(files, dest_of)]
    try:
        client = SigningClient(
            servers,
            ca,
            token,
            timeout=timeout,
            cache_dir=cachedir,
            nonce_file=nonce_file,
            connections=max(4, jobs * 2),
            on_retry=retrying if verbose else None,
            log_proof=log_proof or pinned is not None,
            log_key=pinned,
        )
    except SealboxError as e:  # a CA bundle that is not one
        fail(str(e), 2)
    with client:
        if show_progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

            with Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                transient=True,
            ) as bar:
                task = bar.add_task("signing", total=len(files))
                results = client.sign_many(items, jobs, lambda n: bar.advance(task, n))
        else:
            results = client.sign_many(items, jobs)

    _report(results, as_json=as_json, quiet=quiet, verbose=verbose)
    finish(0 if all(r.ok for r in results) else 1)


def _report(results: Sequence[SignOutcome], *, as_json: bool, quiet: bool, verbose: bool) -> None:
    """Print the outcome of each file: a JSON summary on stdout, or one line per file."""
    if as_json:
        json.dump(
            {
                "ok": all(r.ok for r in results),
                "files": [
                    {
                        "source": str(r.source),
                        "formats": r.formats,
                        "outputs": [str(o) for o in r.outputs],
                        "cached": r.cached,
                        "server": r.server,
                        "seconds": round(r.seconds, 3),
                        "error": r.error,
                        "log_proofs": [p.to_json() for p in r.log_proofs],
                    }
                    for r in results
                ],
            },
            sys.stdout,
            indent=2,
        )
        sys.stdout.write("\n")
    else:
        for r in results:
            if r.ok and not quiet:
                how = " (cache)" if r.cached and len(r.cached) == len(r.formats) else ""
                how += "".join(f" (log #{p.index} of {p.tree_size})" for p in r.log_proofs)
                click.echo(
                    f"signed {r.source} -> {', '.join(map(str, r.outputs))}{how} in {r.seconds:.2f}s",
                    err=not verbose,
                )
            elif not r.ok:
                click.echo(f"sealbox: error: failed to sign {r.source}: {r.error}", err=True)
