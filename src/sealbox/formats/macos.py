"""Apple code signing on Linux: ``dmg`` (clients' ``macapp``/``dmgv2`` travel as ``dmg``) and ``macho``.

``dmg`` takes a tar.gz holding ``.app`` bundles (or other bundles: ``.framework``, ``.bundle``,
``.plugin``, ``.xpc``, ``.appex``) and/or bare Mach-O files, anywhere in the tree. The tree is
unpacked under the shared archive rules (:mod:`sealbox.archives`: members confined, sizes and
counts bounded, in-tree relative links only), each bundle and each bare Mach-O outside a bundle
is signed in place, and the tree is re-packed (sorted, owned by root, modes kept). ``macho``
takes one Mach-O file (executable, dylib, bundle ``.so``; thin or universal) and returns it signed.

Signing is apple-platform-py (pinned 0.1.0: apple-codesign 0.29.0, rcodesign's crates, through
a native library in this process). It signs nested code inside out (frameworks, helpers,
plug-ins, then the enclosing bundle), writes ``_CodeSignature/CodeResources``, and signs every
slice of a universal binary. Per format options:

* ``hardened_runtime`` (default true): the hardened-runtime flag on every signed Mach-O;
* ``entitlements``: ``dmg``: a table ``{"Path/In/Tree.app" = "file.plist", ...}``, a bundle's
  path applies to its main executable, a Mach-O's path to that file; ``macho``: one file;
* ``identifier_prefix``: codesign's ``--prefix``: put before identifiers not taken from an
  Info.plist when they have no dot. Identifiers: a bundle's executable gets its
  ``CFBundleIdentifier``; other Mach-O files in a bundle their file name; a bare Mach-O the
  identifier its existing signature carries (ld64's linker signature names the output file),
  else (``dmg``) its file name or (``macho``) its dylib install name; a ``macho`` input with
  neither is refused (results are keyed by content, so the upload's name cannot be used);
* ``digests`` (default ``["sha256"]``): CodeDirectory hashes. As codesign does, the library
  adds a SHA-1 primary CodeDirectory for binaries whose deployment target predates SHA-256;
* ``timestamp_url``: the RFC 3161 server (default Apple's; ``"none"`` for no timestamp);
* ``dmg`` only: ``max_unpacked_size``, ``max_members``.

The key goes to the library as PEM through a pipe (``/dev/fd/N`` of this process, see
:class:`~sealbox.keys.ToolSecrets`): never on disk, in argv or the environment. The
library takes keys from files, PKCS#12 or a remote-signing session only (this build has no
smartcard/PKCS#11 support): a key it cannot use stops start-up with a message naming it.

Verification (:meth:`MacSigner.verify`) never uses the library: :mod:`._macho` re-checks
every hash and runs ``openssl cms -verify`` against ``public/macapp-ca.pem``.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import plistlib
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import serialization

from ..archives import DEFAULT_MAX_MEMBERS, DEFAULT_MAX_TOTAL, repack_tar, safe_extract_tar
from ..errors import ConfigError, FormatRejected, SigningFailed, VerificationFailed
from ..keys import FileHandoff, ToolSecrets
from ._macho import (
    BUNDLE_SUFFIXES,
    MachOFormatError,
    TreeVerifier,
    existing_identifier,
    is_macho_head,
    read_slices,
)
from ._macho import path_identifier as _path_identifier
from .base import FormatSettings, KeyResolver, Signer, SignRequest, public_file

if TYPE_CHECKING:
    from ..deploy.context import DevContext

#: the library version this module is written and tested against (pyproject pins it)
LIBRARY = "apple-platform-py 0.1.0"
APPLE_TSA = "http://timestamp.apple.com/ts01"
CA_FILE = "macapp-ca.pem"
#: optional: the TSA's root, for deployments whose outputs carry timestamps
TSA_CA_FILE = "macapp-tsa-ca.pem"
DIGESTS = ("sha1", "sha256", "sha384")
_COMMON_OPTIONS = {"hardened_runtime", "timestamp_url", "digests", "entitlements", "identifier_prefix"}
_OPTIONS = {
    "dmg": _COMMON_OPTIONS | {"max_unpacked_size", "max_members"},
    "macho": _COMMON_OPTIONS,
}
_PREFIX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]*$")
_HEAD = 8


def _library() -> Any:
    """The signing library, imported on first use (a 29 MB native library)."""
    import apple_platform

    return apple_platform


def _positive_int(settings: FormatSettings, option: str, default: int) -> int:
    value = settings.get(option, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"format '{settings.name}': '{option}' must be a positive integer")
    return value


def _plist_file(settings: FormatSettings, value: object, what: str) -> bytes:
    """An entitlements plist named in the config (XML or binary), as the XML the library takes."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"format '{settings.name}': {what} must name a plist file")
    path = Path(value) if Path(value).is_absolute() else settings.base_dir / value
    try:
        data = path.read_bytes()
        parsed = plistlib.loads(data)
    except OSError as e:
        raise ConfigError(f"format '{settings.name}': {what}: cannot read {path}: {e.strerror}") from None
    except Exception as e:  # plistlib raises expat, value and type errors on bad input
        raise ConfigError(f"format '{settings.name}': {what}: {path} is not a plist: {e}") from None
    if not isinstance(parsed, dict):
        raise ConfigError(f"format '{settings.name}': {what}: {path} is not a plist dictionary")
    return plistlib.dumps(parsed, fmt=plistlib.FMT_XML)


