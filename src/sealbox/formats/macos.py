"""``dmg`` (clients' ``macapp``/``dmgv2`` travel as ``dmg``): macOS ``.app`` bundles in a tar.gz.

The input tarball is unpacked safely (:mod:`sealbox.archives`; relative in-tree symlinks
are kept because frameworks need them), every top-level ``*.app`` folder is signed by the
configured ``signer_command`` (the bundle's absolute path is appended; one call per
bundle, cwd = the unpacked folder, minimal environment, timeout, process group killed on
timeout), and the tree is re-packed as tar.gz (sorted, owned by root).

Real signing needs Apple's ``codesign`` on a macOS host. Dev deployments configure the
clearly labelled STAND-IN signer from :mod:`sealbox.samples.macos` instead, which is not
Apple code signing; :meth:`MacAppSigner.verify` checks stand-in signatures, and real
signatures only on macOS (``codesign --verify --deep --strict``).

In ``signer_command``, an argument containing ``{key}`` gets it replaced by a ``/dev/fd/N``
path that yields the configured key (unencrypted PKCS#8 PEM followed by its certificate
chain) once, through a pipe: nothing touches disk, argv or the environment.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import serialization

from ..archives import DEFAULT_MAX_MEMBERS, DEFAULT_MAX_TOTAL, repack_tar, safe_extract_tar
from ..errors import ConfigError, FormatRejected, SigningFailed, VerificationFailed
from ..keys.handoff import ToolSecrets
from ..keys.store import UnlockedKey
from ..samples import macos as stand_in
from .base import FormatSettings, KeyResolver, Signer, SignRequest, child_env

if TYPE_CHECKING:
    from ..deploy.dev import DevContext

NEEDS_MACOS = (
    "macOS code signing needs codesign on a macOS host; set formats.dmg.signer_command to a signing command"
)
#: exit status with which a signer command says the bundle itself is unusable (EX_DATAERR)
EX_DATAERR = 65
KEY_PLACEHOLDER = "{key}"
_OPTIONS = {"signer_command", "timeout", "max_unpacked_size", "max_members", "stand_in"}
_STAND_IN_PEM = "dmg-standin.pem"
STAND_IN_MODULE = "sealbox.samples.macos"


def _positive_int(settings: FormatSettings, option: str, default: int) -> int:
    value = settings.get(option, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"format '{settings.name}': '{option}' must be a positive integer")
    return value


def _top_level_apps(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.name.endswith(".app") and p.is_dir() and not p.is_symlink())


def _last_line(data: bytes) -> str:
    lines = data.decode("utf-8", errors="replace").strip().splitlines()
    return lines[-1][:300] if lines else "no message"


def _codesign_env() -> dict[str, str]:
    # codesign finds the signing keychain through HOME, so this tool keeps the real one.
    return child_env(os.environ.get("HOME", "/"))


class MacAppSigner(Signer):
    formats = ("dmg",)
    verifier = (
        "real: codesign --verify --deep --strict APP (macOS only); stand-in: python -m sealbox.samples.macos "
        "verify-stand-in --public-key public/dmg-standin.pem APP"
    )
    #: dev deployments configure the stand-in signer, so they need no macOS host
    dev_without_tool = True

    def __init__(self, settings: FormatSettings, keys: KeyResolver) -> None:
        super().__init__(settings, keys)
        unknown = set(settings.options) - _OPTIONS
        if unknown:
            raise ConfigError(f"format '{settings.name}': unknown option(s) {', '.join(sorted(unknown))}")
        command = settings.get("signer_command")
        if not command:
            raise ConfigError(NEEDS_MACOS)
        if not isinstance(command, list) or not all(isinstance(a, str) and a for a in command):
            raise ConfigError(
                f"format '{settings.name}': 'signer_command' must be a list of non-empty strings"
            )
        if "/" in command[0] and not Path(command[0]).is_absolute():
            command = [str(settings.base_dir / command[0]), *command[1:]]
        if shutil.which(command[0]) is None:
            raise ConfigError(f"format '{settings.name}': signer command {command[0]!r} not found")
        self._command: list[str] = list(command)
        self._uses_key = any(KEY_PLACEHOLDER in a for a in command)
        self._key: UnlockedKey | None = keys(settings.key) if settings.key else None
        if self._uses_key and self._key is None:
            raise ConfigError(
                f"format '{settings.name}': signer_command uses {KEY_PLACEHOLDER} but no 'key' is set"
            )
        if self._key is not None and not self._uses_key:
            raise ConfigError(
                f"format '{settings.name}': 'key' is set but signer_command has no {KEY_PLACEHOLDER} argument"
            )
        timeout = settings.get("timeout", 300)
        if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0:
            raise ConfigError(f"format '{settings.name}': 'timeout' must be a positive number of seconds")
        self._timeout = float(timeout)
        self._max_total = _positive_int(settings, "max_unpacked_size", DEFAULT_MAX_TOTAL)
        self._max_members = _positive_int(settings, "max_members", DEFAULT_MAX_MEMBERS)

    @classmethod
    def available(cls) -> str | None:
        if sys.platform != "darwin" or shutil.which("codesign") is None:
            return NEEDS_MACOS
        return None

    # -- signing -----------------------------------------------------------------------
    def sign(self, request: SignRequest) -> None:
        unpacked = request.work_dir / "dmg-unpacked"
        safe_extract_tar(
            request.input, unpacked, max_total=self._max_total, max_members=self._max_members,
            allow_symlinks=True, compressions=("gz",),
        )  # fmt: skip
        apps = _top_level_apps(unpacked)
        if not apps:
            raise FormatRejected("no .app bundle at the top level of the tarball")
        for app in apps:
            contents = app / "Contents"
            if not contents.is_dir() or contents.is_symlink():
                raise FormatRejected(f"{app.name} has no Contents folder")
        for app in apps:
            self._run(app.resolve(), unpacked)
        packed = request.work_dir / "dmg-signed.tar.gz"
        repack_tar(unpacked, packed, "gz")
        shutil.move(packed, request.output)

    def _key_blob(self) -> bytes:
        assert self._key is not None
        pem = self._key.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return pem + b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self._key.chain)

    def _run(self, app: Path, cwd: Path) -> None:
        blobs = (self._key_blob(),) if self._uses_key else ()
        with ToolSecrets(*blobs) as secrets:
            argv = [a.replace(KEY_PLACEHOLDER, secrets.paths[0]) if blobs else a for a in self._command]
            try:
                proc = subprocess.Popen(
                    [*argv, str(app)], cwd=cwd, env=_codesign_env(), stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=secrets.fds,
                    start_new_session=True,
                )  # fmt: skip
            except OSError as e:
                raise SigningFailed(f"cannot start signer command {argv[0]!r}: {e.strerror}") from None
            secrets.close_parent_ends()
            try:
                _out, err = proc.communicate(timeout=self._timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
                raise SigningFailed(
                    f"signer command timed out after {self._timeout:g} s on {app.name}"
                ) from None
        if proc.returncode == EX_DATAERR:
            raise FormatRejected(f"{app.name}: signer refused the bundle: {_last_line(err)}")
        if proc.returncode != 0:
            raise SigningFailed(
                f"{app.name}: signer command exited with {proc.returncode}: {_last_line(err)}"
            )

    # -- dev keys and verification ----------------------------------------------------------
    @classmethod
    def dev_setup(cls, ctx: DevContext) -> dict[str, dict[str, Any]]:
        key = ctx.rsa(2048)
        name = ctx.add_key("dmg-standin", key)
        public = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        ctx.write_public(
            _STAND_IN_PEM, public,
            "STAND-IN dmg signatures only (NOT Apple code signing): tar xzf FILE && "
            "python -m sealbox.samples.macos verify-stand-in --public-key public/dmg-standin.pem *.app",
        )  # fmt: skip
        ctx.write_public("dmg-standin.txt", _STAND_IN_NOTE.format(level=ctx.level).encode())
        # -I: isolated mode. Without it ``python -m`` would put the cwd (the unpacked, untrusted
        # tarball) first on sys.path, and a member named e.g. ``cryptography/`` would be imported.
        command = [sys.executable, "-I", "-m", STAND_IN_MODULE, "stand-in-codesign", "--key", KEY_PLACEHOLDER]
        return {"dmg": {"key": name, "stand_in": True, "signer_command": command}}

    @classmethod
    def verify(cls, fmt: str, signed: Path, original: Path | None, public_dir: Path) -> str:
        with tempfile.TemporaryDirectory(prefix="sbdmg") as tmp:
            apps = _unpack_for_verify(signed, Path(tmp) / "signed")
            if original is not None:
                before = [a.name for a in _unpack_for_verify(original, Path(tmp) / "original", signed=False)]
                if before != [a.name for a in apps]:
                    raise VerificationFailed(
                        f"bundles differ from the input: {before} -> {[a.name for a in apps]}"
                    )
            used: set[str] = set()
            for app in apps:
                used.add(_verify_app(app, public_dir))
        return " + ".join(sorted(used))


def _unpack_for_verify(path: Path, dest: Path, signed: bool = True) -> list[Path]:
    try:
        safe_extract_tar(path, dest, allow_symlinks=True, compressions=("gz",))
    except FormatRejected as e:
        raise VerificationFailed(f"{'output' if signed else 'input'}: {e}") from None
    apps = _top_level_apps(dest)
    if not apps:
        raise VerificationFailed("no .app bundle at the top level of the tarball")
    return apps


def _verify_app(app: Path, public_dir: Path) -> str:
    try:
        stored = stand_in.read_stand_in(app)
        if stored is not None:
            pem_path = public_dir / _STAND_IN_PEM
            try:
                pem = pem_path.read_bytes()
            except OSError as e:
                raise VerificationFailed(f"cannot read {pem_path}: {e.strerror}") from None
            stand_in.stand_in_verify(app, pem)
            return f"sealbox.samples.macos verify-stand-in --public-key {_STAND_IN_PEM} (STAND-IN)"
    except stand_in.StandInError as e:
        raise VerificationFailed(str(e)) from None
    codesign = shutil.which("codesign")
    if sys.platform != "darwin" or codesign is None:
        raise VerificationFailed(f"{app.name}: real codesign signatures can only be verified on macOS")
    res = subprocess.run(
        [codesign, "--verify", "--deep", "--strict", "--verbose=2", str(app)],
        capture_output=True, check=False, env=_codesign_env(), timeout=300,
    )  # fmt: skip
    if res.returncode != 0:
        raise VerificationFailed(f"codesign --verify: {_last_line(res.stderr)}")
    return "codesign --verify --deep --strict"


_STAND_IN_NOTE = """\
dmg (macOS .app) signing in this '{level}' dev deployment uses a STAND-IN signer.

It is NOT Apple code signing: macOS, Gatekeeper and `codesign --verify` will not accept
its output. It exists so that the dmg plumbing (safe unpacking, one signer call per
top-level .app, key handed over a pipe, re-packing, verification) runs and is tested
on any host. Real signing needs Apple's codesign on a macOS host: set
formats.dmg.signer_command to a codesign command there (see docs/formats/macos.md).

Each signed bundle gets Contents/_CodeSignature/CodeResources: a plist holding a
manifest (SHA-256 of every file, symlink targets) and an RSA PKCS#1 v1.5 SHA-256
signature over the manifest, made with the dev key 'dmg-standin'. Check it with:

    tar xzf SIGNED.tar.gz
    python -m sealbox.samples.macos verify-stand-in --public-key public/dmg-standin.pem *.app
"""
