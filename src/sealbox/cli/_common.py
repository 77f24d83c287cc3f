"""Error reporting shared by the subcommands: one clear line, then the exit code."""

from __future__ import annotations

import sys
from typing import NoReturn

import click


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"sealbox: error: {message}", err=True)
    sys.exit(code)
