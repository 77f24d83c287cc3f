"""What the subcommands share: error reporting (one clear line, then the exit code) and the
options that name the signing servers."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TypeVar

import click

F = TypeVar("F", bound=Callable[..., object])


def server_options(command: F) -> F:
    """``-H/--host`` (repeatable), ``-c/--server-cert`` and ``-t/--token-file``, as signtool spells
    them: the signing servers, the CA that verifies them and the token."""
    for option in reversed(
        (
            click.option(
                "-H",
                "--host",
                "hosts",
                multiple=True,
                required=True,
                help="[fmt:...]host:port (IPv6: [addr]:port), repeatable.",
            ),
            click.option(
                "-c",
                "--server-cert",
                "ca",
                type=click.Path(path_type=Path),
                required=True,
                help="CA bundle (PEM) that verifies the signing servers.",
            ),
            click.option("-t", "--token-file", type=click.Path(path_type=Path), required=True),
        )
    ):
        command = option(command)
    return command


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"sealbox: error: {message}", err=True)
    sys.exit(code)