def _is_macho(path: Path) -> bool:
    with path.open("rb") as f:
        return is_macho_head(f.read(_HEAD))


def _walk(root: Path, into_bundles: bool = True) -> Iterator[tuple[Path, bool]]:
    """(path, is a real directory) of everything under ``root``, without following links
    (and without entering bundles unless ``into_bundles``)."""
    stack = [root]
    while stack:
        d = stack.pop()
        for entry in sorted(os.scandir(d), key=lambda e: e.name):
            is_dir = entry.is_dir(follow_symlinks=False)
            yield Path(entry.path), is_dir
            if is_dir and (into_bundles or not entry.name.endswith(BUNDLE_SUFFIXES)):
                stack.append(Path(entry.path))


class MacSigner(Signer):
    family = "macos"
    verifier = (
        f"openssl cms -verify -CAfile public/{CA_FILE} + sealbox Mach-O checks (page hashes, special "
        "slots, CodeResources, nested code; sealbox.formats._macho, independent of the signing library)"
    )

    def __init__(self, settings: FormatSettings, keys: KeyResolver) -> None:
        super().__init__(settings, keys)
        fmt = settings.name
        unknown = set(settings.options) - _OPTIONS[fmt]
        if unknown:
            raise ConfigError(f"format '{fmt}': unknown option(s) {', '.join(sorted(unknown))}")
        hardened = settings.get("hardened_runtime", True)
        if not isinstance(hardened, bool):
            raise ConfigError(f"format '{fmt}': 'hardened_runtime' must be true or false")
        self._flags = ["runtime"] if hardened else []
        url = settings.get("timestamp_url", APPLE_TSA)
        if url != "none" and not (isinstance(url, str) and url.startswith(("http://", "https://"))):
            raise ConfigError(f"format '{fmt}': 'timestamp_url' must be an http(s) URL or \"none\"")
        self._timestamp_url: str = url
        digests = settings.get("digests", ["sha256"])
        if not isinstance(digests, list) or not digests or not set(digests) <= set(DIGESTS):
            raise ConfigError(f"format '{fmt}': 'digests' must be a non-empty list of {', '.join(DIGESTS)}")
        self._digests: list[str] = list(digests)
        prefix = settings.get("identifier_prefix")
        if prefix is not None and not (isinstance(prefix, str) and _PREFIX.match(prefix)):
            raise ConfigError(f"format '{fmt}': 'identifier_prefix' must be like 'org.example.'")
        self._prefix: str | None = prefix
        self._entitlements = self._read_entitlements(settings)
        # a lone Mach-O needs a scratch folder only to hand the library its entitlements
        self.uses_work_dir = fmt != "macho" or bool(self._entitlements)
        self._max_total = _positive_int(settings, "max_unpacked_size", DEFAULT_MAX_TOTAL)
        self._max_members = _positive_int(settings, "max_members", DEFAULT_MAX_MEMBERS)
        self._key_pem = self._key_blob(keys, settings.require_key())
        self._prove_key(settings.require_key())

    # -- configuration ---------------------------------------------------------------------
    def _read_entitlements(self, settings: FormatSettings) -> dict[str, bytes]:
        value = settings.get("entitlements")
        if value is None:
            return {}
        if settings.name == "macho":
            return {".": _plist_file(settings, value, "'entitlements'")}
        if not isinstance(value, dict):
            raise ConfigError(
                f"format '{settings.name}': 'entitlements' must be a table of path = plist file"
            )
        out = {}
        for rel, file in value.items():
            parts = rel.split("/")
            if not rel or rel.startswith("/") or "" in parts or "." in parts or ".." in parts:
                raise ConfigError(f"format '{settings.name}': entitlements path {rel!r} must be relative")
            out[rel] = _plist_file(settings, file, f"entitlements for {rel!r}")
        return out

    def _key_blob(self, keys: KeyResolver, name: str) -> bytes:
        """The key and its chain as PEM, for the library (RSA or ECDSA, as Apple accepts)."""
        key = keys(name)
        if key.algorithm not in ("rsa", "ec"):
            raise ConfigError(
                f"format '{self.format}': key '{name}' is an {key.algorithm} key; "
                "Apple code signing needs an RSA or ECDSA key"
            )
        if not key.chain:
            raise ConfigError(
                f"format '{self.format}': key '{name}' needs its certificate chain (leaf first)"
            )
        handoff = key.tool_handoff()
        if not isinstance(handoff, FileHandoff):
            raise ConfigError(
                f"format '{self.format}': key '{name}' is in a PKCS#11 token; {LIBRARY} takes keys as "
                "PEM or PKCS#12 only (no PKCS#11/smartcard in this build) and a key is never exported: "
                "give this format a key file"
            )
        try:
            pem = handoff.pkcs8_pem()  # only ever written into the library's pipe
        except (ValueError, TypeError) as e:
            raise ConfigError(
                f"format '{self.format}': key '{name}' cannot be handed to {LIBRARY}, which takes keys "
                f"as PEM or PKCS#12 only (no PKCS#11/smartcard in this build): {e}"
            ) from None
        return pem + b"".join(c.public_bytes(serialization.Encoding.PEM) for c in key.chain)

    def _prove_key(self, name: str) -> None:
        """Sign a synthetic Mach-O once: a key the library cannot use stops start-up here."""
        ap = _library()
        try:
            with self._signer() as signer:
                ap.sign_macho_bytes(
                    ap.macho.create_synthetic("aarch64", "executable"), signer=signer,
                    binary_identifier="sealbox.startup-check", timestamp_url="none",
                )  # fmt: skip
        except ap.ApplePlatformError as e:
            raise ConfigError(
                f"format '{self.format}': {LIBRARY} cannot sign with key '{name}': {e}"
            ) from None

    @classmethod
    def available(cls) -> str | None:
        try:
            _library()
        except ImportError as e:
            return f"macOS code signing needs {LIBRARY} (x86_64 Linux wheels only): {e}"
        return None

    # -- signing -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _signer(self) -> Iterator[Any]:
        """A library ``Signer`` that reads the PEM key from a pipe (``/dev/fd/N``), once."""
        ap = _library()
        with ToolSecrets(self._key_pem) as secrets:
            yield ap.Signer(pem=ap.PemKey(files=[secrets.paths[0]]))

    def sign(self, request: SignRequest) -> None:
        if self.format == "macho":
            self._sign_macho(request)
        else:
            self._sign_tree(request)

    def _sign_macho(self, request: SignRequest) -> None:
        try:
            with request.input.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                identifier = existing_identifier(data)  # parses every slice: malformed input stops here
        except (MachOFormatError, ValueError) as e:  # mmap of an empty file: ValueError
            raise FormatRejected(f"macho: input is not a well-formed Mach-O file: {e}") from None
        if identifier is None:
            raise FormatRejected(
                "macho: the file carries no identifier (no existing signature, no dylib install name); "
                "sign it inside a tar.gz with 'macapp' so its file name can serve"
            )
        options = self._options(".", request.work_dir.absolute())
        # Straight to the output: the server discards it unless signing succeeds. (The library's
        # in-memory call adds no SHA-1 code directory for old deployment targets, as codesign
        # and its path call do: older macOS needs one.)
        self._call(request.input.absolute(), request.output.absolute(), "the Mach-O file",
                   self._prefixed(identifier), options)  # fmt: skip

    def _sign_tree(self, request: SignRequest) -> None:
        work = request.work_dir.absolute()
        tree = work / "tree"
        safe_extract_tar(
            request.input, tree, max_total=self._max_total, max_members=self._max_members,
            allow_symlinks=True, compressions=("gz",),
        )  # fmt: skip
        bundles, bare = [], []
        for path, is_dir in _walk(tree, into_bundles=False):
            if is_dir and path.name.endswith(BUNDLE_SUFFIXES):
                bundles.append(path)
            elif not is_dir and path.is_file() and not path.is_symlink() and _is_macho(path):
                bare.append(path)
        if not bundles and not bare:
            raise FormatRejected("dmg: the tarball holds no .app (or other) bundle and no Mach-O file")
        for bundle in bundles:
            self._sign_bundle(bundle, bundle.relative_to(tree).as_posix(), work)
        for path in bare:
            rel = path.relative_to(tree).as_posix()
            try:
                identifier = existing_identifier(path.read_bytes()) or _path_identifier(path.name)
            except MachOFormatError as e:
                raise FormatRejected(f"dmg: {rel!r} is not a well-formed Mach-O file: {e}") from None
            self._call(path, None, repr(rel), self._prefixed(identifier), self._options(rel, work))
        packed = work / "signed.tar.gz"
        repack_tar(tree, packed, "gz")
        shutil.move(packed, request.output)

    def _sign_bundle(self, bundle: Path, rel: str, work: Path) -> None:
        """One bundle with everything in it: per-file settings scoped by path in the bundle."""
        _check_bundle(bundle, rel)
        ap = _library()
        paths: dict[str, Any] = {}
        for path, is_dir in _walk(bundle):
            inner = path.relative_to(bundle).as_posix()
            if not is_dir and not path.is_symlink() and path.is_file() and _is_macho(path):
                ident = self._prefixed(_path_identifier(path.name)) if self._prefix else None
                paths[inner] = ap.PathSettings(
                    code_signature_flags=self._flags, digests=self._digests, binary_identifier=ident,
                    entitlements_xml_file=self._entitlement_file(f"{rel}/{inner}", work),
                )  # fmt: skip
            elif is_dir and f"{rel}/{inner}" in self._entitlements:  # a nested bundle's executable
                paths[inner] = ap.PathSettings(
                    entitlements_xml_file=self._entitlement_file(f"{rel}/{inner}", work)
                )
        paths["@main"] = ap.PathSettings(
            code_signature_flags=self._flags, digests=self._digests,
            entitlements_xml_file=self._entitlement_file(rel, work),
        )  # fmt: skip
        self._call(bundle, None, f"bundle {rel!r}", None, {"paths": paths})

    def _options(self, rel: str, work: Path) -> dict[str, Any]:
        """Settings of a Mach-O signed on its own (``rel``: its path, for entitlements)."""
        return {
            "code_signature_flags": self._flags,
            "digests": self._digests,
            "entitlements_xml_file": self._entitlement_file(rel, work),
        }

    def _entitlement_file(self, rel: str, work: Path) -> str | None:
        data = self._entitlements.get(rel)
        if data is None:
            return None
        path = work / "entitlements" / f"{hashlib.sha256(data).hexdigest()[:16]}.plist"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        return str(path)

    def _prefixed(self, identifier: str) -> str:
        # codesign --prefix: only identifiers without a dot get the prefix
        if self._prefix and "." not in identifier:
            return self._prefix + identifier
        return identifier

    def _call(
        self, target: Path, out: Path | None, what: str, identifier: str | None, options: dict[str, Any]
    ) -> None:
        ap = _library()
        try:
            with self._signer() as signer:
                ap.sign(
                    target, out, signer=signer, binary_identifier=identifier,
                    timestamp_url=self._timestamp_url, **options,
                )  # fmt: skip
        except ap.ApplePlatformError as e:
            if _transient(ap, e):
                raise SigningFailed(f"{self.format}: {what}: {LIBRARY}: {_message(e)}") from None
            raise FormatRejected(f"{self.format}: {what} cannot be signed: {_message(e)}") from None

    # -- dev keys and verification ------------------------------------------------------------
    @classmethod
    def dev_setup(cls, ctx: DevContext) -> dict[str, dict[str, Any]]:
        root = ctx.code_signing_ca()
        leaf = ctx.issue("sealbox macOS code signing")  # code-signing EKU
        name = ctx.add_key("macos", leaf.key, chain=[leaf.cert, root.cert])
        ctx.write_public(
            CA_FILE, root.cert_pem(),
            "sealbox verify --format macapp|macho --public public FILE "
            "(Mach-O hashes + openssl cms -verify -CAfile public/macapp-ca.pem)",
        )  # fmt: skip
        # Dev deployments stay offline: no timestamp server (production uses Apple's).
        section = {"key": name, "timestamp_url": "none"}
        return {"dmg": dict(section), "macho": dict(section)}

    @classmethod
    def verify(cls, fmt: str, signed: Path, original: Path | None, public_dir: Path) -> str:
        ca = public_file(public_dir, CA_FILE)
        tsa = public_dir / TSA_CA_FILE
        with tempfile.TemporaryDirectory(prefix="sbmac") as tmp:
            try:
                with TreeVerifier(ca, tsa if tsa.is_file() else None) as verifier:
                    if fmt == "macho":
                        if original is not None and _archs(original) != _archs(signed):
                            raise VerificationFailed("the output's architectures differ from the input's")
                        report = verifier.verify_file(signed)
                    else:
                        tree = _unpack_for_verify(signed, Path(tmp) / "signed", "output")
                        if original is not None:
                            _same_tree(_unpack_for_verify(original, Path(tmp) / "input", "input"), tree)
                        report = verifier.verify_tree(tree)
            except (ValueError, OSError) as e:
                raise VerificationFailed(str(e)) from None
        return f"openssl cms -verify -CAfile {ca} + sealbox Mach-O checks ({report.summary()})"


