"""What the subcommands share: error reporting (one clear line, then the exit code) and the
options that name the signing servers."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TypeVar

import click

F = TypeVar("F", bound=Callable[..., object])

#: set by :func:`sealbox.cli.main` when this process is the ``sealbox`` command itself (not a
#: caller running the CLI in-process, as tests do): :func:`finish` may then end it at once
own_process = False


def trust_only(ca: Path) -> None:
    """For a command that talks to signing servers alone, before it imports the client: this
    process's default TLS trust is ``ca`` (the client verifies servers with ``ca`` only, in
    contexts of its own). aiohttp builds a default context as it is imported, which would
    otherwise parse the system's whole CA bundle: about 50 ms of every cold start."""
    os.environ["SSL_CERT_FILE"] = str(ca)
    os.environ["SSL_CERT_DIR"] = os.devnull  # no directory of certificates either


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


def finish(code: int) -> NoReturn:
    """Exit with ``code``, for a command that has closed everything it opened.

    As the ``sealbox`` process itself, without the interpreter's teardown: freeing hundreds of
    modules the process is about to lose anyway takes about 30 ms, 15% of a cold ``sealbox
    sign`` (a pipeline may run one per file). Standard output and error are flushed first; a
    flush that fails (a closed pipe) makes the exit code 1 (a normal exit would print a warning
    and exit 120)."""
    if not own_process:
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe, a closed stream
            code = code or 1
    os._exit(code)


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"sealbox: error: {message}", err=True)
    sys.exit(code)


def small_text(path: Path) -> str:
    """The text of a small file the command is given (a token, credentials, a key), or exit 2
    saying why it cannot be had (unreadable, binary, endless)."""
    from ..errors import ConfigError
    from ..fsutil import read_small_text

    try:
        return read_small_text(path)
    except OSError as e:
        fail(f"cannot read {path}: {e.strerror}", 2)
    except ConfigError as e:
        fail(str(e), 2)
