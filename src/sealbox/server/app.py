"""HTTP handlers: thin, wire-compatible with the classic signing server.

Order of checks for every request: peer address in ``allowed_ips`` (403), then method and
route. ``POST /token`` additionally needs an issuer address and HTTP Basic credentials.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import contextlib
import errno
import hashlib
import ipaddress
import logging
import re
import time
import unicodedata
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import multipart
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError

from ..errors import TokenError
from ..hashing import CHUNK, is_sha1_hex
from ..signlog import RequestContext
from ..wire import HASH_UPLOAD_HEADER, INPUT_SHA1_HEADER, LOG_INDEX_HEADER, SMALL_FILE, WAIT_HEADER
from . import logapi, tokens
from .answers import REFUSAL, refuse, safe_text
from .config import Network, ServerConfig
from .credentials import check_password
from .health import Health, version_info
from .jobs import TRANSIENT_FAILURE_TTL, JobManager
from .metrics import Metrics
from .storage import NOT_KEPT, Input, Result, Storage

log = logging.getLogger("sealbox.http")

MULTIPART_OVERHEAD = 64 * 1024  # room for the small form fields around filedata
NONCE = {"X-Nonce": "UNUSED"}
#: chunks of a big upload (aiohttp hands them over ~256 KiB at a time) waiting for its spooling
#: thread at most: what an upload may hold in memory beyond the socket buffers
SPOOL_AHEAD = 16
#: a big upload's first bytes hashed and written on the event loop, the rest in a thread
SPOOL_INLINE = 4 * 1024 * 1024
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

CONFIG = web.AppKey("config", ServerConfig)
JOBS = web.AppKey("jobs", JobManager)
STORAGE = web.AppKey("storage", Storage)
SECRETS = web.AppKey("secrets", list[bytes])
HEALTH = web.AppKey("health", Health)
METRICS = web.AppKey("metrics", Metrics)
VERSION = web.AppKey("version", dict[str, str])


def peer_ip(request: web.BaseRequest) -> str:
    return tokens.normalize_ip(request.remote or "0.0.0.0")


def _allowed(ip: str, networks: Sequence[Network]) -> bool:
    addr = ipaddress.ip_address(ip)
    return any(addr in net for net in networks)


HANDLED = web.RequestKey("handled", bool)
#: the upload's token, once verified (its bound address and validity go to the signing log)
TOKEN = web.RequestKey("token", tokens.TokenInfo)


@web.middleware
async def access_and_log(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The address check, and an answer whatever a handler raises (the request line itself is
    :class:`AccessLog`'s, which also sees what aiohttp refuses before any handler)."""
    request[HANDLED] = True
    if not _allowed(peer_ip(request), request.app[CONFIG].security.allowed_ips):
        return web.Response(status=403)
    try:
        return await handler(request)
    except web.HTTPException:
        raise  # a response already: aiohttp sends it
    except Exception as e:
        return _failed(request, e)


def _failed(request: web.Request, exc: Exception) -> web.StreamResponse:
    """The answer to a handler's exception; only a real crash is logged with its traceback."""
    transport = request.transport
    response: web.StreamResponse
    if isinstance(exc, ConnectionError) and (transport is None or transport.is_closing()):
        # The client went away mid-request: nothing can be sent, the status is only logged
        # (nginx's "client closed request").
        response = web.Response(status=499)
    elif isinstance(exc, (HttpProcessingError, web.RequestPayloadError)):
        # The body broke its framing or encoding (bad chunks, bad gzip): the client's mistake.
        why = _first_line(str(exc).partition("message:")[2])
        response = refuse(400, f"malformed request body: {why}")
    else:
        fields = {"event": "crash", "peer": peer_ip(request), "method": request.method, "path": request.path}
        log.error("crash", exc_info=exc, extra={"fields": fields})
        response = refuse(500, "internal server error")
    response.force_close()  # whatever is left of the request cannot be trusted
    if request.writer.output_size > 0 and transport is not None:
        # The handler's response was under way: no second one can follow. Cutting the
        # connection tells the client its answer is incomplete.
        transport.close()
    return response


def _first_line(text: str) -> str:
    return text.strip().partition("\n")[0].rstrip(": ")