def _transient(ap: Any, e: Exception) -> bool:
    """Whether another attempt may succeed. The library is deterministic for one input, key and
    config (all checked at start-up): only the network (the TSA), the file system, the key's
    store and the library's own faults can change; anything else is about the input."""
    errors = ap.errors
    kinds = (errors.TimestampError, errors.IoError, errors.InternalPanicError, errors.PrivateKeyError)
    text = " ".join([str(e), *map(str, getattr(e, "source", []))])
    return isinstance(e, (*kinds, errors.CertificateError)) or any(m in text for m in ("Time-Stamp", "HTTP"))


def _message(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


def _check_bundle(bundle: Path, rel: str) -> None:
    """A bundle to sign has an Info.plist naming its identifier and an executable that is there
    (``X.app/Contents/MacOS/E``, ``X.framework/Versions/Current/E`` or ``X.bundle/E``)."""
    if (bundle / "Contents").is_dir():
        info_path, exe_dir = bundle / "Contents" / "Info.plist", bundle / "Contents" / "MacOS"
    elif (bundle / "Versions").is_dir():
        exe_dir = bundle / "Versions" / "Current"
        info_path = exe_dir / "Resources" / "Info.plist"
    else:
        exe_dir = bundle
        info_path = (
            bundle / "Info.plist" if (bundle / "Info.plist").is_file() else bundle / "Resources/Info.plist"
        )
    try:
        info = plistlib.loads(info_path.read_bytes())
    except Exception:  # missing, or plistlib's expat, value and type errors on bad input
        info = None
    if not isinstance(info, dict) or not isinstance(info.get("CFBundleIdentifier"), str):
        raise FormatRejected(f"dmg: bundle {rel!r} has no Info.plist with a CFBundleIdentifier")
    exe = info.get("CFBundleExecutable")
    if not isinstance(exe, str) or not exe or "/" in exe or not (exe_dir / exe).is_file():
        raise FormatRejected(f"dmg: bundle {rel!r}: the executable its Info.plist names is not there")


def _archs(path: Path) -> list[int]:
    return [s.cputype for s in read_slices(path.read_bytes())]


def _unpack_for_verify(path: Path, dest: Path, what: str) -> Path:
    try:
        safe_extract_tar(path, dest, allow_symlinks=True, compressions=("gz",))
    except (FormatRejected, SigningFailed) as e:
        raise VerificationFailed(f"{what}: {e}") from None
    return dest


def _entries(root: Path) -> dict[str, tuple[str, int]]:
    out = {}
    for path, _ in _walk(root):
        st = os.lstat(path)
        kind = "link" if stat.S_ISLNK(st.st_mode) else "dir" if stat.S_ISDIR(st.st_mode) else "file"
        out[path.relative_to(root).as_posix()] = (kind, stat.S_IMODE(st.st_mode))
    return out


def _same_tree(before_root: Path, after_root: Path) -> None:
    """The output holds the input's tree (same kinds and modes) plus signatures only."""
    before, after = _entries(before_root), _entries(after_root)
    for rel, (kind, mode) in before.items():
        if rel not in after:
            raise VerificationFailed(f"{rel!r} of the input is missing from the output")
        if after[rel] != (kind, mode):
            raise VerificationFailed(
                f"{rel!r} changed from {kind} {mode:o} to {after[rel][0]} {after[rel][1]:o}"
            )
    for rel in after.keys() - before.keys():
        if "_CodeSignature" not in rel.split("/"):
            raise VerificationFailed(f"the output adds {rel!r}, which is not a signature")
