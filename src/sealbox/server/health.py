"""What ``GET /__heartbeat__`` checks (Dockerflow conventions, as Autograph serves them).

Each check answers ``{"status": "ok" | "warning" | "error", "message": ..., ...}``; any
"error" makes the heartbeat 503, so a load balancer drains the server:

- ``keys``: a test signature with every key, whatever its backend (``backends`` says which:
  ``file`` or ``pkcs11``), checked against its public half and certificate (what start-up
  does, :func:`~sealbox.server.run.prove_key`); a token gone fails it; run off the event
  loop and cached for :data:`KEY_CHECK_TTL` seconds.
- ``data_dir``: a small file written, fsync'ed and removed in ``tmp/``, and the free space
  of its filesystem at least ``[server] min_free_bytes``.
- ``workers``: the signing worker processes. Some lost is a warning (their jobs sign in
  threads); all of them lost is an error: the server still signs, but slower, and nothing
  but a restart brings them back. No workers configured (or no in-process format) is ok.
- ``certificates``: never an error. A warning for each signing key's certificate, and the
  TLS one, that expires within ``[server] cert_expiry_warning_days`` (or has expired).
- ``signing_log``: a page written and fsync'ed beside the signing log's segments; an error
  while the log cannot record (disk full, unwritable, or an fsync failed: until a restart),
  since no signature is released unrecorded. Ok when the log is off.
- ``formats``: never an error. A warning for each kind of input a configured format refuses on
  this host because its tool is too old (:meth:`Signer.unserved`), listed in ``unserved``
  (format -> kind -> why).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from .. import __version__
from ..keys import SigningKey, load_certificates
from ..signlog import SignLog
from .config import ServerConfig
from .storage import Storage
from .workers import WorkerPool

log = logging.getLogger("sealbox.health")

KEY_CHECK_TTL = 60.0
Check = dict[str, Any]
#: written by a build (a container image, a package) beside the package: Dockerflow's
#: ``{"source", "version", "commit", "build"}``
VERSION_FILE = Path(__file__).resolve().parent.parent / "version.json"
VERSION_FIELDS = ("source", "version", "commit", "build")


def version_info(path: Path = VERSION_FILE) -> dict[str, str]:
    """What ``GET /__version__`` answers: the build's ``version.json`` (its Dockerflow fields),
    else the package version alone."""
    try:
        raw = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raw = None
    except (OSError, ValueError) as e:
        log.warning(
            "version.json unreadable", extra={"fields": {"event": "version_unreadable", "error": str(e)}}
        )
        raw = None
    if not isinstance(raw, dict):
        return {"version": __version__}
    info = {k: str(raw[k]) for k in VERSION_FIELDS if isinstance(raw.get(k), str | int | float)}
    return {"version": __version__, **info}


def _check(status: str, message: str, **extra: Any) -> Check:
    return {"status": status, "message": message, **extra}


class Health:
    def __init__(
        self,
        cfg: ServerConfig,
        keys: Mapping[str, SigningKey],
        storage: Storage,
        workers: WorkerPool | None,
        prove: Callable[[SigningKey], None],
        signlog: SignLog | None = None,
    ) -> None:
        self.keys = keys
        self.signlog = signlog
        self.storage = storage
        self.workers = workers
        self.prove = prove
        self.min_free = cfg.server.min_free_bytes
        self.warn_within = timedelta(days=cfg.server.cert_expiry_warning_days)
        #: when each signing key's certificate expires (keys without one are not listed)
        self.expiry = {name: k.chain[0].not_valid_after_utc for name, k in keys.items() if k.chain}
        tls = load_certificates(cfg.resolve(cfg.tls.cert))
        self.tls_expiry = tls[0].not_valid_after_utc if tls else None
        #: format -> kind of input -> why this host cannot sign it (:meth:`Signer.unserved`)
        self.unserved: dict[str, dict[str, str]] = {}
        self._keys_started = 0.0
        self._keys_check: asyncio.Future[Check] | None = None

    async def report(self) -> dict[str, Check]:
        """Every check by name."""
        loop = asyncio.get_running_loop()
        keys, data_dir, signing_log = await asyncio.gather(
            self._keys(),
            loop.run_in_executor(None, self._data_dir),
            loop.run_in_executor(None, self._signing_log),
        )
        return {
            "keys": keys,
            "data_dir": data_dir,
            "workers": self._workers(),
            "certificates": self._certificates(),
            "signing_log": signing_log,
            "formats": self._formats(),
        }

    def _formats(self) -> Check:
        unserved = {fmt: dict(sorted(kinds.items())) for fmt, kinds in sorted(self.unserved.items())}
        if not unserved:
            return _check("ok", "every format signs every kind of input it knows", unserved={})
        told = [f"{fmt}: {why}" for fmt, kinds in unserved.items() for why in kinds.values()]
        return _check("warning", "; ".join(told), unserved=unserved)

    async def _keys(self) -> Check:
        """The cached key check, or a fresh one (shared by every heartbeat meanwhile)."""
        now = time.monotonic()
        if self._keys_check is None or (
            self._keys_check.done() and now - self._keys_started >= KEY_CHECK_TTL
        ):
            self._keys_started = now
            self._keys_check = asyncio.get_running_loop().run_in_executor(None, self._prove_keys)
        # Shielded: a heartbeat whose client hangs up must not cancel the others' answer.
        return await asyncio.shield(self._keys_check)

    def _prove_keys(self) -> Check:
        results: dict[str, str] = {}
        for name, key in sorted(self.keys.items()):
            try:
                self.prove(key)
                results[name] = "ok"
            except Exception as e:  # whatever a vanished key raises is a failed check
                results[name] = str(e) or type(e).__name__
        bad = sorted(n for n, r in results.items() if r != "ok")
        log.info(
            "keys checked", extra={"fields": {"event": "keys_checked", "keys": len(results), "failed": bad}}
        )
        checked = datetime.now(UTC).isoformat(timespec="seconds")
        # where each key lives: "file" (decrypted in memory) or "pkcs11" (a token)
        backends = {name: key.backend for name, key in sorted(self.keys.items())}
        extra = {"keys": results, "backends": backends, "checked": checked}
        if bad:
            return _check("error", f"test signature failed: {', '.join(bad)}", **extra)
        return _check("ok", f"{len(results)} keys signed a test message", **extra)

    def _data_dir(self) -> Check:
        problems = []
        probe = self.storage.temp_path("heartbeat")
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, b"sealbox heartbeat\n")
                os.fsync(fd)
            finally:
                os.close(fd)
                probe.unlink(missing_ok=True)
        except OSError as e:
            problems.append(f"cannot write in {self.storage.tmp}: {e.strerror or e}")
        try:
            st = os.statvfs(self.storage.root)
            free: int | None = st.f_bavail * st.f_frsize
        except OSError as e:
            free = None
            problems.append(f"cannot read the free space of {self.storage.root}: {e.strerror or e}")
        if free is not None and free < self.min_free:
            problems.append(f"{free} bytes free, below the floor of {self.min_free} (server.min_free_bytes)")
        status, message = ("error", "; ".join(problems)) if problems else ("ok", "writable, space free")
        return _check(status, message, free_bytes=free, min_free_bytes=self.min_free)

    def _signing_log(self) -> Check:
        signlog = self.signlog
        if signlog is None:
            return _check("ok", "no signing log ([log] enabled is false)", entries=None)
        why = signlog.probe()
        cp = signlog.checkpoint
        counts = {
            "entries": signlog.size,
            "checkpoint": cp.size if cp is not None else None,
            "flushes": signlog.flushes,
            "failures": signlog.failures,
            "last_error": signlog.last_error,
        }
        if why is not None:  # nothing can be released: drain this server
            return _check("error", f"cannot record signatures: {why}", **counts)
        return _check("ok", f"{signlog.size} entries, writable", **counts)

    def _workers(self) -> Check:
        alive, started, lost = self.workers.census() if self.workers is not None else (0, 0, 0)
        counts = {"alive": alive, "started": started}
        if not started:
            return _check("ok", "no signing processes: jobs sign in threads", **counts)
        if not alive:
            return _check("error", f"all {started} signing processes lost: jobs sign in threads", **counts)
        if lost:
            return _check("warning", f"{lost} of {started} signing processes lost", **counts)
        return _check("ok", f"{alive} signing processes", **counts)

    def _certificates(self) -> Check:
        now = datetime.now(UTC)
        dates = [(f"key '{name}'", when) for name, when in sorted(self.expiry.items())]
        if self.tls_expiry is not None:
            dates.append(("the TLS certificate", self.tls_expiry))
        warnings = [
            f"{what} {'has expired' if when <= now else f'expires in {(when - now).days} days'}"
            f" ({when:%Y-%m-%d %H:%M} UTC)"
            for what, when in dates
            if when - now <= self.warn_within
        ]
        expires = {name: when.isoformat(timespec="seconds") for name, when in sorted(self.expiry.items())}
        if self.tls_expiry is not None:
            expires["(tls)"] = self.tls_expiry.isoformat(timespec="seconds")
        if warnings:
            return _check("warning", "; ".join(warnings), expires=expires)
        return _check("ok", f"none expires within {self.warn_within.days} days", expires=expires)
