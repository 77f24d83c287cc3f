"""Per-format packaging done by the task runner around the signing servers.

Each behaviour is a small function. Those that look inside an archive come in two halves:
an ``inspect_*`` that runs on the original input before any token is requested (it extracts
under the archive rules of :mod:`sealbox.archives` and decides what will be signed, so a
traversal, a bomb or "nothing to sign" fails the task early), and a ``sign_*`` that runs
later on the current bytes of the file, signing through ``sign_one(source, fmt, dest)``.
"""

from __future__ import annotations

import difflib
import os
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

from ..archives import (
    detect_tar_compression,
    repack_tar,
    repack_zip,
    safe_extract_tar,
    safe_extract_zip,
)
from ..errors import FormatRejected, SealboxError, SigningFailed
from ..procs import child_env, run_process
from ..winfiles import is_msi_bytes, is_pe_bytes, is_signable_name, is_signed
from ..wire import TABLE, for_task

#: ``sign_one(source, fmt, dest)``: sign one file with one format (raises on failure)
SignOne = Callable[[Path, str, Path], None]

# Which names get which packaging: the ``task`` and ``apk_as`` columns of sealbox.wire.TABLE.
AUTHENTICODE = for_task("authenticode")
WIDEVINE = for_task("widevine")
MACAPP = for_task("macapp")
APK_FORMATS = for_task("apk")
#: an APT repository's ``Release``: InRelease and Release.gpg written beside it
APT = for_task("apt")
APT_RELEASE = "Release"
#: an ``.apk`` asked for under a classic name travels under the APK name with the same key:
#: the classic names sign v1 only (for callers that zipalign), the APK names v1+v2+v3
APK_WIRE_NAMES = {f.name: f.apk_as for f in TABLE if f.apk_as is not None}

#: widevine: files signed with ``widevine_blessed`` (plugin containers) and with ``widevine``
WIDEVINE_BLESSED_NAMES = frozenset({"plugin-container", "plugin-container.exe"})
WIDEVINE_NAMES = frozenset(
    {
        "firefox",
        "firefox-bin",
        "firefox.exe",
        "libxul.so",
        "XUL",
        "xul.dll",
        "clearkey.dll",
        "libclearkey.dylib",
        "libclearkey.so",
    }
)
PRECOMPLETE = "precomplete"
_PRECOMPLETE_SKIP = ("channel-prefs.js", "update-settings.ini")
_TOOL_TIMEOUT = 600

ArchiveKind = Literal["zip", "tar"]


class InputRejected(SealboxError):
    """An input can never be processed as asked (bad archive member, nothing to sign...)."""


class BehaviourFailed(SealboxError):
    """A local step failed (tool missing or crashed, disk full)."""


@dataclass(frozen=True)
class Limits:
    max_total: int
    max_members: int


def wire_format(fmt: str, name: str) -> str:
    """The wire name under which the task format ``fmt`` signs the file called ``name``
    (the task keeps its declared format; only what travels changes)."""
    if name.lower().endswith(".apk"):
        return APK_WIRE_NAMES.get(fmt, fmt)
    return fmt


# -- archives ------------------------------------------------------------------------------


def archive_kind(name: str) -> ArchiveKind | None:
    lower = name.lower()
    if lower.endswith(".zip"):
        return "zip"
    if lower.endswith((".tar.gz", ".tar.bz2", ".tar.xz", ".tgz")):
        return "tar"
    return None


def extract(path: Path, label: str, dest: Path, limits: Limits) -> tuple[ArchiveKind, list[str]]:
    """Extract ``path`` (named ``label`` in errors) safely into ``dest``."""
    kind = archive_kind(label)
    try:
        if kind == "zip":
            return kind, safe_extract_zip(
                path, dest, max_total=limits.max_total, max_members=limits.max_members
            )
        if kind == "tar":
            return kind, safe_extract_tar(
                path,
                dest,
                max_total=limits.max_total,
                max_members=limits.max_members,
                compressions=("gz", "bz2", "xz"),
            )
    except FormatRejected as e:
        raise InputRejected(f"{label}: {e}") from None
    except SigningFailed as e:
        raise BehaviourFailed(f"{label}: {e}") from None
    raise InputRejected(f"{label}: not a .zip, .tar.gz, .tar.bz2 or .tar.xz archive")


