"""Start-up and lifecycle of ``sealbox serve``: unlock keys, prove them, listen, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import signal
import ssl
import sys
import threading
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler, Middleware
from cryptography.hazmat.primitives.asymmetric import ed25519

from ..errors import ConfigError, KeyUnlockError, SealboxError
from ..formats import signer_class
from ..formats.base import Signer
from ..keys import DEFAULT_PADDING, PassphraseSource, SigningKey, load_key
from ..signlog import Recorder, SignLog
from ..wire import https_url
from .app import AccessLog, build_app
from .app import log as http_log
from .config import ServerConfig, parse_listen
from .health import Health
from .jobs import JOB_THREAD_PREFIX, JobManager
from .metrics import Metrics, PrometheusMetrics, serve_metrics
from .proxy import ProxySite
from .storage import Storage
from .workers import WorkerPool, scratch_base

log = logging.getLogger("sealbox.server")
PROBE = b"sealbox start-up test signature"
#: After the drain, how long aiohttp lets answers still being written finish before it cuts
#: their connections (its default, 60 s, would hold the exit).
SHUTDOWN_GRACE = 2.0


class JsonLines(logging.Formatter):
    """One JSON object per line; structured fields come from ``extra={"fields": {...}}``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        else:
            entry["msg"] = record.getMessage()
        if record.exc_info:
            trace = self.formatException(record.exc_info)
            entry["error"] = trace.splitlines()[-1]
            entry["traceback"] = trace
        return json.dumps(entry, separators=(",", ":"))


def _not_a_client_error(record: logging.LogRecord) -> bool:
    """Drop aiohttp's traceback for malformed HTTP (also when it meets a broken body again
    while reading past an answer): the client's mistake, and the request line
    (:class:`AccessLog`) already records the 400 and why."""
    exc = record.exc_info[1] if record.exc_info else None
    return not isinstance(exc, (HttpProcessingError, web.RequestPayloadError))


def setup_logging(log_file: Path | None = None) -> None:
    """Every line the server writes is JSON: its own, aiohttp's, asyncio's, warnings."""
    handler: logging.Handler = (
        logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    )
    handler.setFormatter(JsonLines())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("sealbox").setLevel(logging.INFO)
    logging.getLogger("aiohttp.server").addFilter(_not_a_client_error)
    logging.getLogger("aiohttp.access").disabled = True  # AccessLog writes the request lines
    logging.captureWarnings(True)


def prove_key(key: SigningKey) -> None:
    """A test signature through the key interface (whatever the backend), checked against its
    public half, and its certificate checked to be for that public half."""
    pad = DEFAULT_PADDING[key.algorithm]
    try:
        sig = key.sign(PROBE, "sha256", pad)
    except SealboxError as e:
        raise KeyUnlockError(f"key '{key.name}': test signature failed: {e}") from None
    digest = PROBE if pad == "ed25519" else hashlib.sha256(PROBE).digest()
    if not key.verifies(sig, digest, "sha256", pad):
        raise KeyUnlockError(f"key '{key.name}': its test signature does not verify with its public key")
    if key.chain and key.chain[0].public_key() != key.public_key:
        raise KeyUnlockError(f"key '{key.name}': the first certificate of its chain is not for this key")


class Signers(dict[str, Signer]):
    """The signers by wire name, and the keys they were given (the heartbeat proves them again)."""

    def __init__(self, keys: dict[str, SigningKey]) -> None:
        super().__init__()
        self.unlocked = keys


def load_signers(cfg: ServerConfig, passphrases: PassphraseSource) -> Signers:
    """Unlock every key the configured formats use, prove it, and build the signers."""
    unlocked: dict[str, SigningKey] = {}

    def resolve(name: str) -> SigningKey:
        if name not in unlocked:
            if name not in cfg.keys:
                raise ConfigError(f"no [keys.{name}] section")
            key = load_key(cfg.key_spec(name), passphrases.get(name))
            prove_key(key)
            unlocked[name] = key
            log.info(
                "key unlocked",
                extra={"fields": {"event": "key_unlocked", "key": name, "backend": key.backend}},
            )
        return unlocked[name]

    signers = Signers(unlocked)
    for fmt in cfg.formats:
        cls = signer_class(fmt)
        if fmt not in cls.formats:
            raise ConfigError(f"formats.{fmt}: use the wire name ({', '.join(cls.formats)})")
        settings = cfg.format_settings(fmt)
        unavailable = cls.available()
        if unavailable is not None:
            raise ConfigError(f"formats.{fmt}: {unavailable}")
        if settings.key is not None:
            resolve(settings.key)
        signers[fmt] = cls(settings, resolve)
        for kind, why in signers[fmt].unserved().items():
            fields = {"event": "format_limited", "format": fmt, "kind": kind, "reason": why}
            log.warning(f"{fmt}: cannot sign {kind}: {why}", extra={"fields": fields})
    if cfg.log.enabled and cfg.log.key is not None:
        resolve(cfg.log.key)  # the signing log's checkpoint key: the same passphrase sources
    return signers


