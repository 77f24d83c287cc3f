"""``apt-inrelease`` and ``apt-release-gpg``: an APT repository's ``Release`` file signed, in-process.

A repository publishes two signed forms of its ``Release``: ``InRelease``, the file clear-signed
(RFC 4880 section 7), and ``Release.gpg``, an armoured detached signature (``gpg -abs``). One
wire name each, so every upload still gets one output: ``apt-inrelease`` answers the
``InRelease`` text, ``apt-release-gpg`` the detached signature (suffix ``.gpg``). The task runner
asks for both and writes them beside the ``Release``. The input must be a ``Release`` file: one
deb822 paragraph of UTF-8 text (fields and continuation lines, no control characters).
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import FormatRejected, VerificationFailed
from ..keys import HashName
from ..procs import child_env
from . import _openpgp, _pgpkeys
from .base import FormatSettings, KeyResolver, Signer, SignRequest, run_verifier, verifier_failed

if TYPE_CHECKING:
    from ..deploy.context import DevContext

HASH: HashName = "sha256"
#: Debian's largest Release files are a few hundred KiB
MAX_RELEASE = 16 * 1024 * 1024
INRELEASE, RELEASE_GPG = "apt-inrelease", "apt-release-gpg"
# a deb822 field (a name without spaces or colons, not starting with '#' or '-') or a continuation
_LINE = re.compile(r"[!-\"$-,.-9;-~][!-9;-~]*:.*|[ \t].*")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def release_text(path: Path) -> str:
    """The ``Release`` file at ``path`` as text; refuses anything that is not one."""
    if path.stat().st_size > MAX_RELEASE:
        raise FormatRejected(f"not a Release file: larger than {MAX_RELEASE} bytes")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatRejected(f"not a Release file: not UTF-8 text (byte {e.start})") from None
    if (bad := _CONTROL.search(text)) is not None:
        raise FormatRejected(
            f"not a Release file: control character {ord(bad.group()):#04x} at {bad.start()}"
        )
    lines = (text[:-1] if text.endswith("\n") else text).split("\n")
    if not text or not _LINE.fullmatch(lines[0]) or lines[0][0] in " \t":
        raise FormatRejected("not a Release file: it does not start with a field")
    for n, line in enumerate(lines, 1):
        if not _LINE.fullmatch(line):
            raise FormatRejected(f"not a Release file: line {n} is not a field or a continuation line")
    return text


class AptSigner(Signer):
    family = "apt"
    verifier = "gpgv --keyring KEYRING (InRelease; Release.gpg with sqv too)"
    uses_work_dir = False

    def __init__(self, settings: FormatSettings, keys: KeyResolver) -> None:
        super().__init__(settings, keys)
        self._key, self._pub = _pgpkeys.load(settings, keys)

    def sign(self, request: SignRequest) -> None:
        text = release_text(request.input)
        created = int(time.time())
        if self.format == INRELEASE:
            out = _openpgp.clearsigned(self._key, self._pub, text, HASH, created)
        else:
            out = _openpgp.detached_signature(self._key, self._pub, request.hash_state(HASH), HASH, created)
        request.output.write_bytes(out)

    @classmethod
    def dev_setup(cls, ctx: DevContext) -> dict[str, dict[str, Any]]:
        readme = "gpg --dearmor < public/apt.asc > apt.gpg && gpgv --keyring ./apt.gpg InRelease"
        public = _pgpkeys.dev_key(ctx, "apt", "repository signing key", readme)
        section = {"key": "apt", "public_key": public}
        return {INRELEASE: dict(section), RELEASE_GPG: dict(section)}

    @classmethod
    def verify(cls, fmt: str, signed: Path, original: Path | None, public_dir: Path) -> str:
        if fmt == RELEASE_GPG and original is None:
            raise VerificationFailed("Release.gpg is detached: the Release file is needed too")
        _, keyring = _pgpkeys.public_key(public_dir, "apt")
        with _pgpkeys.scratch("sba") as tmp:
            (tmp / "apt.gpg").write_bytes(keyring)
            argv = ["gpgv", "--homedir", str(tmp), "--keyring", str(tmp / "apt.gpg"), "--status-fd", "1"]
            if fmt == INRELEASE:
                argv += ["--output", str(tmp / "text"), str(signed)]
            else:
                argv += [str(signed), str(original)]
            res = run_verifier(argv, "gpgv", 60, child_env(tmp))
            if res.returncode != 0 or b"[GNUPG:] VALIDSIG" not in res.stdout:
                raise verifier_failed("gpgv", res)
            if fmt == INRELEASE:
                text = (tmp / "text").read_bytes()
                if original is not None and original.read_bytes() not in (text, text + b"\n"):
                    raise VerificationFailed("gpgv: the InRelease text is not the Release file")
                return "gpgv"
        return "gpgv" + _sqv(signed, original, public_dir)


def _sqv(signature: Path, data: Path | None, public_dir: Path) -> str:
    """Also check a detached signature with sqv (what apt uses from Debian 13 on), if installed."""
    if data is None or shutil.which("sqv") is None:
        return ""
    argv = ["sqv", "--keyring", str(public_dir / "apt.asc"), str(signature), str(data)]
    res = run_verifier(argv, "sqv", 60, child_env())
    if res.returncode != 0:
        raise verifier_failed("sqv", res)
    return " + sqv"
