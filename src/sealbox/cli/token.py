from __future__ import annotations

import sys
from pathlib import Path

import click

from ..errors import SealboxError
from ._common import fail, small_text, trust_only


@click.command()
@click.option("--server", required=True, help="https://HOST:PORT or HOST:PORT of a signing server.")
@click.option("--ca", type=click.Path(path_type=Path, exists=True, dir_okay=False), required=True)
@click.option(
    "--auth-file",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    required=True,
    help="File holding user:password of a token issuer.",
)
@click.option("--ip", required=True, help="Address the token is for (the uploader).")
@click.option("--duration", type=int, default=1200, show_default=True, help="Seconds.")
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False), default=None)
def token(server: str, ca: Path, auth_file: Path, ip: str, duration: int, output: Path | None) -> None:
    """Mint an upload token (POST /token); written without a trailing newline."""
    import os

    trust_only(ca)
    from ..client import parse_host, request_token

    user, sep, password = small_text(auth_file).strip().partition(":")
    if not sep:
        fail(f"{auth_file}: expected user:password", 2)
    try:
        host = parse_host(server.removeprefix("https://").rstrip("/"))
        value = request_token(host, ca, user, password, ip, duration)
    except SealboxError as e:
        fail(str(e))
    if output is None:
        sys.stdout.write(value)
        sys.stdout.flush()
    else:
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(value)