class AccessLog(AbstractAccessLogger):
    """The request line: one per request, written by aiohttp once the answer is sent, so it
    covers what aiohttp refuses itself (malformed HTTP, before any handler: no method or
    path to tell) and crashes alike."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, elapsed: float) -> None:
        handled = request.get(HANDLED, False)
        fields: dict[str, Any] = {
            "event": "request",
            "peer": peer_ip(request),
            "method": request.method if handled else None,
            "path": request.path if handled else None,
            "status": response.status,
            "bytes_in": request.content_length or 0,
            "ms": round(elapsed * 1000, 1),
        }
        reason = response.headers.get("X-Sealbox-Error")
        if reason is None and response.status >= 400 and isinstance(response, web.Response):
            body = response.body  # aiohttp's own refusals explain themselves here
            if isinstance(body, bytes) and body:
                reason = safe_text(_first_line(body.decode("utf-8", "replace")))
        if reason:
            fields["reason"] = reason
        self.logger.info("request", extra={"fields": fields})


# -- POST /token ----------------------------------------------------------------------------------
async def mint_token(request: web.Request) -> web.Response:
    cfg = request.app[CONFIG]
    if not _allowed(peer_ip(request), cfg.security.token_issuer_ips):
        return web.Response(status=403)
    user = await _issuer(request)
    if user is None:
        return web.Response(status=401)
    try:
        async with asyncio.timeout(cfg.server.body_timeout):  # a stalled body must not hold us
            form = await request.post()
    except (ValueError, LookupError) as e:  # no boundary, bytes not in the charset, no such charset
        return refuse(400, f"malformed form: {e}")
    except TimeoutError:
        return refuse(408, f"token request stalled: no form within {cfg.server.body_timeout:g} s", close=True)
    slave_ip, duration_s = form.get("slave_ip"), form.get("duration")
    if not isinstance(slave_ip, str) or not isinstance(duration_s, str):
        return refuse(400, "slave_ip and duration are required")
    try:
        duration = int(duration_s)
    except ValueError:
        return refuse(400, "duration must be an integer number of seconds")
    if not 0 < duration <= cfg.security.max_token_age:
        return refuse(400, f"duration must be between 1 and {cfg.security.max_token_age} seconds")
    try:
        token = tokens.mint(request.app[SECRETS][0], slave_ip, duration)
    except ValueError:
        return refuse(400, "slave_ip is not an IP address")
    request.app[METRICS].token_minted()
    recorder = request.app[JOBS].recorder
    if recorder is not None:  # the signing log names the issuer of each upload's token
        recorder.issuers.remember(token, user)
    return web.Response(text=token)


async def _issuer(request: web.Request) -> str | None:
    """The token issuer the request's HTTP Basic credentials name, if they are right."""
    auth = request.headers.get("Authorization", "").split()
    if len(auth) != 2 or auth[0] != "Basic":
        return None
    try:
        user, _, password = base64.b64decode(auth[1], validate=True).decode("utf-8").partition(":")
    except ValueError:  # not base64 (binascii.Error), not ASCII, not UTF-8 (UnicodeDecodeError)
        return None
    loop = asyncio.get_running_loop()
    ok = False
    for entry in request.app[CONFIG].security.token_issuers:
        name, _, hashed = entry.partition(":")
        # scrypt is deliberately slow: keep it off the event loop; check every entry.
        ok |= (name == user) & await loop.run_in_executor(None, check_password, password, hashed)
    return user if ok else None


# -- GET /sign/<fmt>/<sha1> -----------------------------------------------------------------------
async def get_result(request: web.Request) -> web.StreamResponse:
    fmt, sha1 = request.match_info["fmt"], request.match_info["sha1"]
    cfg, jobs = request.app[CONFIG], request.app[JOBS]
    if fmt not in cfg.formats or fmt not in jobs.signers:
        return refuse(400, f"unknown format '{fmt}'")
    if not is_sha1_hex(sha1):
        return refuse(400, "the digest must be 40 lowercase hex digits")
    return await _outcome(request, fmt, sha1, cfg.server.get_hold, _still_pending)


def _still_pending() -> web.Response:
    return web.Response(status=404, headers={"X-Pending": "True"})