def open_signing_log(cfg: ServerConfig, signers: Signers) -> Recorder | None:
    """The signing log (``[log] enabled``) and what each format records about its key; it
    starts a writer thread, so the signing workers must be forked before."""
    if not cfg.log.enabled or cfg.log.key is None:
        return None
    key = signers.unlocked[cfg.log.key]
    if not isinstance(key.public_key, ed25519.Ed25519PublicKey):
        raise ConfigError(f"log.key: key '{cfg.log.key}' must be an Ed25519 key")

    def sign(data: bytes) -> bytes:
        return key.sign(data, "sha256", "ed25519")

    signlog = SignLog(
        cfg.log_dir(),
        sign,
        key.public_key,
        cfg.server.level,
        cfg.log.segment_bytes,
        cfg.log.checkpoint_interval,
    )
    keys = {
        fmt: signers.unlocked.get(s.settings.key) if s.settings.key else None for fmt, s in signers.items()
    }
    fields = {
        "event": "signlog_open",
        "dir": str(signlog.root),
        "entries": signlog.size,
        "origin": signlog.origin,
    }
    log.info("signing log open", extra={"fields": fields})
    return Recorder(signlog, cfg.server.level, keys)


def tls_context(cfg: ServerConfig) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cfg.resolve(cfg.tls.cert), cfg.resolve(cfg.tls.key))
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"tls: cannot load certificate/key: {e}") from None
    return ctx


def run(cfg: ServerConfig, signers: Signers, listen: str | None = None) -> None:
    """Open the content store, fork the signing workers, serve until SIGTERM/SIGINT."""
    # Inputs and results are the server's alone: every file it, its workers and its signing
    # tools create is private (0600, folders 0700), whatever umask it was started with.
    os.umask(0o077)
    storage = Storage(cfg.resolve(cfg.server.data_dir))
    try:
        # Before the event loop and any thread exist: forking is safe only now.
        workers = WorkerPool(signers, cfg.server.signing_processes, scratch_base(storage.tmp))
        try:
            recorder = open_signing_log(cfg, signers)
            try:
                asyncio.run(serve(cfg, signers, storage, workers, listen, recorder=recorder))
            finally:
                if recorder is not None:
                    recorder.log.close()  # what is queued, then a last checkpoint
        finally:
            workers.close()
    finally:
        storage.close()
    busy = _busy_job_threads(1.0)
    if busy:
        # Jobs still in a signing tool after the drain's bound (or their timeout): Python would
        # wait for their threads at exit. Nothing half-written is ever published, so go now.
        log.warning("exit", extra={"fields": {"event": "abandoned", "job_threads": busy}})
        logging.shutdown()
        os._exit(0)


def _busy_job_threads(grace: float) -> int:
    """Job threads still running after up to ``grace`` seconds (idle ones end as soon as the
    drain has shut the pool down)."""
    deadline = time.monotonic() + grace
    busy = 0
    for t in threading.enumerate():
        if t.name.startswith(JOB_THREAD_PREFIX):
            t.join(max(0.0, deadline - time.monotonic()))
            busy += t.is_alive()
    return busy


