"""The ``sealbox`` command. Subcommands are imported only when used, to keep start-up fast."""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from .. import __version__
from . import _common

_COMMANDS = {
    "init": ("sealbox.cli.init", "init"),
    "serve": ("sealbox.cli.serve", "serve"),
    "token": ("sealbox.cli.token", "token"),
    "sign": ("sealbox.cli.sign", "sign"),
    "verify": ("sealbox.cli.verify", "verify"),
    "checksums": ("sealbox.cli.checksums", "checksums"),
    "task": ("sealbox.cli.task", "task"),
    "cot": ("sealbox.cli.cot", "cot"),
    "log": ("sealbox.cli.log", "log"),
    "sign-image": ("sealbox.cli.sign_image", "sign_image"),
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in _COMMANDS:
            return None
        module, attr = _COMMANDS[cmd_name]
        try:
            cmd: click.Command = getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError as e:
            if e.name == module:
                return None
            raise
        return cmd


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sealbox")
def cli() -> None:
    """sealbox: sign release artifacts through signing servers."""


def main(argv: list[str] | None = None) -> Any:
    """The ``sealbox`` command: with ``argv`` None, this process is it (see ``_common.finish``)."""
    if argv is None:
        _common.own_process = True
    return cli.main(args=argv if argv is not None else sys.argv[1:], prog_name="sealbox")
