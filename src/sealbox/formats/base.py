"""The signer interface every format implements.

A signer is built from its format's config section and a key resolver, and is blind to
where its key lives. It signs one input file into one output file. It raises
:class:`~sealbox.errors.FormatRejected` when the input can never be signed (the server
remembers that and clients stop retrying) and :class:`~sealbox.errors.SigningFailed`
for anything that might succeed on another attempt.

A result is named by (format, sha1 of the input) alone, so signing depends on the content
only: rules about the uploaded file's *name* belong in :meth:`Signer.refuse_name`, which the
upload handler applies and the server never remembers.
"""

from __future__ import annotations

import hashlib
import subprocess
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import ConfigError, FormatRejected, SigningFailed, VerificationFailed
from ..hashing import CHUNK
from ..keys import SigningKey, ToolSecrets
from ..procs import ToolResult, run_process
from ..procs import child_env as child_env  # the formats' tools get this environment
from ..wire import Family, of_family

if TYPE_CHECKING:
    from ..deploy.context import DevContext

__all__ = [
    "FormatSettings",
    "KeyResolver",
    "SignRequest",
    "Signer",
    "child_env",
    "public_file",
    "run_tool",
    "run_verifier",
]

#: a key by name: formats sign through its interface only, blind to where it lives
KeyResolver = Callable[[str], SigningKey]


@dataclass(frozen=True)
class SignRequest:
    """One signing job. ``digests`` holds hash states over the input computed while it was
    received (keys are hashlib names); use :meth:`hash_state` rather than re-reading."""

    input: Path
    output: Path
    #: the name of *some* upload of these bytes (maybe under another format, or an earlier
    #: output's): never base a decision or a reason on it (that is :meth:`Signer.refuse_name`'s
    #: job); it may only name a scratch file a tool needs
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
        """The path option ``option``, relative to the config's folder; None if absent and not required."""
        value = self.options.get(option)
        if value is None:
            if required:
                raise ConfigError(f"format '{self.name}': option '{option}' is required")
            return None
        p = Path(str(value))
        return p if p.is_absolute() else self.base_dir / p

    def get(self, option: str, default: Any = None) -> Any:
        """The raw value of the format option ``option``."""
        return self.options.get(option, default)

    def require_key(self) -> str:
        """The name of this format's key; a format that signs needs one."""
        if self.key is None:
            raise ConfigError(f"format '{self.name}': 'key' is required")
        return self.key


def public_file(public_dir: Path, name: str) -> Path:
    """``public_dir/name``, a public half a verifier needs; VerificationFailed naming it if the
    folder does not hold it (rather than the verifier's own words for a missing file)."""
    path = public_dir / name
    if not path.is_file():
        raise VerificationFailed(f"{path} is missing (is {public_dir} a deployment's public/ folder?)")
    return path


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


def verifier_failed(
    what: str, res: subprocess.CompletedProcess[bytes], text: bytes | None = None
) -> VerificationFailed:
    """The refusal of verifier ``what``: its exit status and the last line of ``text`` (its
    stderr unless given)."""
    lines = (res.stderr if text is None else text).decode(errors="replace").strip().splitlines()
    return VerificationFailed(f"{what} (exit {res.returncode}): {lines[-1] if lines else 'failed'}")


def run_tool(
    argv: Sequence[str],
    *,
    what: str,
    timeout: float,
    cwd: Path | None = None,
    secrets: ToolSecrets | None = None,
    env: Mapping[str, str] | None = None,
    malformed: Callable[[str], bool] | Sequence[str] = (),
    check: bool = True,
) -> ToolResult:
    """Run a signing tool (see :func:`sealbox.procs.run_process`) and return how it ended.

    ``secrets`` are handed over as their ``/dev/fd/N`` paths (in ``argv``): the child inherits
    those descriptors only, and the parent's ends close as soon as it has started. ``env``
    defaults to :func:`child_env` with ``cwd`` as home. Not starting or a timeout (the tool's
    whole process group is then killed) raise :class:`~sealbox.errors.SigningFailed`. With
    ``check``, a non-zero exit raises too: :class:`~sealbox.errors.FormatRejected` when the
    output shows the input is malformed (``malformed``: a predicate on the output, or markers
    any of which it contains), else :class:`~sealbox.errors.SigningFailed`.
    """
    result = run_process(
        argv,
        what=what,
        timeout=timeout,
        failure=SigningFailed,
        env=env if env is not None else child_env(cwd or "/nonexistent"),
        cwd=cwd,
        pass_fds=secrets.fds if secrets is not None else (),
        started=secrets.close_parent_ends if secrets is not None else None,
    )
    if check and result.returncode != 0:
        message = f"{what} failed (exit {result.returncode}): {result.reason}"
        if callable(malformed):
            rejected = malformed(result.output)
        else:
            rejected = any(marker in result.output for marker in malformed)
        raise (FormatRejected if rejected else SigningFailed)(message)
    return result


class Signer(ABC):
    """Base class of every format. Subclasses set ``family``; what they serve comes from the
    family's rows in :data:`sealbox.wire.TABLE`."""

    #: the family's rows in sealbox.wire.TABLE give the three attributes below
    family: ClassVar[Family]
    #: the wire names served
    formats: ClassVar[tuple[str, ...]] = ()
    #: wire names whose output is a detached signature, with the file suffix clients add
    detached_suffix: ClassVar[Mapping[str, str]] = {}
    #: True for signers that only compute (no child process): small jobs then run in the
    #: server's signing worker processes
    in_process: ClassVar[bool] = False
    #: one-line description of the independent verifier, for docs and the demo table
    verifier: ClassVar[str] = ""
    #: False for signers that never touch ``request.work_dir`` (it is then not created: a
    #: folder made and removed per job costs milliseconds on some file systems); a signer may
    #: set it per instance, for the names it serves
    uses_work_dir: bool = True
    #: True: signs the SHA-256 of its input alone (from :meth:`SignRequest.hash_state`), so the
    #: server keeps a big upload's digests, taken as it arrives, and not its bytes
    digest_only: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        rows = of_family(cls.family)
        if not rows:
            raise TypeError(f"{cls.__name__}: family {cls.family!r} has no row in sealbox.wire.TABLE")
        cls.formats = tuple(f.name for f in rows)
        cls.detached_suffix = {f.name: f.detached_suffix for f in rows if f.detached_suffix}
        cls.in_process = all(f.in_process for f in rows)

    def __init__(self, settings: FormatSettings, keys: KeyResolver) -> None:
        self.settings = settings
        self.format = settings.name

    def refuse_name(self, filename: str) -> str | None:
        """Why this format will not accept an upload of this *name* (None: it will).

        Checked by the upload handler before any of the file is read, answered as a 4xx and
        never remembered: the same bytes under another name may be signed. Not applied when a
        job runs for content the server already holds (a GET of a (format, sha1) whose input is
        stored, e.g. uploaded for another format or an earlier output): that request carries no
        name, and the output is the same as after an upload.
        """
        return None

    @abstractmethod
    def sign(self, request: SignRequest) -> None:
        """Sign ``request.input`` into ``request.output``, deciding by its content alone.

        :class:`~sealbox.errors.FormatRejected` reasons must not mention ``request.filename``:
        they are replayed to every later upload of the same bytes, whatever its name."""

    @classmethod
    def available(cls) -> str | None:
        """None if this format can run on this host, else why not (shown at start-up)."""
        return None

    def unserved(self) -> Mapping[str, str]:
        """Kinds of input this format signs elsewhere but not on this host (its tool is too
        old), each with why; they are refused. Start-up logs them, the heartbeat warns."""
        return {}

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
