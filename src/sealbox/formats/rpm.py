"""``rpm``: an OpenPGP signature in an RPM's signature header, added by ``rpmsign --addsign``.

rpmsign runs its external signer hook (``%__gpg_sign_cmd``) as ``socat``, which passes the data
to sign (its stdin, to its end) over an inherited socket to a thread of this job and writes what
comes back to the signature file; the thread signs it here through the key interface (a key file
or a token alike): no gpg, no agent, no key outside the server. The thread signs only the exact
main header of the uploaded package. (socat starts in about a millisecond; a Python helper took
18 ms, more than the rest of the job.)
"""

from __future__ import annotations

import contextlib
import hashlib
import shlex
import shutil
import socket
import struct
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import FormatRejected, SigningFailed, VerificationFailed
from ..keys import HashName
from ..procs import child_env, run_process
from . import _openpgp, _pgpkeys
from .base import FormatSettings, KeyResolver, Signer, SignRequest, run_verifier

if TYPE_CHECKING:
    from ..deploy.context import DevContext

HASH: HashName = "sha256"
LEAD = 96
_LEAD_MAGIC = b"\xed\xab\xee\xdb"
_HEADER_MAGIC = b"\x8e\xad\xe8\x01\x00\x00\x00\x00"
#: rpm's own bounds on a header (lib/header.c: 256 MiB of data, 64 Ki... entries here)
MAX_HEADER = 256 * 1024 * 1024
MAX_ENTRIES = 65536
#: rpmsign messages that mean the package itself is bad, not a hiccup
MALFORMED = ("not an rpm package", "read failed", "bad magic")
#: signature header tags of the size of main header + payload (int32, int64)
_SIZE_TAGS = {1000: (4, ">I"), 270: (5, ">Q")}


def _header_at(f: Any, offset: int, size: int, what: str) -> tuple[int, int]:
    """(offset, length) of the header structure at ``offset``; refuses a malformed one."""
    f.seek(offset)
    head = f.read(16)
    if len(head) < 16 or head[:8] != _HEADER_MAGIC:
        raise FormatRejected(f"not an RPM package: no {what} header at byte {offset}")
    entries, data = struct.unpack(">II", head[8:])
    length = 16 + 16 * entries + data
    if entries == 0 or entries > MAX_ENTRIES or length > MAX_HEADER:
        raise FormatRejected(f"malformed RPM package: {what} header of {entries} entries, {data} bytes")
    if offset + length > size:
        raise FormatRejected(f"malformed RPM package: truncated in its {what} header")
    return offset, length