def _files(root: Path, names: Sequence[str]) -> list[str]:
    return [n for n in names if (root / n).is_file() and not (root / n).is_symlink()]


def _replace(new: Path, path: Path) -> None:
    os.replace(new, path)


# -- Authenticode on a zip ----------------------------------------------------------------------


def windows_members(root: Path, names: Sequence[str], label: str) -> list[str]:
    """Members that pass the Windows rules: signable name (extension, blocklist), a PE or MSI
    image, not already Authenticode-signed."""
    out = []
    for n in _files(root, names):
        if not is_signable_name(n):
            continue
        p = root / n
        with p.open("rb") as f:
            head = f.read(4096)
        if not (is_pe_bytes(head) or is_msi_bytes(head)):
            raise InputRejected(f"{label}: member {n!r} has a Windows name but is not a PE or MSI file")
        if is_signed(p):
            continue
        out.append(n)
    return out


def inspect_zip_authenticode(path: Path, label: str, scratch: Path, limits: Limits) -> list[str]:
    """What :func:`sign_zip_authenticode` will sign; refuses a zip with nothing to sign."""
    kind, names = extract(path, label, scratch, limits)
    if kind != "zip":
        raise InputRejected(f"{label}: Authenticode applies to .exe, .dll, .msi files or a .zip of them")
    members = windows_members(scratch, names, label)
    if not members:
        raise InputRejected(f"{label}: did not find any files to sign in the zip (Windows rules)")
    return members


def sign_zip_authenticode(
    path: Path, label: str, fmt: str, scratch: Path, limits: Limits, sign_one: SignOne, jobs: int
) -> list[str]:
    """Sign every qualifying member of the zip at ``path`` and rebuild it in place with every
    member, same names, same order (deflated). Returns the signed members."""
    tree = scratch / "tree"
    _, names = extract(path, label, tree, limits)
    members = windows_members(tree, names, label)
    if not members:
        raise InputRejected(f"{label}: did not find any files to sign in the zip (Windows rules)")
    _sign_all([(tree / m, fmt, tree / m) for m in members], sign_one, jobs)
    out = scratch / "rebuilt.zip"
    repack_zip(tree, out, names)
    _replace(out, path)
    return members


def _sign_all(jobs_list: list[tuple[Path, str, Path]], sign_one: SignOne, jobs: int) -> None:
    if len(jobs_list) <= 1 or jobs <= 1:
        for src, fmt, dest in jobs_list:
            sign_one(src, fmt, dest)
        return
    with ThreadPoolExecutor(max_workers=min(jobs, len(jobs_list))) as pool:
        futures = [pool.submit(sign_one, src, fmt, dest) for src, fmt, dest in jobs_list]
        errors = [f.exception() for f in futures]
    for e in errors:
        if e is not None:
            raise e


# -- Widevine in archives -----------------------------------------------------------------------


def widevine_format_for(member: str) -> str | None:
    base = PurePosixPath(member).name
    if base in WIDEVINE_BLESSED_NAMES or base.endswith(" Media Plugin Helper"):
        return "widevine_blessed"
    if base in WIDEVINE_NAMES:
        return "widevine"
    return None


def widevine_sig_name(member: str, kind: ArchiveKind) -> str:
    """``<file>.sig``; in a tarball, a file under a bundle's ``Contents/MacOS/`` gets its
    signature under the last ``Contents/Resources/`` instead."""
    marker = "Contents/MacOS/"
    if kind == "tar":
        padded = "/" + member
        at = padded.rfind("/" + marker)
        if at >= 0:
            start = at  # index in ``member`` of "Contents/MacOS/"
            return member[:start] + "Contents/Resources/" + member[start + len(marker) :] + ".sig"
    return member + ".sig"


