"""Fetching upstream artifacts into ``W/cot/<taskId>/<path>``.

A file already present there is used as it is (the caller verifies it against the upstream
chain-of-trust record). Otherwise it is fetched from the artifact store: an ``https://`` or
``file://`` URL template with ``{taskId}`` and ``{path}``. Downloads are bounded in size,
written to a temporary name and renamed into place when complete, and shown with a progress
display (a live bar on a terminal, one line per file otherwise). A task's downloads share one
HTTPS session (one TLS context, kept-alive connections) and run a few at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import ssl
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import aiohttp
import yarl

from ..client import describe_error
from ..errors import ConfigError, SealboxError
from ..fsutil import short_name

CHUNK = 1 << 20


class Unavailable(SealboxError):
    """An input could not be fetched (missing, store unreachable, too big)."""


class NotInStore(Unavailable):
    """The store says it has no such artifact (404, no such file), or there is no store."""


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


#: downloads of one batch at once: most tasks wait on a store's latency, not its bandwidth
PARALLEL = 4
#: redirects followed per download (https only)
MAX_REDIRECTS = 5


class ArtifactStore:
    """Fetches artifacts into ``root`` (``W/cot``) as ``<taskId>/<path>`` from the store URL
    template ``store`` (None: only files already there are used). Use it as a context manager.

    No link below ``root`` is followed, to read a file there or to write one: an artifact is
    taken from ``root`` or fetched into it, never from or to anywhere else. A download goes to
    a temporary file of its own (created exclusively) and is renamed into place when whole.

    One HTTPS session serves every download: its TLS context is built once, before the first
    download (an unusable ``ca`` is a :class:`~sealbox.errors.ConfigError` then, not a retry),
    connections are kept alive, and :meth:`prefetch` downloads a batch ``PARALLEL`` at a time.
    :meth:`fetch` takes a file from there, or says why it could not be had."""

    def __init__(
        self,
        store: str | None,
        progress: Progress,
        *,
        root: Path,
        ca: Path | None = None,
        max_size: int = 8 * 1024**3,
        timeout: float = 300.0,
    ) -> None:
        self.store = store
        self.root = root
        self.progress = progress
        self.ca = ca
        self.max_size = max_size
        self.timeout = timeout
        self._failed: dict[Path, Unavailable] = {}  # what a prefetch could not have, by destination
        self._runner: asyncio.Runner | None = None
        self._session: aiohttp.ClientSession | None = None

    def __enter__(self) -> ArtifactStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the session and its connections."""
        if self._runner is not None:
            if self._session is not None:
                self._runner.run(self._session.close())
            self._runner.close()
        self._runner = self._session = None

    def prefetch(self, wanted: Iterable[tuple[str, str, Path]]) -> None:
        """Fetch each (taskId, path, destination) not there yet, up to ``PARALLEL`` at once; what
        cannot be had is remembered for :meth:`fetch` to raise, in the caller's order."""
        todo: dict[Path, tuple[str, str]] = {}
        for task_id, path, dest in wanted:
            try:
                if self._missing(task_id, path, dest):
                    todo[dest] = (task_id, path)
            except Unavailable as e:
                self._failed[dest] = e
        if not todo:
            return
        assert self.store is not None  # _missing said so
        if self.store.startswith("file://"):
            for dest, (task_id, path) in todo.items():
                try:
                    self._copy(task_id, path, dest)
                except Unavailable as e:
                    self._failed[dest] = e
            return
        session = self._http()
        assert self._runner is not None
        self._runner.run(self._download_all(session, todo))

    def fetch(self, task_id: str, path: str, dest: Path) -> Path:
        """Make sure ``dest`` (= ``W/cot/<taskId>/<path>``) holds the artifact; returns it.

        Raises :class:`Unavailable` when it cannot be had now (worth another try later), and
        :class:`~sealbox.errors.ConfigError` when ``ca`` cannot be loaded (it will not be)."""
        failed = self._failed.pop(dest, None)
        if failed is not None:
            raise failed
        if self._missing(task_id, path, dest):
            self.prefetch([(task_id, path, dest)])
            if (failed := self._failed.pop(dest, None)) is not None:
                raise failed
        return dest

    # -- internals -------------------------------------------------------------------------
    def _missing(self, task_id: str, path: str, dest: Path) -> bool:
        """False if ``dest`` is there to use; raises :class:`Unavailable` if it cannot be fetched."""
        link = next((p for p in (self.root, *_between(self.root, dest)) if p.is_symlink()), None)
        if link is not None:
            raise Unavailable(
                f"{task_id}/{path}: {link} is a symbolic link: artifacts are taken from {self.root} only"
            )
        if dest.is_file():
            return False
        if dest.exists():
            raise Unavailable(f"{task_id}/{path}: {dest} exists but is not a regular file")
        if self.store is None:
            raise NotInStore(f"{task_id}/{path}: not in {dest.parent} and no artifact store is configured")
        return True

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            try:
                verify = ssl.create_default_context(cafile=str(self.ca) if self.ca is not None else None)
            except (OSError, ssl.SSLError) as e:  # the worker's configuration: retrying will not help
                raise ConfigError(f"cannot load the artifact store CA {self.ca}: {e}") from None
            self._runner = asyncio.Runner()
            self._session = self._runner.run(self._open(verify))
        return self._session

    @staticmethod
    async def _open(verify: ssl.SSLContext) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=verify, limit=PARALLEL))

    def _target(self, task_id: str, path: str) -> tuple[str, str]:
        """(URL, name shown)."""
        assert self.store is not None
        return store_url(self.store, task_id, path), f"{task_id}/{path}"

    def _copy(self, task_id: str, path: str, dest: Path) -> None:
        url, name = self._target(task_id, path)
        started = time.monotonic()
        with _into(dest, name) as out:
            size = _copy_file(url, out, name, self.progress, self.max_size)
        self.progress.done(name, size, time.monotonic() - started, url)

    async def _download_all(self, session: aiohttp.ClientSession, todo: dict[Path, tuple[str, str]]) -> None:
        slots = asyncio.Semaphore(PARALLEL)

        async def one(dest: Path, task_id: str, path: str) -> None:
            async with slots:
                try:
                    await self._download(session, task_id, path, dest)
                except Unavailable as e:
                    self._failed[dest] = e

        await asyncio.gather(*(one(dest, task_id, path) for dest, (task_id, path) in todo.items()))

    async def _download(self, session: aiohttp.ClientSession, task_id: str, path: str, dest: Path) -> None:
        url, name = self._target(task_id, path)
        started = time.monotonic()
        try:
            with _into(dest, name) as out:
                size = await _fetch(session, url, out, name, self.progress, self.max_size, self.timeout)
        except (aiohttp.ClientError, TimeoutError) as e:
            raise Unavailable(f"{name}: cannot download {url}: {describe_error(e)}") from None
        self.progress.done(name, size, time.monotonic() - started, url)