async def _outcome(
    request: web.Request, fmt: str, sha1: str, hold: float, pending: Callable[[], web.Response]
) -> web.StreamResponse:
    """What a poll for (fmt, sha1) answers, waiting up to ``hold`` seconds for its job:
    the result, the reason it failed, a plain 404 (unknown: upload it) or ``pending()``."""
    jobs, storage = request.app[JOBS], request.app[STORAGE]
    deadline = time.monotonic() + hold
    while True:
        found = storage.result(fmt, sha1)
        if found is not None:
            return await _send_result(request, found, jobs.log_index(fmt, sha1))
        failure = storage.failure(fmt, sha1, TRANSIENT_FAILURE_TTL)
        if failure is not None:
            return refuse(404, f"signing failed: {failure.reason}")
        if not jobs.pending(fmt, sha1):
            if not storage.has_input(sha1):
                return web.Response(status=404)
            # Content already here (other format or an output): no upload. The log records this request.
            jobs.submit(fmt, sha1, context=RequestContext("get", peer_ip(request)))
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not await jobs.wait(fmt, sha1, remaining):
            return pending()


async def _send_result(
    request: web.Request, found: Result, log_index: int | None = None
) -> web.StreamResponse:
    headers = {"X-SHA1-Digest": found.digest, "Content-Type": "application/octet-stream"}
    if log_index is not None:  # where the signing log recorded it: GET /log/proof/<index>
        headers[LOG_INDEX_HEADER] = str(log_index)
    body = found.body
    if body is not None:  # held in memory: one write
        return web.Response(body=body, headers=headers)
    response = web.StreamResponse(headers=headers)
    response.content_length = found.size
    await response.prepare(request)
    with found.open() as f:
        while chunk := f.read(CHUNK):
            await response.write(chunk)
    await response.write_eof()
    return response


# -- POST /sign/<fmt> -----------------------------------------------------------------------------
FIELDS = ("sha1", "filename", "token", "nonce")
#: the SHA-1 of an upload's ``filedata``, once read whole (for :data:`INPUT_SHA1_HEADER`)
INPUT_SHA1 = web.RequestKey("input_sha1", str)
MAX_FIELD = 4096


class _Malformed(Exception):
    """The body is not the multipart form the protocol describes."""


def _boundary(content_type: str) -> str | None:
    kind, options = multipart.parse_options_header(content_type)
    boundary = options.get("boundary", "")
    if kind != "multipart/form-data" or not 0 < len(boundary) <= 70:
        return None
    return str(boundary)


class _TooLarge(Exception):
    """The body is longer than an upload may be (no Content-Length said so first)."""


async def _parts(
    request: web.Request, boundary: str, idle: float, most: int
) -> AsyncGenerator[tuple[str, AsyncIterator[bytes]]]:
    """The form's parts as (name, body chunks), streamed; a part must be read before the next.

    A body that sends nothing for ``idle`` seconds raises TimeoutError: a stalled (or
    unparseable, which aiohttp turns into silence) upload must not hold a handler forever.
    More than ``most`` bytes (as decoded: chunked or compressed bodies announce no length)
    raise :class:`_TooLarge`, whatever part they are in."""
    parser = multipart.PushMultipartParser(boundary, max_header_count=8, max_segment_count=16, strict=True)

    async def events() -> AsyncIterator[Any]:
        left = most
        try:
            while True:
                async with asyncio.timeout(idle):
                    chunk = await request.content.readany()
                if not chunk:
                    break
                left -= len(chunk)
                if left < 0:
                    raise _TooLarge
                for event in parser.parse(chunk):
                    yield event
            for event in parser.parse(b""):  # the end: raises if the final boundary is missing
                yield event
        except multipart.MultipartError as e:
            raise _Malformed(str(e)) from None

    source = events()

    async def body() -> AsyncIterator[bytes]:
        async for event in source:
            if event is None:
                return
            yield event

    async for event in source:
        if not isinstance(event, multipart.MultipartSegment) or event.disposition != "form-data":
            raise _Malformed("every part must be a form-data field")
        chunks = body()
        yield event.name or "", chunks
        async for _ in chunks:  # whatever the caller left unread
            pass


class _NoRoom(Exception):
    """An upload could not be written to the server's disk (full, read-only, failing)."""

    def __init__(self, e: OSError) -> None:
        super().__init__(e.strerror or type(e).__name__)
        self.full = e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _no_room(e: _NoRoom) -> web.Response:
    """The server's trouble, not the input's: 507 (503), and a client tries another server."""
    return refuse(507 if e.full else 503, f"the server cannot store the upload now: {e}", close=True)


