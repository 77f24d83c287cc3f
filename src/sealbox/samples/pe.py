"""Real, unsigned Windows PE files for the Authenticode formats.

Every virtual environment's pip vendors distlib's script launchers (``t64.exe`` and friends,
genuine PE32+ executables of about 100 KB); setuptools ships similar ``cli-*.exe`` launchers.
Nothing is downloaded: the files are copied out of the installed packages.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

#: (package, path inside it) of the PE launchers we can copy, best first
_EXE_SOURCES = (
    ("pip", "_vendor/distlib/t64.exe"),
    ("pip", "_vendor/distlib/w64.exe"),
    ("setuptools", "cli-64.exe"),
    ("setuptools", "gui-64.exe"),
)
_DLL_SOURCES = (
    ("pip", "_vendor/distlib/w64.exe"),
    ("pip", "_vendor/distlib/t64.exe"),
    ("setuptools", "gui-64.exe"),
    ("setuptools", "cli-64.exe"),
)


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _find(sources: tuple[tuple[str, str], ...]) -> Path:
    for package, rel in sources:
        base = _package_dir(package)
        if base is not None and (base / rel).is_file():
            return base / rel
    tried = ", ".join(f"{p}/{r}" for p, r in sources)
    raise FileNotFoundError(
        f"no PE launcher found to use as a sample (looked for {tried}); install pip or setuptools"
    )


def launcher_path() -> Path:
    """The installed PE launcher :func:`write_pe` copies (pip's ``t64.exe`` when present)."""
    return _find(_EXE_SOURCES)


def write_pe(dir: Path, name: str = "setup.exe") -> Path:
    """Write an unsigned PE32+ executable (pip's ``t64.exe``, ~100 KB) as ``dir/name``."""
    dest = Path(dir) / name
    shutil.copyfile(_find(_EXE_SOURCES), dest)
    return dest


def write_dll(dir: Path, name: str = "xul.dll") -> Path:
    """Write an unsigned PE file under a DLL name (Authenticode signs any PE image alike)."""
    dest = Path(dir) / name
    shutil.copyfile(_find(_DLL_SOURCES), dest)
    return dest


def write_large_pe(dir: Path, name: str = "big-setup.exe", size: int = 32 * 1024 * 1024) -> Path:
    """A PE of about ``size`` bytes: the launcher followed by an overlay (like installers carry)."""
    dest = write_pe(dir, name)
    chunk = bytes(range(256)) * 4096  # 1 MiB of a fixed pattern
    with dest.open("ab") as f:
        remaining = max(0, size - dest.stat().st_size)
        while remaining > 0:
            n = min(remaining, len(chunk))
            f.write(chunk[:n])
            remaining -= n
    return dest
