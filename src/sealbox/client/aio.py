"""AsyncSigningClient: the classic protocol on asyncio, with failover, retries, timeouts and a cache.

One event loop drives every file, so signing many small files costs a little CPU per
request and no thread hand-offs; :class:`sealbox.client.SigningClient` is the blocking
face of the same code.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import os
import random
import secrets
import shutil
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
import multipart
import yarl

from ..errors import SealboxError
from ..hashing import CHUNK, hash_file
from .hosts import Server
from .plan import detached_suffix, order_formats, wire_name

DEFAULT_TIMEOUT = 600.0
CONNECT_TIMEOUT = 10.0
LONG_POLL_READ = 75.0  # servers hold a GET for at most 60 s
SMALL_FILE = 256 * 1024
#: Small uploads ask the server to answer with the result (sealbox servers honour
#: ``X-Sealbox-Wait``; classic ones answer 202 and the client polls as usual).
WAIT_HEADER = "X-Sealbox-Wait"
UPLOAD_WAIT = 30.0
USER_AGENT = "sealbox-client"
_serial = itertools.count()

#: One file to sign: (source, formats, destination or None for in place).
SignItem = tuple[Path, Sequence[str], Path | None]


def _temp_beside(path: Path) -> Path:
    """A scratch name next to ``path``, unique across processes and concurrent tasks."""
    return path.with_name(f".{path.name}.{os.getpid()}.{next(_serial)}.tmp")


def _write_atomic(dest: Path, data: bytes) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(dest)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _small_form(fields: dict[str, str], filename: str, data: bytes) -> tuple[str, bytes]:
    """A multipart/form-data body in one piece: the fields, then ``filedata``."""
    boundary = secrets.token_hex(16)
    head = "".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        for name, value in fields.items()
    )
    head += (
        f'--{boundary}\r\nContent-Disposition: form-data; name="filedata"; '
        f"filename={multipart.content_disposition_quote(filename)}\r\n"
        "Content-Type: application/octet-stream\r\n\r\n"
    )
    return (
        f"multipart/form-data; boundary={boundary}",
        head.encode() + data + f"\r\n--{boundary}--\r\n".encode(),
    )


class ClientError(SealboxError):
    """A file could not be signed; the message says which server said what."""


@dataclass
class SignOutcome:
    """What happened to one file."""

    source: Path
    outputs: list[Path] = field(default_factory=list)
    formats: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    server: str = ""
    seconds: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def timeout(self, read: float) -> aiohttp.ClientTimeout:
        left = max(0.1, self.left())
        # ``connect`` covers the TCP and TLS handshakes: a peer that accepts and never speaks TLS
        # fails after CONNECT_TIMEOUT, not after the whole budget.
        return aiohttp.ClientTimeout(
            total=left, connect=min(CONNECT_TIMEOUT, left), sock_read=min(read, left)
        )


def ssl_context(ca: Path) -> ssl.SSLContext:
    """A client TLS context that trusts exactly the CA bundle ``ca``."""
    if not ca.is_file():
        raise ClientError(f"CA bundle {ca} not found")
    try:
        return ssl.create_default_context(cafile=str(ca))
    except (OSError, ssl.SSLError) as e:
        raise ClientError(f"CA bundle {ca} cannot be loaded: {e}") from None


def describe(e: BaseException) -> str:
    """One line saying what went wrong with a request."""
    if isinstance(e, TimeoutError):
        return f"timed out ({type(e).__name__})"
    text = str(e) or type(e).__name__
    return text.splitlines()[0]


async def request_token_async(
    server: Server, ca: Path, user: str, password: str, ip: str, duration: int, timeout: float = 30.0
) -> str:
    """Mint an upload token for ``ip`` through ``POST /token`` (what a token issuer does)."""
    connector = aiohttp.TCPConnector(ssl=ssl_context(ca))
    try:
        async with (
            aiohttp.ClientSession(connector=connector, headers={"User-Agent": USER_AGENT}) as session,
            session.post(
                f"{server.url}/token",
                data={"slave_ip": ip, "duration": str(duration)},
                headers={"Authorization": aiohttp.encode_basic_auth(user, password)},
                timeout=aiohttp.ClientTimeout(total=timeout, connect=min(CONNECT_TIMEOUT, timeout)),
            ) as r,
        ):
            body = await r.text()
            if r.status != 200:
                reason = r.headers.get("X-Sealbox-Error") or r.reason
                raise ClientError(f"{server.url}: token request refused: {r.status} {reason}")
            return body.strip()
    except (aiohttp.ClientError, TimeoutError, OSError) as e:
        raise ClientError(f"{server.url}: cannot mint a token: {describe(e)}") from None


class AsyncSigningClient:
    """Signs files with the classic protocol against a list of servers.

    Servers are tried in a random order per format; a server that fails to answer is moved
    to the back. Each (file, format) gets ``timeout`` seconds overall; deterministic
    refusals (the server says the input can't be signed) fail at once. Use it as an async
    context manager, inside one event loop.
    """

    def __init__(
        self,
        servers: Sequence[Server],
        ca: Path,
        token: str | None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        cache_dir: Path | None = None,
        nonce_file: Path | None = None,
        max_errors: int = 5,
        shuffle: bool = True,
        connections: int = 16,
        source_address: str | None = None,
    ) -> None:
        if not servers:
            raise ClientError("at least one server is required")
        self.servers = list(servers)
        self.token = token.strip() if token else None
        self.timeout = timeout
        self.cache_dir = cache_dir
        self.nonce_file = nonce_file
        self.max_errors = max_errors
        self._shuffle = shuffle
        self._order: dict[str, list[Server]] = {}
        self._ssl = ssl_context(ca)
        self._connections = connections
        self._source_address = source_address
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[tuple[str, str], yarl.URL] = {}

    async def __aenter__(self) -> AsyncSigningClient:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        # Created on first use, inside the loop that will drive it.
        if self._session is None:
            connector = aiohttp.TCPConnector(
                ssl=self._ssl,
                limit=self._connections,
                local_addr=(self._source_address, 0) if self._source_address else None,
            )
            self._session = aiohttp.ClientSession(
                connector=connector, headers={"User-Agent": USER_AGENT}, auto_decompress=False
            )
        return self._session

    # -- public API -------------------------------------------------------------------------
    async def sign_many(
        self, items: Sequence[SignItem], jobs: int = 8, progress: Callable[[int], None] | None = None
    ) -> list[SignOutcome]:
        """Sign many files, at most ``jobs`` at a time; outcomes in the order of ``items``."""
        limit = asyncio.Semaphore(max(1, jobs))

        async def one(item: SignItem) -> SignOutcome:
            async with limit:
                return await self.sign(item[0], item[1], item[2], progress)

        return list(await asyncio.gather(*(one(item) for item in items)))

    async def sign(
        self,
        source: Path,
        formats: Sequence[str],
        dest: Path | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> SignOutcome:
        """Sign ``source`` with each format in turn (chaining), writing to ``dest``.

        Formats that replace the file sign the previous result; detached formats (gpg,
        widevine) write ``<dest><suffix>`` beside it. Never raises for a signing failure:
        the outcome carries the error.
        """
        started = time.monotonic()
        out = SignOutcome(source=source)
        dest = dest or source
        ordered = order_formats(formats)
        current = source
        try:
            for fmt in ordered:
                suffix = detached_suffix(fmt)
                if not suffix:
                    target = dest
                elif len(ordered) == 1 and dest != source and dest.name.endswith(suffix):
                    target = dest  # signtool style: `-o file.asc -f gpg file`
                else:
                    target = dest.with_name(dest.name + suffix)
                server, cached = await self.sign_one(current, fmt, target)
                out.formats.append(fmt)
                out.outputs.append(target)
                if cached:
                    out.cached.append(fmt)
                out.server = server or out.server
                if not suffix:
                    current = target
            if current == source and dest != source and dest not in out.outputs:
                # Only detached formats: the signed file beside its signatures is the input.
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, dest)
        except ClientError as e:
            out.error = str(e)
        except OSError as e:
            out.error = f"{source.name}: {e.strerror or e}: {e.filename or source}"
        out.seconds = time.monotonic() - started
        if progress:
            progress(1)
        return out

    async def sign_one(self, source: Path, fmt: str, dest: Path) -> tuple[str, bool]:
        """Sign one file with one format; returns (server url, came from cache)."""
        wire = wire_name(fmt)
        with source.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            data = f.read() if size <= SMALL_FILE else None  # read once: hashed, uploaded from memory
        if data is not None:
            size = len(data)
            digest = hashlib.sha1(data, usedforsecurity=False).hexdigest()
        else:  # hashing a big file here would hold up every other transfer on this loop
            digest = await asyncio.to_thread(hash_file, source)
        if self._from_cache(wire, digest, dest):
            return "", True
        deadline = _Deadline(self.timeout)
        servers = self._servers_for(wire)
        if not servers:
            raise ClientError(f"no server serves format '{fmt}'")
        errors: list[str] = []
        refusals: dict[str, str] = {}
        error_count = 0
        uploaded: set[str] = set()
        # Small files go up at once (POST, then one long-poll GET): a round trip less than
        # asking first. Large files are asked about first, so a server that has them saves the upload.
        upload_first = self.token is not None and data is not None
        i = 0
        while True:
            candidates = [s for s in servers if s.url not in refusals]
            if not candidates:
                raise ClientError(
                    f"{source.name} ({fmt}): refused: " + "; ".join(f"{u}: {r}" for u, r in refusals.items())
                )
            if error_count >= self.max_errors * len(servers) or deadline.left() <= 0:
                last = errors[-1] if errors else "no answer"
                spent = deadline.seconds - max(0.0, deadline.left())
                raise ClientError(f"{source.name} ({fmt}): gave up after {spent:.1f} s: {last}")
            server = candidates[i % len(candidates)]
            try:
                if upload_first and server.url not in uploaded:
                    uploaded.add(server.url)
                    state = await self._upload(server, wire, source, data, size, digest, dest, deadline)
                else:
                    state = await self._poll(server, wire, digest, dest, deadline)
                if state == "unknown" or (state.startswith("failed:") and server.url not in uploaded):
                    # Unknown to the server, or a failure we did not cause (it may have been
                    # transient, and uploading again clears it): upload.
                    uploaded.add(server.url)
                    state = await self._upload(server, wire, source, data, size, digest, dest, deadline)
                if state == "done":
                    self._to_cache(wire, digest, dest)
                    return server.url, False
                if state.startswith("failed:") and server.url in uploaded:
                    refusals[server.url] = state.removeprefix("failed:")
            except _Refused as e:
                refusals[server.url] = str(e)
            except (aiohttp.ClientError, TimeoutError, OSError, _Retry) as e:
                error_count += 1
                errors.append(f"{server.url}: {describe(e)}")
                i += 1  # move on to the next server
                self._rotate(wire, server)
                if i % len(candidates) == 0:
                    await asyncio.sleep(min(2.0, 0.2 * 2 ** min(error_count, 4), max(0.0, deadline.left())))

    # -- protocol steps ---------------------------------------------------------------------
    async def _poll(self, server: Server, wire: str, digest: str, dest: Path, deadline: _Deadline) -> str:
        url = f"{server.url}/sign/{wire}/{digest}"
        started = time.monotonic()
        async with self._http().get(url, timeout=deadline.timeout(LONG_POLL_READ)) as r:
            if r.status < 400:
                expected = r.headers.get("X-SHA1-Digest")
                if not expected:
                    raise _Retry("answer without X-SHA1-Digest")
                await self._receive(r, dest, expected.lower())
                return "done"
            await r.read()
            if "X-Pending" in r.headers:
                if time.monotonic() - started < 0.2:
                    await asyncio.sleep(0.2)  # a server with no long-poll hold: don't spin
                return "pending"
            reason: str | None = r.headers.get("X-Sealbox-Error")
            if r.status == 404 and reason:
                return "failed:" + reason
            if r.status >= 500:
                raise _Retry(f"server error {r.status}")
            if r.status != 404:
                raise _Refused(f"{r.status} {reason or r.reason}")
            return "unknown"

    async def _receive(self, r: aiohttp.ClientResponse, dest: Path, expected: str) -> None:
        if r.content_length is not None and r.content_length <= SMALL_FILE:
            # A small result is checked in memory and written in one go. (Handing the write
            # to a thread measured slower: the thread and this loop trade the GIL.)
            body = await r.read()
            if hashlib.sha1(body, usedforsecurity=False).hexdigest() != expected:
                raise _Retry("downloaded result does not match its X-SHA1-Digest")
            _write_atomic(dest, body)
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_beside(dest)
        h = hashlib.sha1(usedforsecurity=False)
        try:
            with tmp.open("wb") as f:
                async for chunk in r.content.iter_chunked(CHUNK):
                    h.update(chunk)
                    f.write(chunk)
            if h.hexdigest() != expected:
                raise _Retry("downloaded result does not match its X-SHA1-Digest")
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    async def _upload(
        self,
        server: Server,
        wire: str,
        source: Path,
        data: bytes | None,
        size: int,
        digest: str,
        dest: Path,
        deadline: _Deadline,
    ) -> str:
        """Upload; "done" if the server answered with the result (small files ask it to
        wait for the job: a round trip less), "failed:<reason>" or "pending"."""
        if self.token is None:
            raise _Refused("no token: pass -t/--token-file")
        nonce = ""
        if self.nonce_file is not None:
            with contextlib.suppress(OSError):
                nonce = self.nonce_file.read_text()
        fields = {"sha1": digest, "filename": source.name, "token": self.token, "nonce": nonce}
        with contextlib.ExitStack() as stack:
            body: Any
            if data is not None:
                # A small form is built in one piece (one TLS record, not one per part line);
                # aiohttp's FormData machinery cost ~0.7 ms of CPU per small file.
                content_type, body = _small_form(fields, source.name, data)
                headers = {"Content-Type": content_type, WAIT_HEADER: str(int(UPLOAD_WAIT))}
            else:  # a big file is streamed from disk
                form = aiohttp.FormData(fields)
                form.add_field(
                    "filedata",
                    stack.enter_context(source.open("rb")),
                    filename=source.name,
                    content_type="application/octet-stream",
                )
                body = form()
                headers = {"Content-Type": body.content_type}
            # Sending takes time proportional to the size; allow ~20 MB/s at worst.
            read = max(60.0, size / 20e6) + (UPLOAD_WAIT if data is not None else 0)
            async with self._http().post(
                self._upload_url(server, wire), data=body, headers=headers, timeout=deadline.timeout(read)
            ) as r:
                if self.nonce_file is not None and "X-Nonce" in r.headers:
                    with contextlib.suppress(OSError):
                        self.nonce_file.write_text(r.headers["X-Nonce"])
                if r.status == 200 and "X-SHA1-Digest" in r.headers:
                    await self._receive(r, dest, r.headers["X-SHA1-Digest"].lower())
                    return "done"
                await r.read()
                reason = r.headers.get("X-Sealbox-Error")
                if r.status == 404 and reason:  # the job failed (answer of a waited upload)
                    return "failed:" + reason
                if r.status >= 500:
                    raise _Retry(f"upload failed: {r.status} {reason or r.reason}")
                if r.status >= 400:
                    raise _Refused(f"{r.status} {reason or r.reason}")
                return "pending"

    def _upload_url(self, server: Server, wire: str) -> yarl.URL:
        # Parsed once: URL parsing is a noticeable part of a small upload's client CPU.
        key = (server.url, wire)
        if key not in self._urls:
            self._urls[key] = yarl.URL(f"{server.url}/sign/{wire}")
        return self._urls[key]

    # -- servers and cache ------------------------------------------------------------------
    def _servers_for(self, wire: str) -> list[Server]:
        if wire not in self._order:
            order = [s for s in self.servers if s.serves(wire)]
            if self._shuffle:
                random.shuffle(order)
            self._order[wire] = order
        return list(self._order[wire])

    def _rotate(self, wire: str, server: Server) -> None:
        order = self._order.get(wire, [])
        if server in order:
            order.remove(server)
            order.append(server)

    def _from_cache(self, wire: str, digest: str, dest: Path) -> bool:
        if self.cache_dir is None:
            return False
        cached = self.cache_dir / wire / digest
        if not cached.is_file():
            return False
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_beside(dest)
        shutil.copyfile(cached, tmp)
        os.replace(tmp, dest)
        return True

    def _to_cache(self, wire: str, digest: str, result: Path) -> None:
        if self.cache_dir is None:
            return
        folder = self.cache_dir / wire
        folder.mkdir(parents=True, exist_ok=True)
        tmp = _temp_beside(folder / digest)
        shutil.copyfile(result, tmp)
        os.replace(tmp, folder / digest)


class _Retry(Exception):
    """Worth another attempt (possibly on another server)."""


class _Refused(Exception):
    """This server will not sign this input; trying it again is pointless."""