class _Spool:
    """A big upload's bytes hashed (SHA-1, SHA-256) and, when kept, written to a temp file: the
    one pass over them here. Its first :data:`SPOOL_INLINE` bytes are taken on the event loop
    (a thread costs more than that much hashing); the rest in a thread of its own while the
    loop goes on receiving, with at most :data:`SPOOL_AHEAD` chunks waiting for it."""

    def __init__(self, storage: Storage | None) -> None:
        self.sha1 = hashlib.sha1(usedforsecurity=False)
        self.sha256 = hashlib.sha256()
        self.path: Path | None = None
        self.file: BinaryIO | None = None
        if storage is not None:
            try:
                self.path, self.file = storage.temp_file()
            except OSError as e:
                raise _NoRoom(e) from None
        self._inline = SPOOL_INLINE
        self._thread: concurrent.futures.ThreadPoolExecutor | None = None
        self._ahead: collections.deque[concurrent.futures.Future[None]] = collections.deque()

    def _take(self, chunk: bytes) -> None:
        self.sha1.update(chunk)
        self.sha256.update(chunk)
        if self.file is not None:
            try:
                self.file.write(chunk)
            except OSError as e:
                raise _NoRoom(e) from None

    async def feed(self, chunk: bytes) -> None:
        if self._thread is None:
            if len(chunk) <= self._inline:
                self._inline -= len(chunk)
                self._take(chunk)
                return
            self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sealbox-spool")
        self._ahead.append(self._thread.submit(self._take, chunk))
        # What the thread took is checked here and now (.result() raises what it raised): awaiting
        # a done future would still cost a wake-up of the loop per chunk. Wait only when too far behind.
        while self._ahead and self._ahead[0].done():
            self._ahead.popleft().result()
        if len(self._ahead) > SPOOL_AHEAD:
            await asyncio.wrap_future(self._ahead.popleft())

    async def finish(self) -> None:
        """Wait for the thread to take every chunk; the file is then closed and whole."""
        while self._ahead:
            await asyncio.wrap_future(self._ahead.popleft())
        if self._thread is not None:
            self._thread.shutdown()
        if self.file is not None:
            try:
                self.file.close()  # (flushes the last bytes)
            except OSError as e:
                raise _NoRoom(e) from None

    def discard(self) -> None:
        """Stop (the chunks not yet taken are dropped) and remove the file."""
        for future in self._ahead:
            future.cancel()
        if self._thread is not None:
            self._thread.shutdown()  # waits for the chunk in hand: the file is not written after
        if self.file is not None:
            with contextlib.suppress(OSError):  # what did not reach the disk is discarded anyway
                self.file.close()
        if self.path is not None:
            self.path.unlink(missing_ok=True)


class _Upload:
    """``filedata`` as it arrives, hashed in the same pass: kept in memory while small; past
    :data:`~sealbox.wire.SMALL_FILE` bytes handed to a :class:`_Spool`, which also takes its
    SHA-256 (the signers that need one get it, and no one reads the file again). A format that
    signs a digest alone (``keep`` false: gpg) gets a big upload's digests, not its bytes."""

    def __init__(self, storage: Storage, limit: int, keep: bool = True) -> None:
        self.storage = storage
        self.limit = limit
        self.keep = keep
        self.size = 0
        self.sha1 = ""  # hex, once read
        self.data = bytearray()
        self.spool: _Spool | None = None
        self.seen = False
        self.known = False  # the server already has this file: not read
        self.late = False  # the sha1 field follows filedata

    async def consume(self, chunks: AsyncIterator[bytes]) -> bool:
        """Read the part; False if it is over the limit (the rest is not stored)."""
        self.seen = True
        async for chunk in chunks:
            self.size += len(chunk)
            if self.size > self.limit:
                return False
            if self.spool is not None:
                await self.spool.feed(chunk)
                continue
            self.data += chunk
            if self.size > SMALL_FILE:
                self.spool = _Spool(self.storage if self.keep else None)
                await self.spool.feed(bytes(self.data))
                self.data = bytearray()
        if self.spool is not None:
            await self.spool.finish()
            self.sha1 = self.spool.sha1.hexdigest()
        else:
            self.sha1 = hashlib.sha1(self.data, usedforsecurity=False).hexdigest()
        return True

    def take(self, sha1: str, filename: str) -> Input:
        """The verified upload as its job's input: its bytes, or its file, moved into the store,
        or (not kept) its digests alone."""
        spool = self.spool
        if spool is None:
            return Input(bytes(self.data), self.size, sha1=sha1, filename=filename)
        digests = {"sha256": spool.sha256}
        if spool.path is None:
            return Input(NOT_KEPT, self.size, sha1=sha1, filename=filename, digests=digests)
        spooled = Input(spool.path, self.size, sha1=sha1, filename=filename, digests=digests)
        item = self.storage.put_input(spooled)
        spool.path = None  # the store's now
        return item

    def discard(self) -> None:
        if self.spool is not None:
            self.spool.discard()


