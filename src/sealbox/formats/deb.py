"""``deb``: a debsigs origin signature, made in-process.

A ``.deb`` is an ``ar`` archive: ``debian-binary``, ``control.tar[.*]``, ``data.tar[.*]``, then
optional ``_``-named members. The signature is ``debsigs --sign=origin``'s: a ``_gpgorigin``
member appended at the end, holding a binary detached OpenPGP signature over the contents of
those three members concatenated in that order. An existing ``_gpgorigin`` is replaced; other
members are kept byte for byte. The archive is checked strictly first (a malformed one is
refused): magic, every header field, sizes inside the file, padding, member count, names, order.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from ..errors import FormatRejected
from ..hashing import copy_hashed
from ..keys import HashName
from ..procs import child_env
from . import _openpgp, _pgpkeys
from .base import FormatSettings, KeyResolver, Signer, SignRequest, run_verifier, verifier_failed

if TYPE_CHECKING:
    from ..deploy.context import DevContext

HASH: HashName = "sha256"
AR_MAGIC = b"!<arch>\n"
ORIGIN = "_gpgorigin"
#: a .deb has three members plus a few signatures (_gpgorigin, _gpgbuilder, _gpgmaint...)
MAX_MEMBERS = 16
_CONTROL = re.compile(r"control\.tar(\.gz|\.xz|\.zst)?")
_DATA = re.compile(r"data\.tar(\.gz|\.xz|\.bz2|\.lzma|\.zst)?")
_NAME = re.compile(r"[A-Za-z0-9_.+-]{1,16}")
_DIGITS = {10: re.compile(rb"[0-9]+ *"), 8: re.compile(rb"[0-7]+ *")}


@dataclass(frozen=True)
class Member:
    name: str
    #: where its 60-byte header starts; its data follows, padded to an even length
    start: int
    size: int

    @property
    def data(self) -> int:
        return self.start + 60

    @property
    def end(self) -> int:
        return self.data + self.size + self.size % 2


def _field(raw: bytes, what: str, at: int, base: int = 10) -> int:
    """A numeric header field (digits, space-padded); refuses anything else."""
    if not _DIGITS[base].fullmatch(raw):
        raise FormatRejected(f"malformed .deb: member header at byte {at} has a bad {what} field")
    return int(raw.rstrip(b" "), base)


def _member(f: IO[bytes], at: int, size: int) -> Member:
    head = f.read(60)
    if len(head) < 60 or head[58:60] != b"`\n":
        raise FormatRejected(f"malformed .deb: truncated or bad ar member header at byte {at}")
    name = head[:16].rstrip(b" ").decode("ascii", "replace")
    name = name[:-1] if name.endswith("/") else name  # GNU ar's terminator
    if not _NAME.fullmatch(name):
        raise FormatRejected(f"malformed .deb: ar member at byte {at} has an unexpected name")
    _field(head[16:28], "date", at)
    _field(head[28:34], "owner", at)
    _field(head[34:40], "group", at)
    _field(head[40:48], "mode", at, 8)
    member = Member(name, at, _field(head[48:58], "size", at))
    if member.end > size:
        raise FormatRejected(f"malformed .deb: member {name} runs past the end of the file")
    if member.size % 2:
        f.seek(member.data + member.size)
        if f.read(1) != b"\n":
            raise FormatRejected(f"malformed .deb: member {name} is not padded with a newline")
    f.seek(member.end)
    return member


def members(path: Path) -> list[Member]:
    """The members of the .deb at ``path``, checked: refuses anything but a well-formed
    binary package archive."""
    size = path.stat().st_size
    found: list[Member] = []
    with path.open("rb") as f:
        if f.read(8) != AR_MAGIC:
            raise FormatRejected("not a .deb: no ar archive magic")
        at = 8
        while at < size:
            if len(found) == MAX_MEMBERS:
                raise FormatRejected(f"malformed .deb: more than {MAX_MEMBERS} ar members")
            found.append(_member(f, at, size))
            at = found[-1].end
        if len(found) >= 1 and found[0].name == "debian-binary" and found[0].size <= 64:
            f.seek(found[0].data)
            version = f.read(found[0].size)
            if not version.startswith(b"2.") or not version.endswith(b"\n"):
                raise FormatRejected("unsupported .deb: debian-binary is not a 2.x format version")
    names = [m.name for m in found]
    if (
        len(found) < 3
        or names[0] != "debian-binary"
        or not _CONTROL.fullmatch(names[1])
        or not _DATA.fullmatch(names[2])
        or found[0].size > 64
    ):
        raise FormatRejected("not a binary .deb: expected debian-binary, control.tar*, data.tar* first")
    extra = names[3:]
    if any(not n.startswith("_") for n in extra) or len(set(extra)) != len(extra):
        raise FormatRejected("malformed .deb: unexpected or repeated members after data.tar*")
    return found


def ar_header(name: str, size: int, mtime: int) -> bytes:
    """A 60-byte ar member header, as ``ar`` writes it (no GNU slash, as after debsigs' fixup)."""
    return b"%-16s%-12d%-6d%-6d%-8s%-10d`\n" % (name.encode(), mtime, 0, 0, b"100644", size)


class DebSigner(Signer):
    family = "deb"
    verifier = "debsig-verify (policy and keyring for public/deb.asc)"
    uses_work_dir = False

    def __init__(self, settings: FormatSettings, keys: KeyResolver) -> None:
        super().__init__(settings, keys)
        self._key, self._pub = _pgpkeys.load(settings, keys)

    def sign(self, request: SignRequest) -> None:
        found = members(request.input)
        h = hashlib.new(HASH)
        created = int(time.time())
        with request.input.open("rb") as src, request.output.open("wb") as out:
            for m in found[:3]:
                src.seek(m.data)
                copy_hashed(src, None, m.size, h)
            sig = _openpgp.signature_packet(self._key, self._pub, h, HASH, created)
            out.write(AR_MAGIC)
            for m in found:
                if m.name != ORIGIN:
                    src.seek(m.start)
                    copy_hashed(src, out, m.end - m.start)
            out.write(ar_header(ORIGIN, len(sig), created) + sig + b"\n" * (len(sig) % 2))

    @classmethod
    def dev_setup(cls, ctx: DevContext) -> dict[str, dict[str, Any]]:
        readme = (
            "debsig-verify with a policy naming it (docs/formats/deb.md), after "
            "gpg --dearmor into keyrings/KEYID/deb.pgp"
        )
        public = _pgpkeys.dev_key(ctx, "deb", "package signing key", readme)
        return {"deb": {"key": "deb", "public_key": public}}

    @classmethod
    def verify(cls, fmt: str, signed: Path, original: Path | None, public_dir: Path) -> str:
        pub, keyring = _pgpkeys.public_key(public_dir, "deb")
        key_id = pub.key_id.hex().upper()
        with _pgpkeys.scratch("sbd") as tmp:
            (tmp / "policies" / key_id).mkdir(parents=True)
            (tmp / "keyrings" / key_id).mkdir(parents=True)
            (tmp / "keyrings" / key_id / "deb.pgp").write_bytes(keyring)
            (tmp / "policies" / key_id / "sealbox.pol").write_text(policy(pub.fingerprint.hex().upper()))
            argv = [
                "debsig-verify",
                "--policies-dir",
                str(tmp / "policies"),
                "--keyrings-dir",
                str(tmp / "keyrings"),
                str(signed),
            ]
            res = run_verifier(argv, "debsig-verify", 60, child_env(tmp))
        if res.returncode != 0:
            raise verifier_failed("debsig-verify", res, res.stdout + res.stderr)
        return "debsig-verify"


def policy(fingerprint: str, keyring: str = "deb.pgp") -> str:
    """A debsig-verify policy that accepts origin signatures by this key only."""
    rule = f'<Required Type="origin" File="{keyring}" id="{fingerprint}"/>'
    return (
        '<?xml version="1.0"?>\n'
        '<!DOCTYPE Policy SYSTEM "https://www.debian.org/debsig/1.0/policy.dtd">\n'
        '<Policy xmlns="https://www.debian.org/debsig/1.0/">\n'
        f'  <Origin Name="sealbox" id="{fingerprint}" Description="sealbox deb signing key"/>\n'
        f"  <Selection>{rule}</Selection>\n"
        f'  <Verification MinOptional="0">{rule}</Verification>\n'
        "</Policy>\n"
    )
