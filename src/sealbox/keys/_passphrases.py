"""Where key passphrases come from: a terminal prompt, a file or an inherited fd.

File format (also what ``--passphrase-fd`` reads): one ``key-name:passphrase`` per line;
lines starting with ``#`` are ignored. Passphrases never travel through argv or env.
"""

from __future__ import annotations

import getpass
import os
import sys
from collections.abc import Callable
from pathlib import Path

from ..errors import ConfigError
from ..fsutil import read_bounded, read_small_text, utf8_text


def _parse(text: str, origin: str) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, secret = line.partition(":")
        if not sep or not name.strip():
            raise ConfigError(f"{origin}:{lineno}: expected 'key-name:passphrase'")
        out[name.strip()] = secret.encode("utf-8")
    return out


class PassphraseSource:
    """Answers ``get(key_name)`` from a mapping, or by prompting when there is none."""

    def __init__(
        self,
        known: dict[str, bytes] | None = None,
        prompt: Callable[[str], str] | None = None,
    ) -> None:
        self._known = known
        self._prompt = prompt

    @classmethod
    def from_file(cls, path: Path) -> PassphraseSource:
        """Passphrases from a file of ``key-name:passphrase`` lines."""
        try:
            text = read_small_text(path)  # (a pipe, <(...), is read to its end: it has one)
        except OSError as e:
            raise ConfigError(f"cannot read passphrase file {path}: {e.strerror}") from None
        return cls(_parse(text, str(path)))

    @classmethod
    def from_fd(cls, fd: int) -> PassphraseSource:
        """Passphrases from ``key-name:passphrase`` lines read from ``fd`` (then closed)."""
        what = f"--passphrase-fd {fd}"
        try:
            with os.fdopen(fd, "rb", closefd=True) as f:
                data = read_bounded(f, what)
        except (OSError, TypeError, OverflowError) as e:  # (a number no descriptor can be: TypeError)
            why = e.strerror if isinstance(e, OSError) else "not a file descriptor"
            raise ConfigError(f"cannot read passphrases from {what}: {why}") from None
        return cls(_parse(utf8_text(data, what), f"fd {fd}"))

    @classmethod
    def interactive(cls) -> PassphraseSource:
        """Ask for each key's passphrase on the terminal, without echo."""
        if not sys.stdin.isatty():
            raise ConfigError(
                "no terminal to ask for key passphrases: pass --passphrase-file or --passphrase-fd"
            )
        return cls(None, prompt=lambda name: getpass.getpass(f"Passphrase for key '{name}': "))

    def get(self, key_name: str) -> bytes:
        """The passphrase (or PIN) of ``key_name``; ConfigError if none was given."""
        if self._known is not None:
            if key_name not in self._known:
                raise ConfigError(f"no passphrase given for key '{key_name}'")
            return self._known[key_name]
        assert self._prompt is not None
        return self._prompt(key_name).encode("utf-8")