def _valid_filename(name: str, patterns: Sequence[str]) -> str | None:
    """Why ``name`` is refused (None: it is not). A name holds no path and no control character
    or line break (with those gone, a pattern's ``$`` cannot match before a final newline)."""
    plain = name not in ("", ".", "..") and len(name) <= 255 and not any(c in name for c in "/\\")
    if not plain or any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in name):
        return "the filename must be a plain file name"
    if not any(re.match(p, name) for p in patterns):
        return "Unacceptable filename: not allowed by this server's allowed_filenames"
    return None


async def upload(request: web.Request) -> web.StreamResponse:
    """``POST /sign/<fmt>`` (:func:`_upload`), its refusals counted by reason."""
    response = await _upload(request)
    refusal = response.get(REFUSAL)
    if refusal is not None:
        request.app[METRICS].refused(refusal)
    return response


async def _upload(request: web.Request) -> web.StreamResponse:
    fmt = request.match_info["fmt"]
    cfg, jobs, storage = request.app[CONFIG], request.app[JOBS], request.app[STORAGE]
    known = fmt in cfg.formats and fmt in jobs.signers
    limit = cfg.max_filesize(fmt) if known else cfg.server.max_filesize
    if request.content_length is not None and request.content_length > limit + MULTIPART_OVERHEAD:
        return refuse(413, f"File too large: over {limit} bytes for {fmt}", refusal="size")
    boundary = _boundary(request.headers.get("Content-Type", ""))
    if boundary is None:
        return refuse(400, "expected multipart/form-data with a boundary", refusal="malformed")
    fields: dict[str, str] = {}
    data = _Upload(storage, limit, keep=not (known and jobs.signers[fmt].digest_only))
    try:
        try:
            most = limit + MULTIPART_OVERHEAD
            async with contextlib.aclosing(_parts(request, boundary, cfg.server.body_timeout, most)) as parts:
                refused = await _read_form(request, parts, fields, data, fmt, known)
        except (_Malformed, ValueError, asyncio.IncompleteReadError) as e:
            return refuse(400, f"malformed multipart body: {e}", refusal="malformed")
        except _TooLarge:
            # (the rest of the body is not read)
            return refuse(413, f"File too large: over {limit} bytes for {fmt}", refusal="size", close=True)
        except _NoRoom as e:
            return _no_room(e)
        except TimeoutError:
            stalled = f"upload stalled: no data for {cfg.server.body_timeout:g} s"
            return refuse(408, stalled, refusal="stalled", close=True)
        if data.sha1:
            request[INPUT_SHA1] = data.sha1
        if refused is not None:
            return refused
        if data.known:
            return await _accepted(request, fmt, fields["sha1"], "File is pending")
        try:
            return await _submit(request, fields, data, fmt, known)
        except _NoRoom as e:
            return _no_room(e)
    finally:
        data.discard()