@dataclass
class WidevinePlan:
    kind: ArchiveKind
    #: (member, sig member, format)
    targets: list[tuple[str, str, str]] = field(default_factory=list)
    precomplete: str | None = None


def plan_widevine(root: Path, names: Sequence[str], kind: ArchiveKind, label: str) -> WidevinePlan:
    files = _files(root, names)
    present = set(files)
    plan = WidevinePlan(kind)
    for n in files:
        fmt = widevine_format_for(n)
        if fmt is None:
            continue
        sig = widevine_sig_name(n, kind)
        if sig in present:
            continue
        plan.targets.append((n, sig, fmt))
    if plan.targets:
        found = [n for n in files if PurePosixPath(n).name == PRECOMPLETE]
        if len(found) != 1:
            raise InputRejected(f"{label}: found {len(found)} '{PRECOMPLETE}' files, expected exactly one")
        plan.precomplete = found[0]
    return plan


def inspect_widevine(path: Path, label: str, scratch: Path, limits: Limits) -> WidevinePlan:
    kind, names = extract(path, label, scratch, limits)
    return plan_widevine(scratch, names, kind, label)


def precomplete_text(root: Path) -> str:
    """The ``precomplete`` body for the install rooted at ``root`` (Mozilla's rules)."""
    files: set[str] = set()
    dirs: set[str] = set()
    for current, dnames, fnames in os.walk(root):
        rel_dir = Path(current).relative_to(root).as_posix()
        prefix = "" if rel_dir == "." else rel_dir + "/"
        for name in fnames:
            rel = prefix + name
            if rel.endswith(_PRECOMPLETE_SKIP) or "distribution/" in rel:
                continue
            files.add(rel)
        for name in dnames:
            rel = prefix + name + "/"
            if "distribution/" not in rel:
                dirs.add(rel)
    lines = [f'remove "{f}"\n' for f in sorted(files, reverse=True)]
    lines += [f'rmdir "{d}"\n' for d in sorted(dirs, reverse=True)]
    return "".join(lines)


def regenerate_precomplete(tree: Path, member: str) -> tuple[str, str, str]:
    """Rewrite the ``precomplete`` at ``member``; returns (member, old text, new text).

    Inside a macOS bundle (``.../Contents/Resources/precomplete``) the bundle root is the
    install root and the file written is ``Contents/Resources/precomplete`` under it."""
    location = tree / member
    root = location.parent
    if root.name == "Resources" and root.parent.name == "Contents" and root != tree:
        root = root.parent.parent
    target = location
    old = target.read_text(encoding="utf-8", errors="replace")
    target.write_text("", encoding="utf-8")  # exists (listed) before the walk, as upstream does
    new = precomplete_text(root)
    with target.open("w", encoding="utf-8", newline="\n") as f:
        f.write(new)
    return member, old, new


def precomplete_diff(label: str, member: str, old: str, new: str) -> str:
    diff = difflib.unified_diff(
        old.splitlines(keepends=True),
        new.splitlines(keepends=True),
        f"{label}:{member} (before)",
        f"{label}:{member} (after)",
    )
    return "".join(diff)


def sign_widevine_archive(
    path: Path, label: str, scratch: Path, limits: Limits, sign_one: SignOne, jobs: int
) -> tuple[list[str], str]:
    """Add ``.sig`` files for the widevine targets of the archive at ``path``, regenerate its
    ``precomplete`` and repack it in place (root-owned, same compression). Returns the signed
    members and the precomplete diff; leaves the archive untouched when nothing needs signing."""
    tree = scratch / "tree"
    kind, names = extract(path, label, tree, limits)
    plan = plan_widevine(tree, names, kind, label)
    if not plan.targets:
        return [], ""
    work = []
    for member, sig, fmt in plan.targets:
        (tree / sig).parent.mkdir(parents=True, exist_ok=True)
        work.append((tree / member, fmt, tree / sig))
    _sign_all(work, sign_one, jobs)
    assert plan.precomplete is not None
    member, old, new = regenerate_precomplete(tree, plan.precomplete)
    out = scratch / ("rebuilt.tar" if kind == "tar" else "rebuilt.zip")
    if kind == "zip":
        order: list[str] = []
        sigs = {m: s for m, s, _ in plan.targets}
        for n in names:
            order.append(n)
            if n in sigs:
                order.append(sigs[n])
        repack_zip(tree, out, order)
    else:
        compression = detect_tar_compression(path)
        if compression is None:  # pragma: no cover - extract() already recognised it
            raise InputRejected(f"{label}: not a tarball")
        repack_tar(tree, out, compression)
    _replace(out, path)
    return [m for m, _, _ in plan.targets], precomplete_diff(label, member, old, new)


