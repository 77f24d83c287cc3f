"""AsyncSigningClient: the classic protocol on asyncio, with failover, retries, timeouts and a cache.

One event loop drives every file, so signing many small files costs a little CPU per
request and no thread hand-offs; :class:`sealbox.client.SigningClient` is the blocking
face of the same code.

Time, not an error count, ends the attempts on a file: while its ``timeout`` lasts, a host
that refuses connections, resets them or stops answering is tried again after a pause
(exponential backoff with jitter, capped at ``BACKOFF_CAP`` s); with several hosts the next
one is tried at once. Timeouts, from the inside out:

* connect (``CONNECT_TIMEOUT``): the TCP and TLS handshakes of a new connection.
* first byte (``FIRST_BYTE``): an exchange that has been quiet this long (no response
  headers yet: a held poll, an upload the server waits on, or a slow transfer) is only
  waited on further if the host proves it is alive: ``GET /__heartbeat__`` on a fresh
  connection must get an HTTP answer (any status) within ``PROBE_TIMEOUT``. A held poll
  (a server may hold a GET up to 60 s, and our uploads ask for a wait) thus costs nothing,
  while a host that accepts connections but never answers (stopped, wedged) is found out
  within ``FIRST_BYTE + PROBE_TIMEOUT`` s. This needs no cooperation from the server, so it
  works the same against classic servers. ``LONG_POLL_READ`` remains as a backstop for a
  host that answers heartbeats but not the request.
* overall: ``timeout`` per (file, format).

A host found down or hung is left out for every file and format of this client for
``BENCH`` s, then one probe decides whether it is back; while every host is left out, files
pause and probe (one shared heartbeat per host) until one answers or their time is up.
``max_errors`` only bounds errors a server *answers* (5xx, a corrupt result): after that
many from one host, a file stops asking that host.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import itertools
import json
import os
import random
import secrets
import shutil
import ssl
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, BinaryIO

import aiohttp
import multipart
import yarl

from ..errors import ConfigError
from ..fsutil import read_small_text, short_name
from ..hashing import CHUNK, hash_file, is_sha1_hex
from ..wire import (
    HASH_UPLOAD_HEADER,
    INPUT_SHA1_HEADER,
    LOG_INDEX_HEADER,
    REFUSAL_HEADER,
    SMALL_FILE,
    WAIT_HEADER,
    log_index,
)
from ._errors import (
    ClientError,
    InputChanged,
    OutputUnwritable,
    ServerUnavailable,
    SigningRefused,
    TokenRefused,
)
from ._hosts import Server
from ._logproof import LogProof, ProofFailed
from ._logproof import check as check_proof
from ._plan import detached_suffix, order_formats, wire_name

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

DEFAULT_TIMEOUT = 600.0
CONNECT_TIMEOUT = 5.0
FIRST_BYTE = 4.0
PROBE_TIMEOUT = 5.0
BENCH = 30.0
BACKOFF_FIRST = 0.25
BACKOFF_CAP = 3.0
LONG_POLL_READ = 75.0  # servers hold a GET for at most 60 s
NONCE_LIMIT = 4096  # a server takes form fields up to this long
#: the most of an answer that is not a result (a refusal, "pending", a token, a proof) read
ANSWER_LIMIT = 1024 * 1024
#: a result may be at most this much bigger than twice its input: more is a bad answer
RESULT_MARGIN = 64 * 1024 * 1024
_WATCH_TICK = 1.0  # how soon an exchange notices that another one found its host down
#: Uploads ask the server to answer with the result within this many seconds (sealbox servers
#: honour ``X-Sealbox-Wait``; classic ones answer 202 and the client polls as usual). A big file
#: goes up unhashed to a server whose upload answers name uploads (``X-Sealbox-Input-SHA1``).
UPLOAD_WAIT = 30.0
#: a big file is read (and hashed) this much at a time as it is sent, once under way; the first
#: read is :data:`FIRST_CHUNK`, each next one twice the last: the server starts receiving (and
#: hashing) after a short read instead of a whole chunk's
STREAM_CHUNK = 1024 * 1024
FIRST_CHUNK = 64 * 1024
USER_AGENT = "sealbox-client"
_serial = itertools.count()

#: One file to sign: (source, formats, destination or None for in place).
SignItem = tuple[Path, Sequence[str], Path | None]


def _temp_beside(path: Path) -> Path:
    """A scratch name next to ``path``, unique across processes and concurrent tasks (and
    short enough for any name a folder can hold)."""
    return path.with_name(f".{short_name(path.name, 200)}.{os.getpid()}.{next(_serial)}.tmp")


@contextlib.contextmanager
def _local(path: Path) -> Iterator[None]:
    """A file system error writing ``path`` is ours, not a server's: no server can help, so it
    is not retried (:class:`OutputUnwritable`). A transfer's own errors (aiohttp's and
    timeouts, some of them OSErrors) pass through."""
    try:
        yield
    except OSError as e:
        if isinstance(e, aiohttp.ClientError | TimeoutError):
            raise
        raise OutputUnwritable(f"cannot write {e.filename or path}: {e.strerror or e}") from None


@contextlib.contextmanager
def _replacing(dest: Path) -> Iterator[Path]:
    """A scratch path beside ``dest`` for the block to write: renamed to ``dest`` when the
    block ends without error, removed otherwise; file system errors as :func:`_local` says."""
    tmp = _temp_beside(dest)
    with _local(dest):
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            yield tmp
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)


def _write_atomic(dest: Path, data: bytes) -> None:
    with _replacing(dest) as tmp:
        tmp.write_bytes(data)


async def _answer(r: aiohttp.ClientResponse, limit: int = ANSWER_LIMIT) -> bytes | None:
    """An answer's body, if it is at most ``limit`` bytes; None (the connection dropped, not
    read further) if it is longer: no answer but a result is big, and none may fill memory."""
    body = bytearray()
    while len(body) <= limit:
        chunk = await r.content.read(limit + 1 - len(body))
        if not chunk:
            return bytes(body)
        body += chunk
    r.close()
    return None


def _field(boundary: str, name: str, value: str) -> str:
    return f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'


def _form_head(boundary: str, fields: dict[str, str], filename: str) -> bytes:
    """A multipart/form-data body up to ``filedata``'s bytes: the fields, then its part header."""
    head = "".join(_field(boundary, name, value) for name, value in fields.items())
    head += (
        f'--{boundary}\r\nContent-Disposition: form-data; name="filedata"; '
        f"filename={multipart.content_disposition_quote(filename)}\r\n"
        "Content-Type: application/octet-stream\r\n\r\n"
    )
    return head.encode()


