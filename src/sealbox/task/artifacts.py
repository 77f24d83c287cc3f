"""Fetching upstream artifacts into ``W/cot/<taskId>/<path>``.

A file already present there is used as it is (the caller verifies it against the upstream
chain-of-trust record). Otherwise it is fetched from the artifact store: an ``https://`` or
``file://`` URL template with ``{taskId}`` and ``{path}``. Downloads are bounded in size,
written to a temporary name and renamed into place when complete, and shown with a progress
display (a live bar on a terminal, one line per file otherwise).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import ssl
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import aiohttp

from ..client import describe_error
from ..errors import ConfigError, SealboxError

CHUNK = 1 << 20


class Unavailable(SealboxError):
    """An input could not be fetched (missing, store unreachable, too big)."""


class Progress:
    """Download progress: a rich bar on a terminal, plain lines otherwise."""

    def __init__(self, echo: Callable[[str], None], live: bool | None = None) -> None:
        self.echo = echo
        self.live = sys.stderr.isatty() if live is None else live
        self._rich: object | None = None

    def __enter__(self) -> Progress:
        if self.live:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                TextColumn,
                TransferSpeedColumn,
            )
            from rich.progress import Progress as RichProgress

            bar = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            bar.start()
            self._rich = bar
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._rich is not None:
            from rich.progress import Progress as RichProgress

            assert isinstance(self._rich, RichProgress)
            self._rich.stop()

    def start(self, name: str, total: int | None) -> Callable[[int], None]:
        """Begin one transfer; returns a callback taking the bytes just received."""
        if self._rich is None:
            return lambda n: None
        from rich.progress import Progress as RichProgress

        assert isinstance(self._rich, RichProgress)
        bar = self._rich
        tid = bar.add_task(name, total=total)
        return lambda n: bar.update(tid, advance=n)

    def done(self, name: str, size: int, seconds: float, source: str) -> None:
        rate = size / seconds / 1e6 if seconds > 0 else 0.0
        self.echo(f"fetched {name} ({size} bytes, {seconds:.2f} s, {rate:.1f} MB/s) from {source}")


def store_url(template: str, task_id: str, path: str) -> str:
    return template.replace("{taskId}", urllib.parse.quote(task_id, safe="")).replace(
        "{path}", urllib.parse.quote(path, safe="/")
    )


def fetch(
    task_id: str,
    path: str,
    dest: Path,
    store: str | None,
    progress: Progress,
    *,
    ca: Path | None = None,
    max_size: int = 8 * 1024**3,
    timeout: float = 300.0,
) -> Path:
    """Make sure ``dest`` (= ``W/cot/<taskId>/<path>``) holds the artifact; returns it.

    Raises :class:`Unavailable` when it cannot be had now (worth another try later), and
    :class:`~sealbox.errors.ConfigError` when ``ca`` cannot be loaded (it will not be)."""
    if dest.is_file() and not dest.is_symlink():
        return dest
    if dest.exists() or dest.is_symlink():
        raise Unavailable(f"{task_id}/{path}: {dest} exists but is not a regular file")
    if store is None:
        raise Unavailable(f"{task_id}/{path}: not in {dest.parent} and no artifact store is configured")
    url = store_url(store, task_id, path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    started = time.monotonic()
    name = f"{task_id}/{path}"
    try:
        if url.startswith("file://"):
            size = _copy_file(url, tmp, name, progress, max_size)
        else:
            size = _download(url, tmp, name, progress, ca, max_size, timeout)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    progress.done(name, size, time.monotonic() - started, url)
    return dest


def _copy_file(url: str, tmp: Path, name: str, progress: Progress, max_size: int) -> int:
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise Unavailable(f"{name}: file:// URL with a remote host {parsed.netloc!r}")
    src = Path(urllib.request.url2pathname(parsed.path))
    try:
        size = src.stat().st_size
        if not src.is_file():
            raise Unavailable(f"{name}: {src} is not a file")
        if size > max_size:
            raise Unavailable(f"{name}: {size} bytes is more than the {max_size}-byte limit")
        advance = progress.start(name, size)
        with src.open("rb") as fin, tmp.open("wb") as fout:
            while chunk := fin.read(CHUNK):
                fout.write(chunk)
                advance(len(chunk))
    except FileNotFoundError:
        raise Unavailable(f"{name}: not in the artifact store ({src} does not exist)") from None
    except OSError as e:
        raise Unavailable(f"{name}: cannot read {src}: {e.strerror}") from None
    return size


def _download(
    url: str, tmp: Path, name: str, progress: Progress, ca: Path | None, max_size: int, timeout: float
) -> int:
    try:
        verify = ssl.create_default_context(cafile=str(ca) if ca is not None else None)
    except (OSError, ssl.SSLError) as e:  # the worker's configuration: retrying will not help
        raise ConfigError(f"cannot load the artifact store CA {ca}: {e}") from None
    try:
        return asyncio.run(_fetch(url, tmp, name, progress, verify, max_size, timeout))
    except (aiohttp.ClientError, TimeoutError) as e:
        raise Unavailable(f"{name}: cannot download {url}: {describe_error(e)}") from None
    except OSError as e:
        raise Unavailable(f"{name}: cannot write {tmp}: {e.strerror}") from None


async def _fetch(
    url: str, tmp: Path, name: str, progress: Progress, verify: ssl.SSLContext, max_size: int, timeout: float
) -> int:
    size = 0
    limits = aiohttp.ClientTimeout(total=timeout, connect=min(15.0, timeout))
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=verify)) as session,
        session.get(url, timeout=limits) as r,
    ):
        if r.status != 200:
            raise Unavailable(f"{name}: {url} answered {r.status} {r.reason}")
        total = r.content_length
        if total is not None and total > max_size:
            raise Unavailable(f"{name}: {total} bytes is more than the {max_size}-byte limit")
        advance = progress.start(name, total)
        with tmp.open("wb") as f:
            async for chunk in r.content.iter_chunked(CHUNK):
                size += len(chunk)
                if size > max_size:
                    raise Unavailable(f"{name}: more than the {max_size}-byte limit")
                f.write(chunk)
                advance(len(chunk))
    return size


def copy_tree_files(src: Path, dest: Path) -> None:
    """Copy every regular file of ``src`` into ``dest`` (used to seed a ``cot/<taskId>`` folder)."""
    for root, _dirs, files in os.walk(src):
        for name in files:
            p = Path(root) / name
            target = dest / p.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, target)