async def _submit(
    request: web.Request, fields: dict[str, str], data: _Upload, fmt: str, known: bool
) -> web.StreamResponse:
    """The form is read: check what is left to check, queue the job, answer."""
    cfg, jobs, storage = request.app[CONFIG], request.app[JOBS], request.app[STORAGE]
    if not data.seen or data.late:
        if data.seen and "sha1" not in fields and request.headers.get(HASH_UPLOAD_HEADER) == "1":
            fields["sha1"] = data.sha1  # the client did not hash it: named by what arrived
        bad = _check_fields(request, fields, fmt, known)
        if bad is not None or not data.seen:
            return bad or refuse(400, "File too small: no filedata", NONCE, "malformed")
    sha1 = fields["sha1"]
    if data.size < cfg.server.min_filesize:
        why = f"File too small: {data.size} bytes, minimum {cfg.server.min_filesize}"
        return refuse(400, why, NONCE, "size")
    if data.sha1 != sha1:
        return refuse(400, "Hash mismatch: filedata does not match the sha1 field", NONCE, "hash_mismatch")
    request.app[METRICS].upload(fmt, data.size)
    # Looked up again: the same content may have been sent twice at once, and a job for
    # (fmt, sha1) runs once (its result is a function of format and content alone).
    if storage.result(fmt, sha1) is not None or jobs.pending(fmt, sha1):
        return await _accepted(request, fmt, sha1, "File is pending")
    storage.clear_failure(fmt, sha1)
    try:
        item = data.take(sha1, fields["filename"])
    except OSError as e:  # moving the spooled file into the store
        raise _NoRoom(e) from None
    jobs.submit(fmt, sha1, item, _upload_context(request, fields))
    return await _accepted(request, fmt, sha1, "Accepted")


async def _read_form(
    request: web.Request,
    parts: AsyncIterator[tuple[str, AsyncIterator[bytes]]],
    fields: dict[str, str],
    data: _Upload,
    fmt: str,
    known: bool,
) -> web.Response | None:
    """Read the form into ``fields`` and ``data``; a response if the upload is refused on the way.

    The fields come first (as signtool sends them), so the token is checked before any of
    ``filedata`` is read, and a file the server already has is not read at all. A ``sha1``
    field may also follow ``filedata`` (a client that hashes a big file while sending it, in
    one pass): the token must still come first; the rest is checked once the form is read.
    No other field may follow ``filedata``: what was checked stays what is used."""
    storage, jobs = request.app[STORAGE], request.app[JOBS]
    async for name, chunks in parts:
        if name == "filedata" and not data.seen:
            data.late = "sha1" not in fields
            if data.late:
                bad = _check_token(request, fields, fmt, known)
            else:
                bad = _check_fields(request, fields, fmt, known)
            if bad is not None:
                return bad
            if not data.late and (
                storage.result(fmt, fields["sha1"]) is not None or jobs.pending(fmt, fields["sha1"])
            ):
                data.known = True  # the server has it: the rest need not be read
                return None
            if not await data.consume(chunks):
                return refuse(400, f"File too large: over {data.limit} bytes for {fmt}", NONCE, "size")
        elif name in FIELDS:
            if data.seen and not (name == "sha1" and data.late and "sha1" not in fields):
                # Checked when filedata began: nothing may change them now (a late sha1 alone
                # may follow, once).
                return refuse(400, f"field {name} after filedata", NONCE, "malformed")
            value = bytearray()
            async for chunk in chunks:
                value += chunk
                if len(value) > MAX_FIELD:
                    return refuse(400, f"field {name} is too long", refusal="malformed")
            fields[name] = value.decode("utf-8", "replace")
    return None


async def _accepted(request: web.Request, fmt: str, sha1: str, text: str) -> web.StreamResponse:
    """202, as the classic protocol answers an upload. A client that sends ``X-Sealbox-Wait: S``
    instead gets what ``GET /sign/<fmt>/<sha1>`` would answer once the job is done (waiting up
    to S seconds, at most ``get_hold``), saving a round trip; 202 if it is still running."""

    def accepted() -> web.Response:
        return web.Response(status=202, text=text + "\n", headers=NONCE)

    try:
        hold = min(float(request.headers.get(WAIT_HEADER, "")), request.app[CONFIG].server.get_hold)
    except ValueError:
        return accepted()
    if not hold > 0:  # also NaN
        return accepted()
    return await _outcome(request, fmt, sha1, hold, accepted)


def _upload_context(request: web.Request, fields: dict[str, str]) -> RequestContext | None:
    """Who asked for an upload's job, for the signing log (None when there is none)."""
    recorder = request.app[JOBS].recorder
    if recorder is None:
        return None
    issuer = recorder.issuers.issuer(fields["token"])
    return RequestContext("upload", peer_ip(request), fields["filename"], request.get(TOKEN), issuer)