def _between(root: Path, dest: Path) -> list[Path]:
    """Every path from ``root`` (excluded) down to ``dest`` (included)."""
    out, here = [], root
    for part in dest.relative_to(root).parts:
        here = here / part
        out.append(here)
    return out


@contextlib.contextmanager
def _into(dest: Path, name: str) -> Iterator[BinaryIO]:
    """A new temporary file beside ``dest`` for artifact ``name``, created exclusively (never
    through a link, never an existing file: mkstemp's O_EXCL), renamed to ``dest`` once written
    whole, removed if not. A file system error is :class:`Unavailable` (a download's own errors,
    aiohttp's and timeouts, some of them OSErrors, pass through)."""
    tmp: Path | None = None
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix=f".{short_name(dest.name, 200)}.", suffix=".part", dir=dest.parent)
        tmp = Path(path)
        with os.fdopen(fd, "wb") as out:
            yield out
        os.replace(tmp, dest)
    except OSError as e:
        if isinstance(e, aiohttp.ClientError | TimeoutError):
            raise
        raise Unavailable(f"{name}: cannot write {tmp or dest}: {e.strerror}") from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def _copy_file(url: str, out: BinaryIO, name: str, progress: Progress, max_size: int) -> int:
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
        with src.open("rb") as fin:
            while chunk := fin.read(CHUNK):
                out.write(chunk)
                advance(len(chunk))
    except FileNotFoundError:
        raise NotInStore(f"{name}: not in the artifact store ({src} does not exist)") from None
    except OSError as e:
        raise Unavailable(f"{name}: cannot read {src}: {e.strerror}") from None
    return size


async def _fetch(
    session: aiohttp.ClientSession,
    url: str,
    out: BinaryIO,
    name: str,
    progress: Progress,
    max_size: int,
    timeout: float,
) -> int:
    limits = aiohttp.ClientTimeout(total=timeout, connect=min(15.0, timeout))
    here = yarl.URL(url)
    for _ in range(MAX_REDIRECTS + 1):
        async with session.get(here, timeout=limits, allow_redirects=False) as r:
            if r.status in (301, 302, 303, 307, 308) and "Location" in r.headers:
                # Followed over TLS only (a store hands artifacts to a CDN that way), through the
                # same session: its TLS context, the pinned CA if there is one, checks each host.
                target = here.join(yarl.URL(r.headers["Location"]))
                if target.scheme != "https":
                    why = f"redirects to a {target.scheme} URL (a store's redirect is followed to https only)"
                    raise Unavailable(f"{name}: {here} {why}")
                here = target
                continue
            if r.status != 200:
                kind = NotInStore if r.status in (404, 410) else Unavailable
                raise kind(f"{name}: {here} answered {r.status} {r.reason}")
            return await _take(r, out, name, progress, max_size)
    raise Unavailable(f"{name}: {url} redirects more than {MAX_REDIRECTS} times")


async def _take(
    r: aiohttp.ClientResponse, out: BinaryIO, name: str, progress: Progress, max_size: int
) -> int:
    """Write an artifact's body to ``out``, at most ``max_size`` bytes; its size."""
    total = r.content_length
    if total is not None and total > max_size:
        raise Unavailable(f"{name}: {total} bytes is more than the {max_size}-byte limit")
    advance = progress.start(name, total)
    size = 0
    async for chunk in r.content.iter_chunked(CHUNK):
        size += len(chunk)
        if size > max_size:
            raise Unavailable(f"{name}: more than the {max_size}-byte limit")
        out.write(chunk)
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
