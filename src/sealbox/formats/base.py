"""The signer interface every format implements.

A signer is built from its format's config section and a key resolver, and is blind to
where its key lives. It signs one input file into one output file. It raises
:class:`~sealbox.errors.FormatRejected` when the input can never be signed (the server
remembers that and clients stop retrying) and :class:`~sealbox.errors.SigningFailed`
for anything that might succeed on another attempt.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import ConfigError, VerificationFailed
from ..hashing import CHUNK
from ..keys.store import UnlockedKey

if TYPE_CHECKING:
    from ..deploy.dev import DevContext

KeyResolver = Callable[[str], UnlockedKey]


@dataclass(frozen=True)
class SignRequest:
    """One signing job. ``digests`` holds hash states over the input computed while it was
    received (keys are hashlib names); use :meth:`hash_state` rather than re-reading."""

    input: Path
    output: Path
    filename: str
    #: a private scratch folder (exists only if the signer's ``uses_work_dir`` is true)
    work_dir: Path
    digests: Mapping[str, Any] = field(default_factory=dict)

    def hash_state(self, algorithm: str) -> Any:
        """A fresh copy of the hash state of the whole input under ``algorithm``."""
        state = self.digests.get(algorithm)
        if state is not None:
            return state.copy()
        h = hashlib.new(algorithm)
        with self.input.open("rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
        return h


@dataclass(frozen=True)
class FormatSettings:
    """A format's config section: the wire name, its key name, and free-form options.
    Relative paths in options resolve against ``base_dir`` (the config file's folder)."""

    name: str
    key: str | None
    options: Mapping[str, Any]
    base_dir: Path

    def path(self, option: str, required: bool = True) -> Path | None:
        value = self.options.get(option)
        if value is None:
            if required:
                raise ConfigError(f"format '{self.name}': option '{option}' is required")
            return None
        p = Path(str(value))
        return p if p.is_absolute() else self.base_dir / p

    def get(self, option: str, default: Any = None) -> Any:
        return self.options.get(option, default)

    def require_key(self) -> str:
        """The name of this format's key; a format that signs needs one."""
        if self.key is None:
            raise ConfigError(f"format '{self.name}': 'key' is required")
        return self.key


def child_env(home: Path | str = "/nonexistent", path: str | None = None) -> dict[str, str]:
    """The whole environment a signing tool gets: nothing of ours (no secrets) leaks in."""
    return {"PATH": path or os.environ.get("PATH", os.defpath), "LANG": "C.UTF-8", "HOME": str(home)}


def run_verifier(
    argv: Sequence[str], what: str, timeout: float, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run an independent verifier (output captured); one that hangs fails the verification."""
    try:
        return subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=False,
            env=dict(env) if env is not None else child_env(),
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise VerificationFailed(f"{what} timed out") from None


class Signer(ABC):
    """Base class of every format. Subclasses set ``formats`` to the wire names they serve."""

    formats: ClassVar[tuple[str, ...]] = ()
    #: wire names whose output is a detached signature, with the file suffix clients add
    detached_suffix: ClassVar[Mapping[str, str]] = {}
    #: one-line description of the independent verifier, for docs and the demo table
    verifier: ClassVar[str] = ""
    #: False for signers that never touch ``request.work_dir`` (it is then not created)
    uses_work_dir: ClassVar[bool] = True
    #: True for signers that only compute (no child process): small jobs then run in the
    #: server's signing worker processes
    in_process: ClassVar[bool] = False

    def __init__(self, settings: FormatSettings, keys: KeyResolver) -> None:
        self.settings = settings
        self.format = settings.name

    @abstractmethod
    def sign(self, request: SignRequest) -> None:
        """Sign ``request.input`` into ``request.output``."""

    @classmethod
    def available(cls) -> str | None:
        """None if this format can run on this host, else why not (shown at start-up)."""
        return None

    @classmethod
    @abstractmethod
    def dev_setup(cls, ctx: DevContext) -> dict[str, dict[str, Any]]:
        """Create dev keys for this family; return ``{wire_name: format config section}``."""

    @classmethod
    @abstractmethod
    def verify(cls, fmt: str, signed: Path, original: Path | None, public_dir: Path) -> str:
        """Verify an output with the independent verifier using a deployment's public halves.

        ``signed`` is the output (the detached signature for detached formats, then
        ``original`` is the signed data). Returns the command that verified it; raises
        :class:`~sealbox.errors.VerificationFailed` with the verifier's reason.
        """