def main_header(path: Path) -> bytes:
    """The main header of the RPM at ``path`` (what rpm's header signature covers), after the
    lead and signature header have been checked."""
    size = path.stat().st_size
    with path.open("rb") as f:
        lead = f.read(LEAD)
        if len(lead) < LEAD or lead[:4] != _LEAD_MAGIC:
            raise FormatRejected("not an RPM package: no RPM lead")
        if lead[4] not in (3, 4):
            raise FormatRejected(f"unsupported RPM package format version {lead[4]}")
        sig_at, sig_len = _header_at(f, LEAD, size, "signature")
        f.seek(sig_at)
        signature = f.read(sig_len)
        at, length = _header_at(f, sig_at + (sig_len + 7) // 8 * 8, size, "main")
        f.seek(at)
        header = f.read(length)
    declared = _declared_size(signature)
    if declared is not None and at + declared != size:
        raise FormatRejected(
            f"malformed RPM package: {size - at} bytes of header and payload, not {declared}"
        )
    return header


def _declared_size(signature: bytes) -> int | None:
    """The size of main header + payload the signature header records, if it does."""
    (entries,) = struct.unpack(">I", signature[8:12])
    store = 16 + 16 * entries
    for i in range(entries):
        tag, kind, offset, _count = struct.unpack(">IIII", signature[16 + 16 * i : 32 + 16 * i])
        if tag in _SIZE_TAGS and kind == _SIZE_TAGS[tag][0]:
            fmt = _SIZE_TAGS[tag][1]
            end = store + offset + struct.calcsize(fmt)
            if end > len(signature):
                raise FormatRejected(
                    "malformed RPM package: its size entry lies outside the signature header"
                )
            return int(struct.unpack(fmt, signature[store + offset : end])[0])
    return None


class _Hook:
    """The job's end of the socket rpmsign's hook talks to: a thread that reads one request (all
    the hook sends, to its shutdown) and answers a signature over the expected header, or
    nothing (a refusal: the hook writes an empty signature file and rpmsign fails; the job
    reports :attr:`error`)."""

    def __init__(self, key: Any, pub: _openpgp.PublicKey, header: bytes) -> None:
        self._key, self._pub, self._header = key, pub, header
        self.ours, self.theirs = socket.socketpair()
        self.error: str | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> _Hook:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.theirs.close()
        with contextlib.suppress(OSError):
            self.ours.shutdown(socket.SHUT_RDWR)
        self._thread.join(30)
        self.ours.close()

    def _request(self) -> bytes | None:
        """Everything the hook sends, or None if it is more than a header can be."""
        buf = bytearray()
        while chunk := self.ours.recv(1 << 16):
            buf += chunk
            if len(buf) > MAX_HEADER:
                return None
        return bytes(buf)

    def _answer(self, data: bytes) -> bytes:
        if data != self._header:
            self.error = "rpmsign asked to sign something other than the package's header"
            return b""
        try:
            return _openpgp.signature_packet(
                self._key, self._pub, hashlib.new(HASH, data), HASH, int(time.time())
            )
        except Exception as e:  # reported by the job (the key gone, a token error)
            self.error = f"signing the header failed: {e}"
            return b""

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            data = self._request()
            if data is None:
                self.error = "rpmsign sent more than a header"
                return
            self.ours.sendall(self._answer(data))
            self.ours.shutdown(socket.SHUT_WR)  # the hook's end of the answer


class RpmSigner(Signer):
    family = "rpm"
    verifier = "rpmkeys --checksig (public/rpm.asc imported into a private rpmdb)"

    def __init__(self, settings: FormatSettings, keys: KeyResolver) -> None:
        super().__init__(settings, keys)
        self._key, self._pub = _pgpkeys.load(settings, keys)
        self._tool = str(settings.get("rpmsign") or shutil.which("rpmsign") or "rpmsign")
        self._socat = shlex.quote(shutil.which("socat") or "socat")
        self._timeout = float(settings.get("timeout", 120))

    @classmethod
    def available(cls) -> str | None:
        if not shutil.which("rpmsign"):
            return "rpmsign is not installed (Debian: rpm)"
        return None if shutil.which("socat") else "socat is not installed (Debian: socat)"

    def _argv(self, fd: int, target: Path) -> list[str]:
        def literal(s: str) -> str:  # a word for popt, with rpm's macro character escaped
            return shlex.quote(s).replace("%", "%%")

        # rpm runs the first word with the rest as argv; the shell only redirects socat's output
        # to the signature file ($1: no path reaches socat's own address syntax). socat sends its
        # stdin, shuts the socket down for writing (our end sees the request's end), and writes
        # the answer until our end shuts down, or gives up after the job's timeout.
        script = f'exec {self._socat} -t {self._timeout:g} STDIO FD:{fd},shut-down > "$1"'
        hook = f"/bin/sh sh -c {literal(script)} sh %{{shescape:%{{__signature_filename}}}}"
        return [
            self._tool,
            "--addsign",
            "--define",
            f"_gpg_name {self._pub.fingerprint.hex().upper()}",
            "--define",
            f"__gpg_sign_cmd {hook}",
            str(target),
        ]

    def sign(self, request: SignRequest) -> None:
        header = main_header(request.input)
        target = request.work_dir / "package.rpm"
        shutil.copyfile(request.input, target)
        with _Hook(self._key, self._pub, header) as hook:
            fd = hook.theirs.fileno()
            res = run_process(
                self._argv(fd, target),
                what=f"{self.format}: rpmsign",
                timeout=self._timeout,
                failure=SigningFailed,
                env=child_env(request.work_dir),
                cwd=request.work_dir,
                pass_fds=(fd,),
                started=hook.theirs.close,
            )
        if res.returncode != 0:
            reason = hook.error or res.reason
            message = f"{self.format}: rpmsign failed (exit {res.returncode}): {reason}"
            if hook.error is None and any(m in res.output.lower() for m in MALFORMED):
                raise FormatRejected(message)
            raise SigningFailed(message)
        shutil.move(target, request.output)

    @classmethod
    def dev_setup(cls, ctx: DevContext) -> dict[str, dict[str, Any]]:
        readme = "rpmkeys --dbpath DB --import public/rpm.asc && rpmkeys --dbpath DB --checksig FILE.rpm"
        public = _pgpkeys.dev_key(ctx, "rpm", "RPM signing key", readme)
        return {"rpm": {"key": "rpm", "public_key": public}}

    @classmethod
    def verify(cls, fmt: str, signed: Path, original: Path | None, public_dir: Path) -> str:
        pub, _ = _pgpkeys.public_key(public_dir, "rpm")
        with _pgpkeys.scratch("sbr") as tmp:
            env = child_env(tmp)
            base = ["rpmkeys", "--dbpath", str(tmp / "db")]
            imp = run_verifier([*base, "--import", str(public_dir / "rpm.asc")], "rpmkeys --import", 60, env)
            if imp.returncode != 0:
                raise VerificationFailed(
                    f"rpmkeys --import failed: {imp.stderr.decode(errors='replace').strip()}"
                )
            res = run_verifier([*base, "--checksig", "-v", str(signed)], "rpmkeys --checksig", 60, env)
        out = (res.stdout + res.stderr).decode(errors="replace")
        key_id = pub.key_id[-4:].hex()  # rpm prints the short key ID
        good = [ln for ln in out.splitlines() if "Signature, key ID" in ln and ln.rstrip().endswith(": OK")]
        bad = [ln.strip() for ln in out.splitlines() if "NOT OK" in ln or "NOKEY" in ln]
        if res.returncode != 0 or bad or not any(key_id in ln for ln in good):
            raise VerificationFailed(f"rpmkeys --checksig: {'; '.join(bad) or out.strip() or 'no signature'}")
        return "rpmkeys --checksig"
