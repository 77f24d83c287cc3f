"""``gpg``: detached ASCII-armoured OpenPGP signatures (SHA-256), made in-process."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import VerificationFailed
from ..keys import HashName
from . import _openpgp, _pgpkeys
from .base import FormatSettings, KeyResolver, Signer, SignRequest, child_env, public_file, run_verifier

if TYPE_CHECKING:
    from ..deploy.context import DevContext

HASH: HashName = "sha256"


class GpgSigner(Signer):
    family = "gpg"
    verifier = "gpg --verify FILE.asc FILE (key: public/gpg.asc)"
    uses_work_dir = False
    digest_only = True  # a detached signature over the SHA-256 taken as the upload arrived

    def __init__(self, settings: FormatSettings, keys: KeyResolver) -> None:
        super().__init__(settings, keys)
        self._key, self._pub = _pgpkeys.load(settings, keys)

    def sign(self, request: SignRequest) -> None:
        sig = _openpgp.detached_signature(
            self._key, self._pub, request.hash_state(HASH), HASH, int(time.time())
        )
        request.output.write_bytes(sig)

    @classmethod
    def dev_setup(cls, ctx: DevContext) -> dict[str, dict[str, Any]]:
        key = ctx.signing_key("gpg", 3072)
        name = key.name
        block = _openpgp.public_key_block(
            key, f"sealbox {ctx.level} signing key <sealbox-{ctx.level}@example.invalid>", int(time.time())
        )
        ctx.write_public("gpg.asc", block, "gpg --import public/gpg.asc && gpg --verify FILE.asc FILE")
        return {"gpg": {"key": name, "public_key": "public/gpg.asc"}}

    @classmethod
    def verify(cls, fmt: str, signed: Path, original: Path | None, public_dir: Path) -> str:
        if original is None:
            raise VerificationFailed("gpg signatures are detached: the signed file is needed too")
        gpg = shutil.which("gpg")
        if gpg is None:
            raise VerificationFailed("gpg is not installed")
        keys = public_file(public_dir, "gpg.asc")
        with _pgpkeys.scratch("sbg") as home:
            base = [gpg, "--homedir", str(home), "--batch", "--no-tty"]
            try:
                env = child_env(home)
                imp = run_verifier([*base, "--import", str(keys)], "gpg --import", 60, env)
                if imp.returncode != 0:
                    why = imp.stderr.decode(errors="replace").strip()
                    raise VerificationFailed(f"gpg --import failed: {why}")
                argv = [*base, "--status-fd", "1", "--verify", str(signed), str(original)]
                res = run_verifier(argv, "gpg --verify", 60, env)
            finally:
                subprocess.run(
                    ["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True, check=False
                )
        status = res.stdout.decode(errors="replace")
        if res.returncode != 0 or "[GNUPG:] VALIDSIG" not in status:
            reason = res.stderr.decode(errors="replace").strip().splitlines()
            raise VerificationFailed(f"gpg --verify: {reason[-1] if reason else 'failed'}")
        return "gpg --verify"
