"""Start-up and lifecycle of ``sealbox serve``: unlock keys, prove them, listen, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import ssl
import sys
import time
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from ..config import ServerConfig, parse_listen
from ..errors import ConfigError, KeyUnlockError
from ..formats import signer_class
from ..formats.base import Signer
from ..keys import PassphraseSource, UnlockedKey, load_key
from .app import build_app
from .jobs import JobManager
from .storage import Storage
from .workers import WorkerPool, scratch_base

log = logging.getLogger("sealbox.server")
PROBE = b"sealbox start-up test signature"


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
            entry["error"] = self.formatException(record.exc_info).splitlines()[-1]
        return json.dumps(entry, separators=(",", ":"))


def setup_logging(log_file: Path | None = None) -> None:
    handler: logging.Handler = (
        logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    )
    handler.setFormatter(JsonLines())
    root = logging.getLogger("sealbox")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False
    logging.getLogger("aiohttp.access").disabled = True


def prove_key(key: UnlockedKey) -> None:
    """A test signature with the unlocked key, checked against its public half and certificate."""
    priv = key.private_key
    try:
        if isinstance(priv, rsa.RSAPrivateKey):
            sig = priv.sign(PROBE, padding.PKCS1v15(), hashes.SHA256())
            priv.public_key().verify(sig, PROBE, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(priv, ec.EllipticCurvePrivateKey):
            sig = priv.sign(PROBE, ec.ECDSA(hashes.SHA256()))
            priv.public_key().verify(sig, PROBE, ec.ECDSA(hashes.SHA256()))
        else:
            assert isinstance(priv, ed25519.Ed25519PrivateKey)
            priv.public_key().verify(priv.sign(PROBE), PROBE)
    except Exception as e:
        raise KeyUnlockError(f"key '{key.name}': test signature failed: {e}") from None
    if key.chain and key.chain[0].public_key() != priv.public_key():
        raise KeyUnlockError(f"key '{key.name}': the first certificate of its chain is not for this key")


def load_signers(cfg: ServerConfig, passphrases: PassphraseSource) -> dict[str, Signer]:
    """Unlock every key the configured formats use, prove it, and build the signers."""
    unlocked: dict[str, UnlockedKey] = {}

    def resolve(name: str) -> UnlockedKey:
        if name not in unlocked:
            if name not in cfg.keys:
                raise ConfigError(f"no [keys.{name}] section")
            key = load_key(cfg.key_spec(name), passphrases.get(name))
            prove_key(key)
            unlocked[name] = key
            log.info("key unlocked", extra={"fields": {"event": "key_unlocked", "key": name}})
        return unlocked[name]

    signers: dict[str, Signer] = {}
    for fmt in cfg.formats:
        cls = signer_class(fmt)
        if fmt not in cls.formats:
            raise ConfigError(f"formats.{fmt}: use the wire name ({', '.join(cls.formats)})")
        settings = cfg.format_settings(fmt)
        unavailable = cls.available()
        if unavailable is not None and not settings.options.get("signer_command"):
            raise ConfigError(f"formats.{fmt}: {unavailable}")
        if settings.key is not None:
            resolve(settings.key)
        signers[fmt] = cls(settings, resolve)
    return signers


def tls_context(cfg: ServerConfig) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cfg.resolve(cfg.tls.cert), cfg.resolve(cfg.tls.key))
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"tls: cannot load certificate/key: {e}") from None
    return ctx


def run(cfg: ServerConfig, signers: dict[str, Signer], listen: str | None = None) -> None:
    """Open the content store, fork the signing workers, serve until SIGTERM/SIGINT."""
    storage = Storage(cfg.resolve(cfg.server.data_dir))
    try:
        # Before the event loop and any thread exist: forking is safe only now.
        workers = WorkerPool(signers, cfg.server.signing_processes, scratch_base(storage.tmp))
        try:
            asyncio.run(serve(cfg, signers, storage, workers, listen))
        finally:
            workers.close()
    finally:
        storage.close()


async def serve(
    cfg: ServerConfig,
    signers: dict[str, Signer],
    storage: Storage,
    workers: WorkerPool | None = None,
    listen: str | None = None,
    ready: Any = None,
) -> None:
    """Serve until SIGTERM/SIGINT, then finish in-flight jobs and exit."""
    host, port = parse_listen(listen or cfg.server.listen)
    jobs = JobManager(storage, signers, cfg.server.concurrency, cfg.server.job_timeout, workers)
    app = build_app(cfg, jobs, storage, cfg.token_secrets())
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=tls_context(cfg), backlog=512)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def cleaner() -> None:
        while True:
            await asyncio.sleep(cfg.server.cleanup_interval)
            removed = await loop.run_in_executor(None, storage.cleanup, cfg.server.max_file_age)
            if removed:
                log.info("cleanup", extra={"fields": {"event": "cleanup", "removed": removed}})

    cleanup_task = loop.create_task(cleaner())
    log.info(
        "listening",
        extra={
            "fields": {
                "event": "listening",
                "url": f"https://{host}:{port}",
                "cert_level": cfg.server.level,
                "formats": sorted(signers),
            }
        },
    )
    if ready is not None:
        ready()
    await stop.wait()
    log.info("stopping", extra={"fields": {"event": "stopping"}})
    cleanup_task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await cleanup_task
    await site.stop()  # stop accepting; running jobs go on
    await jobs.drain(cfg.server.job_timeout)
    await runner.cleanup()
    log.info("stopped", extra={"fields": {"event": "stopped"}})