def _small_form(fields: dict[str, str], filename: str, data: bytes) -> tuple[str, bytes]:
    """A multipart/form-data body in one piece: the fields, then ``filedata``."""
    boundary = secrets.token_hex(16)
    return (
        f"multipart/form-data; boundary={boundary}",
        _form_head(boundary, fields, filename) + data + f"\r\n--{boundary}--\r\n".encode(),
    )


@dataclass
class SignOutcome:
    """What happened to one file; ``exception`` is what ended it, to branch on by type
    (a :class:`ClientError` kind, or an ``OSError`` reading or writing a local file)."""

    source: Path
    outputs: list[Path] = field(default_factory=list)
    formats: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    server: str = ""
    seconds: float = 0.0
    error: str | None = None
    exception: ClientError | OSError | None = None
    #: with ``log_proof``: each signature's checked inclusion in its server's signing log
    log_proofs: list[LogProof] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every format of the file was signed."""
        return self.error is None


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def timeout(self, read: float) -> aiohttp.ClientTimeout:
        left = max(0.1, self.left())
        # ``sock_connect`` covers the TCP and TLS handshakes (a peer that accepts and never
        # speaks TLS fails after CONNECT_TIMEOUT), and not the wait for a free pooled connection.
        return aiohttp.ClientTimeout(
            total=left, sock_connect=min(CONNECT_TIMEOUT, left), sock_read=min(read, left)
        )


def _backoff(n: int) -> float:
    """The ``n``-th pause (from 1) before trying again: exponential, capped, with jitter so
    that files waiting on the same host do not come back in step."""
    return min(BACKOFF_CAP, BACKOFF_FIRST * 2.0 ** min(n - 1, 16)) * random.uniform(0.5, 1.0)


@dataclass
class _Health:
    """What the client knows about one host; shared by every file and format."""

    bad_until: float = 0.0  # 0: usable; else down or hung, left out until then, then probed
    reason: str = ""
    alive_at: float = 0.0  # when the host last answered anything
    probe: asyncio.Task[bool] | None = None
    names_uploads: bool = False  # an upload answer named the upload: it hashes them


@dataclass
class _File:
    """One file to sign in one format, read and hashed once."""

    source: Path
    fmt: str
    wire: str
    dest: Path
    data: bytes | None  # the bytes of a small file (hashed and uploaded from memory), else None
    size: int
    digest: str

    @classmethod
    async def read(cls, source: Path, fmt: str, dest: Path, hash_big: bool) -> _File:
        """``hash_big``: hash a big file now (to look it up before uploading it); else its
        digest is "" until an upload takes it on the way (one pass over the file)."""
        with source.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            data = f.read() if size <= SMALL_FILE else None  # read once: hashed, uploaded from memory
        if data is not None:
            size = len(data)
            digest = hashlib.sha1(data, usedforsecurity=False).hexdigest()
        elif hash_big:  # hashing a big file here would hold up every other transfer on this loop
            digest = await asyncio.to_thread(hash_file, source)
        else:
            digest = ""
        return cls(source, fmt, wire_name(fmt), dest, data, size, digest)


class _StreamedForm:
    """A big file's multipart/form-data body, read from disk as it is sent. When its SHA-1 is
    not known yet, either the server names it (``unhashed``: no ``sha1`` field at all, the
    server hashes what it receives) or it is taken on the way (the one pass over the file) and
    the ``sha1`` field follows ``filedata``: sealbox servers take it there, classic ones read
    the whole form first. Iterate it once per upload; :attr:`sha1` is set once the file has
    gone ("" when unhashed)."""

    def __init__(self, fields: dict[str, str], job: _File, unhashed: bool) -> None:
        self.job = job
        self.boundary = secrets.token_hex(16)
        self.sha1 = job.digest
        self.late = not job.digest and not unhashed
        first = {name: value for name, value in fields.items() if name != "sha1" or job.digest}
        self.head = _form_head(self.boundary, first, job.source.name)
        self.content_type = f"multipart/form-data; boundary={self.boundary}"
        #: why the send stopped when the file changed while it was being sent (None: it did not)
        self.changed: str | None = None
        self.length = len(self.head) + job.size + len(self._tail("0" * 40))

    def _tail(self, sha1: str) -> bytes:
        late = _field(self.boundary, "sha1", sha1) if self.late else ""
        return f"\r\n{late}--{self.boundary}--\r\n".encode()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        hasher = hashlib.sha1(usedforsecurity=False) if self.late else None

        def read(f: BinaryIO, n: int) -> bytes:
            chunk = f.read(n)
            if hasher is not None:
                hasher.update(chunk)
            return chunk

        yield self.head
        with self.job.source.open("rb") as f:
            left, size = self.job.size, FIRST_CHUNK
            # Read and hashed in a thread, one chunk ahead: the next is read while this one is
            # encrypted and sent, and the loop goes on serving the other transfers.
            ahead = asyncio.ensure_future(asyncio.to_thread(read, f, min(left, size)))
            try:
                while left:
                    chunk = await ahead
                    if not chunk:
                        self.changed = f"{self.job.source} shrank while it was being sent"
                        raise OSError(errno.EIO, self.changed)
                    left -= len(chunk)
                    if left:
                        size = min(2 * size, STREAM_CHUNK)
                        ahead = asyncio.ensure_future(asyncio.to_thread(read, f, min(left, size)))
                    yield chunk
                if os.fstat(f.fileno()).st_size != self.job.size:  # what was sent is not the file
                    self.changed = f"{self.job.source} grew while it was being sent"
                    raise OSError(errno.EIO, self.changed)
            finally:
                if not ahead.done():
                    await asyncio.wait({ahead})  # the thread is done with the file before it closes
                if not ahead.cancelled():
                    ahead.exception()  # retrieved: an abandoned read's error is not logged
        if hasher is not None:
            self.sha1 = hasher.hexdigest()
        yield self._tail(self.sha1)


@dataclass
class _Attempts:
    """What the servers said so far about one (file, format)."""

    deadline: _Deadline
    errors: list[str] = field(default_factory=list)
    refusals: dict[str, str] = field(default_factory=dict)
    refusal_kinds: set[type[ClientError]] = field(default_factory=set)
    answered: dict[str, int] = field(default_factory=dict)  # errors each server answered (5xx, corrupt)
    tried: set[str] = field(default_factory=set)  # hosts that failed since the last pause
    pauses: int = 0
    uploaded: set[str] = field(default_factory=set)

    def candidates(self, servers: list[Server], max_errors: int) -> list[Server]:
        """The servers that neither refused nor answered ``max_errors`` errors."""
        return [s for s in servers if s.url not in self.refusals and self.answered.get(s.url, 0) < max_errors]

    def refuse(self, server: Server, reason: str, kind: type[ClientError]) -> None:
        self.refusals[server.url] = reason
        self.refusal_kinds.add(kind)

    def failure(self, job: _File, candidates: list[Server]) -> ClientError | None:
        """The error that ends the attempts, or None while a server is left to ask in time:
        every server refused (one kind: that kind), or time or servers ran out."""
        refused = "refused: " + "; ".join(f"{u}: {r}" for u, r in self.refusals.items())
        if not candidates and not self.errors:
            kind = TokenRefused if self.refusal_kinds == {TokenRefused} else SigningRefused
            return kind(f"{job.source.name} ({job.fmt}): {refused}")
        if not candidates or self.deadline.left() <= 0:
            last = self.errors[-1] if self.errors else "no answer"
            spent = self.deadline.seconds - max(0.0, self.deadline.left())
            also = f"; {refused}" if self.refusals else ""
            what = f"{job.source.name} ({job.fmt})"
            return ServerUnavailable(f"{what}: gave up after {spent:.1f} s: {last}{also}")
        return None


def ssl_context(ca: Path) -> ssl.SSLContext:
    """A client TLS context that trusts exactly the CA bundle ``ca``."""
    if not ca.is_file():
        raise ClientError(f"CA bundle {ca} not found")
    try:
        return ssl.create_default_context(cafile=str(ca))
    except (OSError, ssl.SSLError) as e:
        raise ClientError(f"CA bundle {ca} cannot be loaded: {e}") from None


def describe_error(e: BaseException) -> str:
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
                allow_redirects=False,  # the credentials go to this server or nowhere
            ) as r,
        ):
            raw = await _answer(r)
            body = (raw or b"").decode("utf-8", "replace")
            if r.status != 200 or raw is None:
                reason = r.headers.get("X-Sealbox-Error") or r.reason
                raise TokenRefused(f"{server.url}: token request refused: {r.status} {reason}")
            return body.strip()
    except (aiohttp.ClientError, TimeoutError, OSError) as e:
        raise ServerUnavailable(f"{server.url}: cannot mint a token: {describe_error(e)}") from None


class AsyncSigningClient:
    """Signs files with the classic protocol against a list of servers.

    Servers are tried in a random order per format; a server that fails to answer is moved
    to the back, and one found down or hung is left out for a while by every file (see the
    module docstring). Each (file, format) gets ``timeout`` seconds overall; deterministic
    refusals (the server says the input can't be signed) fail at once. ``max_errors`` bounds
    the errors one server may answer for one file (5xx, corrupt results); unreachable hosts
    are retried until the timeout. ``on_retry(source, fmt, error)`` hears of every failed
    attempt that will be retried. Use it as an async context manager, inside one event loop.
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
        on_retry: Callable[[Path, str, str], None] | None = None,
        log_proof: bool = False,
        log_key: Ed25519PublicKey | None = None,
    ) -> None:
        """``log_proof``: check that each result is in its server's signing log (and, given
        ``log_key``, that the log's checkpoint is signed by it); the proofs land in
        :attr:`SignOutcome.log_proofs` and :attr:`log_proofs`."""
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
        self._probe_session: aiohttp.ClientSession | None = None
        self._urls: dict[tuple[str, str], yarl.URL] = {}
        self._health: dict[str, _Health] = {}
        self.on_retry = on_retry
        self.log_proof = log_proof
        self.log_key = log_key
        #: every signing log proof checked so far (``log_proof``), in the order checked
        self.log_proofs: list[LogProof] = []
        self._log_index: dict[Path, int] = {}  # a result's entry, from the answer that delivered it

    async def __aenter__(self) -> AsyncSigningClient:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the health probes and close the HTTP sessions (what leaving ``async with`` does)."""
        probes = [h.probe for h in self._health.values() if h.probe is not None and not h.probe.done()]
        for probe in probes:
            probe.cancel()
        if probes:
            await asyncio.wait(probes)
        for session in (self._session, self._probe_session):
            if session is not None:
                await session.close()
        self._session = self._probe_session = None

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

    def _probe_http(self) -> aiohttp.ClientSession:
        # Heartbeats need fresh connections of their own: a pooled one may be what is stuck,
        # and a pool full of held polls must not delay them.
        if self._probe_session is None:
            connector = aiohttp.TCPConnector(
                ssl=self._ssl,
                force_close=True,
                local_addr=(self._source_address, 0) if self._source_address else None,
            )
            self._probe_session = aiohttp.ClientSession(
                connector=connector, headers={"User-Agent": USER_AGENT}
            )
        return self._probe_session

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
                server, cached, proofs = await self._sign_one(current, fmt, target)
                out.log_proofs += proofs
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
            out.error, out.exception = str(e), e
        except OSError as e:
            out.error, out.exception = f"{source.name}: {e.strerror or e}: {e.filename or source}", e
        out.seconds = time.monotonic() - started
        if progress:
            progress(1)
        return out

    async def sign_one(self, source: Path, fmt: str, dest: Path) -> tuple[str, bool]:
        """Sign one file with one format; returns (server url, came from cache).

        Raises a :class:`ClientError` of the kind that ended the attempts."""
        server, cached, _ = await self._sign_one(source, fmt, dest)
        return server, cached

    async def _sign_one(self, source: Path, fmt: str, dest: Path) -> tuple[str, bool, list[LogProof]]:
        """:meth:`sign_one`, and the signing log proof of the result (with ``log_proof``)."""
        job = await _File.read(source, fmt, dest, self.cache_dir is not None or self.token is None)
        # (a cached result carries no proof: one whose proof is to be checked comes from a server)
        if not self.log_proof and self._from_cache(job.wire, job.digest, dest):
            return "", True, []
        servers = self._servers_for(job.wire)
        if not servers:
            raise ClientError(f"no server serves format '{fmt}'")
        if self.log_proof:  # received beside it, and proven, before it takes dest's place
            job.dest = _temp_beside(dest)
        try:
            server, proofs = await self._signed(job, servers)
            if job.dest != dest:
                with _local(dest):
                    os.replace(job.dest, dest)
        finally:
            if job.dest != dest:
                job.dest.unlink(missing_ok=True)
        self._to_cache(job.wire, job.digest, dest)
        return server.url, False, proofs

    async def _signed(self, job: _File, servers: list[Server]) -> tuple[Server, list[LogProof]]:
        """Attempts until a server's result is in ``job.dest`` (and, with ``log_proof``, its
        proof checked): the server, and the proof."""
        att = _Attempts(_Deadline(self.timeout))
        while True:
            candidates = att.candidates(servers, self.max_errors)
            failure = att.failure(job, candidates)
            if failure is not None:
                raise failure
            server = await self._next_server(job, att, candidates)
            if server is not None and await self._attempt(job, att, server):
                return server, [await self._prove(server, job, att.deadline)] if self.log_proof else []

    async def _prove(self, server: Server, job: _File, deadline: _Deadline) -> LogProof:
        """Fetch and check the signing log's inclusion proof of the result just received."""
        index = self._log_index.pop(job.dest, None)
        what = f"{job.source.name} ({job.fmt}): {server.url}"
        if index is None:
            raise SigningRefused(f"{what} named no signing log entry for the result (is its log on?)")
        try:
            async with self._http().get(
                f"{server.url}/log/proof/{index}",
                timeout=deadline.timeout(LONG_POLL_READ),
                allow_redirects=False,
            ) as r:
                if r.status != 200:
                    reason = r.headers.get("X-Sealbox-Error") or r.reason
                    raise ProofFailed(f"GET /log/proof/{index} answered {r.status} {reason}")
                raw = await _answer(r)
                if raw is None:
                    raise ProofFailed(f"GET /log/proof/{index}: the answer is over {ANSWER_LIMIT} bytes")
                try:
                    answer = json.loads(raw)
                except (ValueError, RecursionError) as e:
                    raise ProofFailed(f"GET /log/proof/{index}: not JSON: {type(e).__name__}") from None
            checked = (answer, index, job.wire, job.digest, job.dest, job.source, server.url, self.log_key)
            proof = await asyncio.to_thread(check_proof, *checked)  # hashes the result
        except ProofFailed as e:
            raise SigningRefused(f"{what}: signing log proof failed: {e}") from None
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            why = describe_error(e)
            raise ServerUnavailable(f"{what}: cannot fetch the signing log proof: {why}") from None
        self.log_proofs.append(proof)
        return proof

    async def _next_server(self, job: _File, att: _Attempts, candidates: list[Server]) -> Server | None:
        """The host to try next: one not tried since the last pause and not left out as down."""
        server = next((s for s in candidates if s.url not in att.tried and self._usable(s)), None)
        if server is not None:
            return server
        # Every host failed since the last pause or is left out as down: pause, then
        # take a usable one, or ask the others (one shared heartbeat each) if they are back.
        att.pauses += 1
        await asyncio.sleep(min(_backoff(att.pauses), max(0.0, att.deadline.left())))
        att.tried.clear()
        server = next((s for s in candidates if self._usable(s)), None)
        if server is None and att.deadline.left() > 0:
            server = await self._first_alive(candidates, att.deadline)
            if server is None:
                att.errors.append(f"{candidates[0].url}: {self._health_of(candidates[0]).reason}")
                self._retrying(job.source, job.fmt, att.errors[-1])
        return server

    async def _attempt(self, job: _File, att: _Attempts, server: Server) -> bool:
        """One exchange with ``server``; True once ``job.dest`` holds the result."""
        try:
            state = await self._exchange(job, att, server)
            if state == "done":
                return True
            if state.startswith("failed:") and server.url in att.uploaded:
                att.refuse(server, state.removeprefix("failed:"), SigningRefused)
        except _Refused as e:
            att.refuse(server, str(e), e.kind)
        except aiohttp.ClientConnectorCertificateError as e:
            att.refuse(server, describe_error(e), SigningRefused)  # trying again will not make it trusted
        except (aiohttp.ClientError, TimeoutError, OSError, _Retry, _Hung) as e:
            what = f"{server.url}: {describe_error(e)}"
            att.errors.append(what)
            if isinstance(e, _Hung | aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
                # down or hung: every file goes elsewhere for a while
                self._mark_bad(server, describe_error(e))
            elif isinstance(e, _Retry | aiohttp.SocketTimeoutError):
                att.answered[server.url] = att.answered.get(server.url, 0) + 1  # it answers, wrongly
            att.tried.add(server.url)
            self._rotate(job.wire, server)
            if att.deadline.left() > 0:
                self._retrying(job.source, job.fmt, what)
        return False

    async def _exchange(self, job: _File, att: _Attempts, server: Server) -> str:
        """Poll or upload (then poll) once: "done", "pending", "unknown" or "failed:<reason>"."""
        # Small files go up at once (POST, answered with the result): a round trip less than
        # asking first. Large files already hashed (for the cache, or without a token) are asked
        # about first, so a server that has them saves the upload.
        # A big file not hashed yet goes up at once too: the upload hashes it.
        if self.token is not None and (
            not job.digest or (job.data is not None and server.url not in att.uploaded)
        ):
            att.uploaded.add(server.url)
            state = await self._watch(server, self._upload(server, job, att.deadline))
        else:
            state = await self._watch(server, self._poll(server, job, att.deadline))
        if state == "unknown" or (state.startswith("failed:") and server.url not in att.uploaded):
            # Unknown to the server, or a failure we did not cause (it may have been
            # transient, and uploading again clears it): upload.
            att.uploaded.add(server.url)
            state = await self._watch(server, self._upload(server, job, att.deadline))
        return state

    # -- protocol steps ---------------------------------------------------------------------
    async def _poll(self, server: Server, job: _File, deadline: _Deadline) -> str:
        url = f"{server.url}/sign/{job.wire}/{job.digest}"
        started = time.monotonic()
        async with self._http().get(
            url, timeout=deadline.timeout(LONG_POLL_READ), allow_redirects=False
        ) as r:
            if r.status < 400:
                expected = r.headers.get("X-SHA1-Digest")
                if not expected:
                    raise _Retry("answer without X-SHA1-Digest")
                await self._receive(r, job, expected.lower())
                return "done"
            await _answer(r)
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
                raise _Refused(f"{r.status} {reason or r.reason}", _refusal_kind(r.headers))
            return "unknown"

    async def _receive(self, r: aiohttp.ClientResponse, job: _File, expected: str) -> None:
        """Write the result ``r`` brings to ``job.dest``, once whole and of SHA-1 ``expected``.
        One bigger than twice the input and ``RESULT_MARGIN`` is a bad answer (no signature
        is that big: an answer without end must not fill the disk)."""
        dest, most = job.dest, 2 * job.size + RESULT_MARGIN
        index = log_index(r.headers.get(LOG_INDEX_HEADER, ""))
        if index is not None:
            self._log_index[dest] = index
        if r.content_length is not None and r.content_length > most:
            raise _Retry(f"a result of {r.content_length} bytes for an input of {job.size}")
        if r.content_length is not None and r.content_length <= SMALL_FILE:
            # A small result is checked in memory and written in one go. (Handing the write
            # to a thread measured slower: the thread and this loop trade the GIL.)
            body = await r.read()
            if hashlib.sha1(body, usedforsecurity=False).hexdigest() != expected:
                raise _Retry("downloaded result does not match its X-SHA1-Digest")
            _write_atomic(dest, body)
            return
        h = hashlib.sha1(usedforsecurity=False)
        size = 0
        with _replacing(dest) as tmp, tmp.open("wb") as f:
            async for chunk in r.content.iter_chunked(CHUNK):  # (its errors are the server's)
                size += len(chunk)
                if size > most:
                    r.close()
                    raise _Retry(f"a result of over {most} bytes for an input of {job.size}")
                h.update(chunk)
                f.write(chunk)
            if h.hexdigest() != expected:
                raise _Retry("downloaded result does not match its X-SHA1-Digest")

    async def _upload(self, server: Server, job: _File, deadline: _Deadline) -> str:
        """Upload; "done" if the server answered with the result (uploads ask it to wait for
        the job: a round trip less), "failed:<reason>" or "pending"."""
        token = self.token
        if token is None:
            raise _Refused("no token: pass -t/--token-file", TokenRefused)
        h = self._health_of(server)
        # The server may hash a big file for us unless the signing log proof is to be checked
        # against our own hash of the input.
        if job.data is None and not job.digest and h.names_uploads and not self.log_proof:
            state = await self._send(server, job, token, deadline, h, unhashed=True)
            if state != "unnamed":
                return state
            # it stopped naming uploads (a replica of an older release behind the same
            # address?): the same upload again, hashed as it goes
        return await self._send(server, job, token, deadline, h, unhashed=False)

    async def _send(
        self, server: Server, job: _File, token: str, deadline: _Deadline, h: _Health, unhashed: bool
    ) -> str:
        """One upload (:meth:`_upload`); "unnamed" if it went ``unhashed`` and the answer did
        not name it."""
        source, data, size = job.source, job.data, job.size
        nonce = ""
        if self.nonce_file is not None:
            # unused (signtool's nonce): one that cannot be sent as a field is not sent
            with contextlib.suppress(OSError, ConfigError):
                nonce = read_small_text(self.nonce_file, NONCE_LIMIT)
        fields = {"sha1": job.digest, "filename": source.name, "token": token, "nonce": nonce}
        body: Any
        streamed: _StreamedForm | None = None
        if data is not None:
            # A small form is built in one piece (one TLS record, not one per part line);
            # aiohttp's FormData machinery cost ~0.7 ms of CPU per small file.
            content_type, body = _small_form(fields, source.name, data)
            headers = {"Content-Type": content_type}
        else:  # a big file is streamed from disk
            body = streamed = _StreamedForm(fields, job, unhashed)
            headers = {"Content-Type": streamed.content_type, "Content-Length": str(streamed.length)}
            if unhashed:
                headers[HASH_UPLOAD_HEADER] = "1"
        headers[WAIT_HEADER] = str(int(UPLOAD_WAIT))
        # Sending takes time proportional to the size; allow ~20 MB/s at worst.
        read = max(60.0, size / 20e6) + UPLOAD_WAIT
        async with self._posted(server, job.wire, body, headers, deadline.timeout(read), streamed) as r:
            named = r.headers.get(INPUT_SHA1_HEADER, "")
            if is_sha1_hex(named):
                h.names_uploads = True
            elif unhashed and REFUSAL_HEADER not in r.headers and r.status < 500:
                # Not a refusal before the file was read: it read it (or would have) and named
                # nothing, as a server of an earlier release does.
                h.names_uploads = False
                await _answer(r)
                return "unnamed"
            if streamed is not None:
                # the file went whole: its digest names it from now on
                job.digest = named if unhashed else streamed.sha1
            if self.nonce_file is not None and "X-Nonce" in r.headers:
                with contextlib.suppress(OSError):
                    self.nonce_file.write_text(r.headers["X-Nonce"])
            if r.status == 200 and "X-SHA1-Digest" in r.headers:
                await self._receive(r, job, r.headers["X-SHA1-Digest"].lower())
                return "done"
            await _answer(r)
            reason = r.headers.get("X-Sealbox-Error")
            if r.status == 404 and reason:  # the job failed (answer of a waited upload)
                return "failed:" + reason
            if r.status == 404:  # a waited upload whose input left the server: send it again
                return "unknown"
            if r.status >= 500:
                raise _Retry(f"upload failed: {r.status} {reason or r.reason}")
            if r.status >= 400:
                raise _Refused(f"{r.status} {reason or r.reason}", _refusal_kind(r.headers))
            return "pending"

    @contextlib.asynccontextmanager
    async def _posted(
        self,
        server: Server,
        wire: str,
        body: Any,
        headers: dict[str, str],
        timeout: aiohttp.ClientTimeout,
        streamed: _StreamedForm | None,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """The answer to an upload; :class:`InputChanged` if the file changed as it was sent
        (aiohttp reports that as a connection error: it would be retried, and fail again)."""
        try:
            async with self._http().post(  # no redirect: the token and the file go to this server only
                self._upload_url(server, wire),
                data=body,
                headers=headers,
                timeout=timeout,
                allow_redirects=False,
            ) as r:
                yield r
        except (aiohttp.ClientError, OSError):
            if streamed is not None and streamed.changed:
                raise InputChanged(f"{streamed.changed}: sign it once it is written") from None
            raise

    def _upload_url(self, server: Server, wire: str) -> yarl.URL:
        # Parsed once: URL parsing is a noticeable part of a small upload's client CPU.
        key = (server.url, wire)
        if key not in self._urls:
            self._urls[key] = yarl.URL(f"{server.url}/sign/{wire}")
        return self._urls[key]

    # -- host health ------------------------------------------------------------------------
    def _health_of(self, server: Server) -> _Health:
        h = self._health.get(server.url)
        if h is None:
            h = self._health[server.url] = _Health()
        return h

    def _usable(self, server: Server) -> bool:
        h = self._health_of(server)
        if not h.bad_until:
            return True
        if time.monotonic() >= h.bad_until:
            self._probe(server)  # left out long enough: one probe decides, files go elsewhere meanwhile
        return False

    def _mark_bad(self, server: Server, reason: str) -> None:
        h = self._health_of(server)
        if not h.bad_until:  # the first to find it down says why; others found the same
            h.bad_until = time.monotonic() + BENCH
            h.reason = reason

    def _probe(self, server: Server) -> asyncio.Task[bool]:
        """The heartbeat of ``server`` running now, or a new one: one at a time per host."""
        h = self._health_of(server)
        if h.probe is None or h.probe.done():
            h.probe = asyncio.ensure_future(self._heartbeat(server, h))
        return h.probe

    async def _heartbeat(self, server: Server, h: _Health) -> bool:
        """True if the host answers ``GET /__heartbeat__`` at all (any status: even a classic
        server's 404 shows it is alive); else it is left out for ``BENCH`` s."""
        try:
            async with self._probe_http().get(
                f"{server.url}/__heartbeat__",
                timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT, sock_connect=CONNECT_TIMEOUT),
                allow_redirects=False,
            ) as r:
                await _answer(r)
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            h.bad_until = time.monotonic() + BENCH
            what = "not responding" if isinstance(e, TimeoutError) else describe_error(e)
            h.reason = f"{what} (no heartbeat in {PROBE_TIMEOUT:g} s)"
            return False
        h.bad_until, h.alive_at = 0.0, time.monotonic()
        return True

    async def _first_alive(self, servers: Sequence[Server], deadline: _Deadline) -> Server | None:
        """The first of ``servers`` whose heartbeat answers (each host probed once, shared)."""
        probes = {self._probe(s): s for s in servers}
        pending = set(probes)
        while pending and deadline.left() > 0:
            done, pending = await asyncio.wait(
                pending, timeout=deadline.left(), return_when=asyncio.FIRST_COMPLETED
            )
            alive = [probes[p] for p in done if p.result()]
            if alive:
                return alive[0]
        return None

    async def _watch(self, server: Server, work: Coroutine[Any, Any, str]) -> str:
        """Run one exchange with ``server``, abandoning it (``_Hung``) if the host stops
        answering: quiet for ``FIRST_BYTE`` s, it must answer a heartbeat to be waited on."""
        h = self._health_of(server)
        task = asyncio.ensure_future(work)
        started = time.monotonic()
        try:
            while not task.done():
                if h.bad_until:  # another exchange found the host down or hung
                    raise _Hung(h.reason or "not responding")
                quiet = time.monotonic() - max(started, h.alive_at)
                if quiet < FIRST_BYTE:
                    await asyncio.wait({task}, timeout=min(_WATCH_TICK, FIRST_BYTE - quiet))
                    continue
                probe = self._probe(server)
                await asyncio.wait({task, probe}, return_when=asyncio.FIRST_COMPLETED)
                if not task.done() and probe.done() and not probe.result():
                    raise _Hung(f"no answer in {time.monotonic() - started:.0f} s, and {h.reason}")
            state = task.result()
            h.alive_at = time.monotonic()
            return state
        finally:
            if not task.done():
                task.cancel()
                await asyncio.wait({task})

    def _retrying(self, source: Path, fmt: str, error: str) -> None:
        if self.on_retry is not None:
            self.on_retry(source, fmt, error)

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
        with _replacing(self.cache_dir / wire / digest) as tmp:
            shutil.copyfile(result, tmp)


class _Retry(Exception):
    """Worth another attempt (possibly on another server)."""


class _Refused(Exception):
    """This server will not sign this input; trying it again is pointless."""

    def __init__(self, reason: str, kind: type[ClientError] = SigningRefused) -> None:
        super().__init__(reason)
        self.kind = kind


def _refusal_kind(headers: Mapping[str, str]) -> type[ClientError]:
    """The kind of a 4xx answer: the classic protocol refuses a bad token with a 400 like a
    bad input. A sealbox server says which (``X-Sealbox-Refusal``: ``token_...``); a server
    of an earlier release only in its reason (``X-Sealbox-Error``)."""
    kind = headers.get(REFUSAL_HEADER)
    if kind is not None:
        return TokenRefused if kind.startswith("token_") else SigningRefused
    if headers.get("X-Sealbox-Error", "").startswith(("Invalid token", "Missing token")):
        return TokenRefused
    return SigningRefused


class _Hung(Exception):
    """The host stopped answering (no heartbeat either): try elsewhere, or later."""