def _check_token(request: web.Request, fields: dict[str, str], fmt: str, known: bool) -> web.Response | None:
    """Who asks, and for a format served here: checked before any of ``filedata`` is read."""
    if TOKEN in request:
        return None  # checked already (before a late sha1 field)
    if "token" not in fields:
        return refuse(400, "Missing token", refusal="token_missing")
    secrets: list[bytes] = request.app[SECRETS]
    try:
        request[TOKEN] = tokens.verify(fields["token"], secrets, peer_ip(request))
    except TokenError as e:
        return refuse(400, f"Invalid token: {e}", refusal=f"token_{e.kind}")
    if not known:
        return refuse(400, f"unknown format '{fmt}'", NONCE, "format")
    return None


def _check_fields(request: web.Request, fields: dict[str, str], fmt: str, known: bool) -> web.Response | None:
    cfg, storage = request.app[CONFIG], request.app[STORAGE]
    refused = _check_token(request, fields, fmt, known)
    if refused is not None:
        return refused
    for name in ("sha1", "filename"):
        if name not in fields:
            return refuse(400, f"missing field {name}", NONCE, "malformed")
    if not is_sha1_hex(fields["sha1"]):
        return refuse(400, "the sha1 field must be 40 lowercase hex digits", NONCE, "malformed")
    bad = _valid_filename(fields["filename"], cfg.security.allowed_filenames)
    if bad is not None:
        return refuse(403, bad, NONCE, "filename")
    # The format's rules on names: never remembered, a result depends on the content alone.
    bad = request.app[JOBS].signers[fmt].refuse_name(fields["filename"])
    if bad is not None:
        return refuse(400, bad, NONCE, "filename")
    failure = storage.failure(fmt, fields["sha1"], TRANSIENT_FAILURE_TTL)
    if failure is not None and failure.permanent:
        return refuse(400, f"signing failed: {failure.reason}", NONCE, "remembered_failure")
    return None


async def heartbeat(request: web.Request) -> web.Response:
    """Dockerflow's heartbeat: every check of :mod:`.health` by name; 503 if any failed."""
    checks = await request.app[HEALTH].report()
    failed = sorted(name for name, check in checks.items() if check["status"] == "error")
    request.app[METRICS].health({name: name not in failed for name in checks})
    warned = any(check["status"] == "warning" for check in checks.values())
    body = {
        "status": "error" if failed else "warning" if warned else "ok",
        "level": request.app[CONFIG].server.level,
        "formats": sorted(request.app[JOBS].signers),
        "failed": failed,
        "checks": checks,
    }
    return web.json_response(body, status=503 if failed else 200)


async def lbheartbeat(request: web.Request) -> web.Response:
    """For the load balancer: 200 while the process serves, nothing checked."""
    return web.json_response({"status": "ok"})


async def version(request: web.Request) -> web.Response:
    return web.json_response(request.app[VERSION])


async def bad_request(request: web.Request) -> web.Response:
    if request.method not in ("GET", "POST"):
        return refuse(405, "Method Not Allowed")
    return refuse(400, "Bad Request")


async def _name_the_upload(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer to an upload read whole names it (:data:`INPUT_SHA1_HEADER`): a client
    that let the server hash it polls by that name."""
    sha1 = request.get(INPUT_SHA1)
    if sha1 is not None:
        response.headers[INPUT_SHA1_HEADER] = sha1


def build_app(
    cfg: ServerConfig,
    jobs: JobManager,
    storage: Storage,
    secrets: list[bytes],
    health: Health,
    metrics: Metrics,
) -> web.Application:
    app = web.Application(middlewares=[access_and_log], client_max_size=1024 * 1024)
    app[CONFIG] = cfg
    app[JOBS] = jobs
    app[STORAGE] = storage
    app[SECRETS] = secrets
    app[HEALTH] = health
    app[METRICS] = metrics
    app[VERSION] = version_info()
    app.on_response_prepare.append(_name_the_upload)
    app.router.add_post("/token", mint_token)
    app.router.add_post(r"/token/{rest:.*}", mint_token)
    app.router.add_get("/sign/{fmt}/{sha1}", get_result)
    app.router.add_post("/sign/{fmt}", upload)
    app.router.add_post("/sign/{fmt}/{rest:.*}", upload)
    app.router.add_get("/__heartbeat__", heartbeat)
    app.router.add_get("/__lbheartbeat__", lbheartbeat)
    app.router.add_get("/__version__", version)
    logapi.add_routes(app, jobs.recorder)
    app.router.add_route("*", "/{tail:.*}", bad_request)
    return app