async def serve(
    cfg: ServerConfig,
    signers: Signers,
    storage: Storage,
    workers: WorkerPool | None = None,
    listen: str | None = None,
    ready: Any = None,
    recorder: Recorder | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT, then drain (:func:`_drain`)."""
    host, port = parse_listen(listen or cfg.server.listen)
    metrics = PrometheusMetrics(cfg.server.level, signers) if cfg.metrics.listen else Metrics()
    jobs = JobManager(
        storage, signers, cfg.server.concurrency, cfg.server.job_timeout, workers, metrics, recorder=recorder
    )
    health = Health(cfg, signers.unlocked, storage, workers, prove_key, recorder.log if recorder else None)
    health.unserved = {fmt: dict(why) for fmt, s in signers.items() if (why := s.unserved())}
    metrics.watch(jobs, workers, health.expiry, health.tls_expiry)
    app = build_app(cfg, jobs, storage, cfg.token_secrets(), health, metrics)
    requests = _Requests()
    app.middlewares.insert(0, requests.middleware())
    runner = web.AppRunner(
        app,
        access_log=http_log,
        access_log_class=AccessLog,
        handle_signals=False,
        shutdown_timeout=SHUTDOWN_GRACE,
    )
    await runner.setup()
    # TLS on every connection, after a PROXY protocol header from a trusted balancer.
    site = ProxySite(
        runner,
        host,
        port,
        ssl_context=tls_context(cfg),
        trusted=cfg.server.trusted_proxies,
        backlog=512,
        header_timeout=cfg.server.header_timeout,
    )
    await site.start()
    # Before the "listening" line: once a server listens, its metrics do too.
    metrics_runner = None
    if isinstance(metrics, PrometheusMetrics):
        metrics_runner = await serve_metrics(metrics, cfg.metrics)
    stop, hurry = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set() and not hurry.is_set():
            log.warning("second signal: not waiting for the drain", extra={"fields": {"event": "hurry"}})
            hurry.set()
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)

    async def cleaner() -> None:
        while True:
            await asyncio.sleep(cfg.server.cleanup_interval)
            try:
                removed = await loop.run_in_executor(None, storage.cleanup, cfg.server.max_file_age)
            except Exception:  # never let a bad pass end the cleanups (or the stop, which awaits this)
                log.exception("cleanup failed", extra={"fields": {"event": "cleanup_failed"}})
                continue
            if removed:
                log.info("cleanup", extra={"fields": {"event": "cleanup", "removed": removed}})

    cleanup_task = loop.create_task(cleaner())
    # The port bound, which the system picks for port 0: start_server reads it here, so a
    # local server never races another process for a port it chose beforehand.
    port = int(runner.addresses[0][1])
    log.info(
        "listening",
        extra={
            "fields": {
                "event": "listening",
                "url": https_url(host, port),
                "port": port,
                "cert_level": cfg.server.level,
                "formats": sorted(signers),
            }
        },
    )
    if ready is not None:
        ready()
    await stop.wait()
    await site.stop()  # the listening socket closes: new connections are refused from now on
    cleanup_task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await cleanup_task
    await _drain(runner, jobs, requests, hurry, cfg.server.job_timeout)
    if metrics_runner is not None:  # scrapes saw the drain; they stop last
        await metrics_runner.cleanup()


class _Requests:
    """Requests being handled, counted by a middleware so a stop can wait for them."""

    def __init__(self) -> None:
        self.count = 0
        self.drained = 0  # finished during the stop
        self.stopping = False
        self.none = asyncio.Event()
        self.none.set()

    def middleware(self) -> Middleware:
        @web.middleware
        async def track(request: web.Request, handler: Handler) -> web.StreamResponse:
            self.count += 1
            self.none.clear()
            try:
                response = await handler(request)
            finally:
                self.count -= 1
                self.drained += self.stopping
                if not self.count:
                    self.none.set()
            if self.stopping:
                response.force_close()  # the client's next request goes to a new connection
            return response

        return track


def _close_idle(runner: web.AppRunner) -> None:
    """Close the keep-alive connections waiting for a next request (none is in progress on
    them; their clients reconnect, elsewhere). Idle is what aiohttp's keep-alive timer tests
    (``RequestHandler._process_keepalive``): waiting for a request that has not arrived."""
    for conn in runner.server.connections if runner.server is not None else ():
        waiter = getattr(conn, "_waiter", None)
        if waiter is not None and not waiter.done():
            conn.force_close()


async def _first(*aws: Awaitable[Any], timeout: float | None = None) -> None:
    """Wait until the first of ``aws`` is done (at most ``timeout`` seconds); cancel the rest."""
    tasks = {asyncio.ensure_future(a) for a in aws}
    try:
        await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()


async def _drain(
    runner: web.AppRunner, jobs: JobManager, requests: _Requests, hurry: asyncio.Event, budget: float
) -> None:
    """After the listener closed: answer long polls now, let requests in progress finish
    (an upload still sending its body included), then their jobs and all earlier ones, all
    within ``budget`` seconds (job_timeout); a second signal cuts it short. aiohttp's own
    shutdown must come last: it stops reading request bodies at once."""
    started = time.monotonic()
    deadline = started + budget
    requests.stopping = True
    jobs.stop_waiting()
    finished = jobs.finished
    log.info(
        "stopping",
        extra={"fields": {"event": "stopping", "requests": requests.count, "jobs": jobs.running}},
    )
    _close_idle(runner)
    await _first(requests.none.wait(), hurry.wait(), timeout=max(0.0, deadline - time.monotonic()))
    _close_idle(runner)  # those whose last request finished with keep-alive after all
    await _first(jobs.drain(max(0.0, deadline - time.monotonic())), hurry.wait())
    await runner.cleanup()  # answers still being written get SHUTDOWN_GRACE, then are cut
    log.info(
        "stopped",
        extra={
            "fields": {
                "event": "stopped",
                "requests": requests.drained,
                "unfinished_requests": requests.count,
                "jobs": jobs.finished - finished,
                "unfinished_jobs": jobs.running,
                "hurried": hurry.is_set(),
                "seconds": round(time.monotonic() - started, 3),
            }
        },
    )