# -- APT repository metadata ----------------------------------------------------------------------


def apt_output(path: str, fmt: str) -> str:
    """Where ``fmt`` puts the signed form of the ``Release`` at ``path``: ``InRelease`` in the
    same folder, or the detached ``Release.gpg`` beside it."""
    if fmt == "apt-inrelease":
        return str(PurePosixPath(path).with_name("InRelease"))
    return path + ".gpg"


# -- macOS: dmg -> tar.gz -------------------------------------------------------------------------


def dmg_output_name(name: str) -> str:
    return name[: -len(".dmg")] + ".tar.gz" if name.lower().endswith(".dmg") else name


def _run_tool(argv: list[str], cwd: Path, what: str) -> None:
    res = run_process(
        argv,
        what=argv[0],
        timeout=_TOOL_TIMEOUT,
        failure=lambda message: BehaviourFailed(f"{what}: {message}"),
        env=child_env(cwd),
        cwd=cwd,
    )
    if res.returncode != 0:
        raise BehaviourFailed(f"{what}: {argv[0]} failed (exit {res.returncode}): {res.reason}")


def _check_tree(root: Path, label: str, limits: Limits) -> None:
    """What the dmg tools unpacked must obey the archive rules too."""
    total = count = 0
    for current, dnames, fnames in os.walk(root):
        for name in dnames + fnames:
            p = Path(current) / name
            rel = p.relative_to(root).as_posix()
            count += 1
            if count > limits.max_members:
                raise InputRejected(f"{label}: more than {limits.max_members} members")
            st = p.lstat()
            if p.is_symlink():
                target = os.readlink(p)
                resolved = (p.parent / target).resolve()
                if target.startswith("/") or not resolved.is_relative_to(root.resolve()):
                    raise InputRejected(f"{label}: member {rel!r} is a link pointing outside ({target!r})")
            elif p.is_file():
                total += st.st_size
                if total > limits.max_total:
                    raise InputRejected(f"{label}: unpacks to more than {limits.max_total} bytes at {rel!r}")
            elif not p.is_dir():
                raise InputRejected(f"{label}: member {rel!r} is a device, fifo or socket")


def dmg_to_tar_gz(
    dmg: Path, out: Path, label: str, tools: tuple[str, str], scratch: Path, limits: Limits
) -> None:
    """``dmg extract X.dmg tmp.hfs``, ``hfsplus tmp.hfs extractall / DIR``, then a root-owned tar.gz."""
    dmg_tool, hfsplus_tool = tools
    scratch.mkdir(parents=True, exist_ok=True)
    tree = scratch / "app"
    tree.mkdir()
    _run_tool([dmg_tool, "extract", str(dmg), "tmp.hfs"], scratch, f"{label}: dmg extract")
    _run_tool(
        [hfsplus_tool, "tmp.hfs", "extractall", "/", str(tree)], scratch, f"{label}: hfsplus extractall"
    )
    _check_tree(tree, label, limits)
    if not any(tree.iterdir()):
        raise InputRejected(f"{label}: the disk image is empty")
    repack_tar(tree, out, "gz")


def tool_path(value: str | None) -> str | None:
    """The configured tool if it can be found, else None."""
    if not value:
        return None
    return value if os.path.isabs(value) and os.access(value, os.X_OK) else shutil.which(value)
