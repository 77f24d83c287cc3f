"""``SHA256SUMS`` / ``SHA512SUMS`` files in GNU coreutils format, and their verification.

Each line is ``<hex digest><two spaces><name>``: text mode, names relative to a base
folder with ``/`` separators, sorted. A name holding a backslash, a newline or a carriage
return is written the GNU way: the line starts with ``\\`` and the name has ``\\\\``,
``\\n`` and ``\\r`` in their place (what ``sha256sum`` itself prints, and what ``sha256sum -c``
reads, coreutils 9.1 and later). The files are plain inputs for the ``gpg`` format, which
adds a detached ``SHA256SUMS.asc``.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath

from ..errors import VerificationFailed

__all__ = ["SUMS_FILES", "parse_checksums", "verify_checksums", "write_checksums"]

#: file name of the sums file for each supported algorithm
SUMS_FILES = {"sha256": "SHA256SUMS", "sha512": "SHA512SUMS", "sha384": "SHA384SUMS", "sha1": "SHA1SUMS"}
_HEX_LEN = {"sha1": 40, "sha256": 64, "sha384": 96, "sha512": 128}
_CHUNK = 1 << 20
_LINE = re.compile(r"^(\\?)([0-9a-fA-F]+) ([ *])(.+)$", re.DOTALL)


def _digests(path: Path, algorithms: Iterable[str]) -> dict[str, str]:
    """Hex digests of one file under several algorithms, reading it once."""
    algorithms = list(algorithms)
    if len(algorithms) == 1:
        with path.open("rb") as f:
            return {algorithms[0]: hashlib.file_digest(f, algorithms[0]).hexdigest()}
    states = {a: hashlib.new(a) for a in algorithms}
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with path.open("rb") as f:
        while n := f.readinto(buf):
            for h in states.values():
                h.update(view[:n])
    return {a: h.hexdigest() for a, h in states.items()}


def _escape(name: str) -> tuple[str, str]:
    """(line prefix, escaped name) as GNU coreutils writes them."""
    if not any(c in name for c in "\\\n\r"):
        return "", name
    return "\\", name.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def _unescape(name: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(name):
        c = name[i]
        if c == "\\":
            nxt = name[i + 1 : i + 2]
            if nxt not in ("\\", "n", "r"):
                raise ValueError(f"bad escape in name {name!r}")
            out.append({"\\": "\\", "n": "\n", "r": "\r"}[nxt])
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _relative_name(path: Path, base: Path) -> str:
    try:
        rel = path.resolve().relative_to(base.resolve())
    except ValueError:
        raise ValueError(f"{path} is not inside {base}") from None
    return rel.as_posix()


def write_checksums(
    files: Sequence[Path],
    out_dir: Path,
    base: Path,
    algorithms: Sequence[str] = ("sha256", "sha512"),
) -> list[Path]:
    """Write one coreutils-format sums file per algorithm into ``out_dir``; return their paths.

    Names are relative to ``base`` (every file must lie under it), sorted, with ``/``
    separators; the sums files themselves are left out if they appear in ``files``. Each
    file is read once whatever the number of algorithms. Raises ValueError for a file
    outside ``base``, a folder, an unknown algorithm or an empty list; OSError when a file
    cannot be read."""
    for a in algorithms:
        if a not in SUMS_FILES:
            raise ValueError(f"unsupported checksum algorithm {a!r} (use {', '.join(SUMS_FILES)})")
    outputs = [out_dir / SUMS_FILES[a] for a in algorithms]
    skip = {o.resolve() for o in outputs} | {(out_dir / n).resolve() for n in SUMS_FILES.values()}
    entries: dict[str, Path] = {}
    for f in files:
        if f.resolve() in skip:
            continue
        if not f.is_file():
            raise ValueError(f"{f} is not a regular file")
        name = _relative_name(f, base)
        if name in entries:
            continue
        entries[name] = f
    if not entries:
        raise ValueError("no files to list in the checksums files")
    lines: dict[str, list[str]] = {a: [] for a in algorithms}
    for name in sorted(entries):
        digests = _digests(entries[name], algorithms)
        prefix, escaped = _escape(name)
        for a in algorithms:
            lines[a].append(f"{prefix}{digests[a]}  {escaped}\n")
    out_dir.mkdir(parents=True, exist_ok=True)
    for a, out in zip(algorithms, outputs, strict=True):
        tmp = out.with_name(f".{out.name}.tmp")
        with tmp.open("w", encoding="utf-8", newline="\n") as fh:
            fh.writelines(lines[a])
        os.replace(tmp, out)
    return outputs


def parse_checksums(sums_file: Path) -> list[tuple[str, str, str]]:
    """``(algorithm, hex digest, name)`` for each line of a coreutils-format sums file.

    The algorithm comes from the digest length. Raises VerificationFailed on a malformed
    line or an empty file."""
    try:
        text = sums_file.read_bytes().decode("utf-8")
    except OSError as e:
        raise VerificationFailed(f"cannot read {sums_file.name}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise VerificationFailed(f"{sums_file.name} is not UTF-8 text") from None
    by_len = {n: a for a, n in _HEX_LEN.items()}
    out: list[tuple[str, str, str]] = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line:
            continue
        m = _LINE.match(line)
        if m is None or len(m.group(2)) not in by_len:
            raise VerificationFailed(f"{sums_file.name}:{number}: not a '<hex>  <name>' line")
        escaped, digest, _mode, name = m.groups()
        if escaped:
            try:
                name = _unescape(name)
            except ValueError as e:
                raise VerificationFailed(f"{sums_file.name}:{number}: {e}") from None
        out.append((by_len[len(digest)], digest.lower(), name))
    if not out:
        raise VerificationFailed(f"{sums_file.name} lists no files")
    return out


def verify_checksums(sums_file: Path, base: Path | None = None) -> None:
    """Check every line of a sums file against the files it names (relative to ``base``,
    default: the sums file's folder), like ``sha256sum -c --strict``.

    Names must be relative and free of ``..``. Raises VerificationFailed naming the first
    file that is missing or does not match."""
    root = sums_file.parent if base is None else base
    for algorithm, digest, name in parse_checksums(sums_file):
        rel = PurePosixPath(name)
        if rel.is_absolute() or ".." in rel.parts:
            raise VerificationFailed(f"{sums_file.name}: refusing the name {name!r} (absolute or '..')")
        path = root.joinpath(*rel.parts)
        try:
            actual = _digests(path, [algorithm])[algorithm]
        except OSError as e:
            raise VerificationFailed(f"{sums_file.name}: {name}: {e.strerror}") from None
        if actual != digest:
            raise VerificationFailed(f"{sums_file.name}: {name}: {algorithm} mismatch")
