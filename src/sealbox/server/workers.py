"""Signing worker processes for small jobs of in-process signers (gpg, emevoucher, ...).

Why processes: a signing thread shares the event loop's GIL, and every file operation of
either one hands the GIL over; under load the two convoy and the loop stalls. A worker
process signs on the other core with no such coupling.

Workers are forked once, after the keys are unlocked and before the event loop or any
thread starts, so each holds the same signers and no passphrase is passed on. A worker
takes one order at a time: it signs the upload in a private scratch folder (in
``/dev/shm`` when there is one: nothing touches the disk) and answers with the output's
bytes; the server stores both in the small store. A worker that dies is not replaced
(forking from a threaded server is unsafe); its orders then run in threads like every
other job.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from ..errors import FormatRejected, SigningFailed
from ..formats.base import Signer, SignRequest

log = logging.getLogger("sealbox.jobs")

#: Orders carry the upload through a pipe: only small ones go to workers.
MAX_ORDER_BYTES = 256 * 1024


@dataclass(frozen=True)
class Order:
    fmt: str
    sha1: str
    filename: str
    data: bytes


class WorkerLost(SigningFailed):
    """The worker died (or its pipe broke) before answering; the order can run elsewhere."""


class _Worker:
    def __init__(self, process: Any, conn: Connection) -> None:
        self.process = process
        self.conn = conn


class WorkerPool:
    """``count`` forked workers; :meth:`run` signs an order in one of them."""

    def __init__(self, signers: Mapping[str, Signer], count: int, scratch: Path) -> None:
        self.formats = frozenset(fmt for fmt, s in signers.items() if s.in_process)
        self._workers: list[_Worker] = []
        # Idle workers; None is put in once the last one is gone, to release every waiter.
        self._idle: asyncio.Queue[_Worker | None] | None = None
        if not self.formats:
            return
        ctx = multiprocessing.get_context("fork")
        for i in range(count):
            parent, child = ctx.Pipe()
            # A forked child holds copies of every pipe end open so far; it closes the
            # server's ends, or a worker would never see its pipe close.
            server_ends = [parent, *(w.conn for w in self._workers)]
            proc = ctx.Process(
                target=_serve,
                args=(child, server_ends, signers, scratch),
                name=f"sealbox-signer-{i}",
                daemon=True,
            )
            proc.start()
            child.close()
            self._workers.append(_Worker(proc, parent))

    def accepts(self, fmt: str, size: int) -> bool:
        return fmt in self.formats and size <= MAX_ORDER_BYTES and bool(self._workers)

    async def run(self, order: Order) -> bytes:
        """Sign ``order`` in an idle worker; its output, or what the signer raised (by kind)."""
        if self._idle is None:
            self._idle = asyncio.Queue()
            for w in self._workers:
                self._idle.put_nowait(w)
        worker = await self._idle.get()
        if worker is None:
            self._idle.put_nowait(None)  # for the next waiter
            raise WorkerLost("no signing worker is left")
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Any] = loop.create_future()

        def readable() -> None:
            loop.remove_reader(worker.conn.fileno())
            try:
                answer.set_result(worker.conn.recv())
            except (EOFError, OSError) as e:
                answer.set_exception(WorkerLost(f"signing worker {worker.process.name} died: {e}"))

        try:
            worker.conn.send(order)
            loop.add_reader(worker.conn.fileno(), readable)
        except OSError as e:
            self._retire(worker)
            raise WorkerLost(f"signing worker {worker.process.name} is gone: {e}") from None
        try:
            kind, value = await asyncio.shield(answer)
        except WorkerLost:
            self._retire(worker)
            raise
        except asyncio.CancelledError:
            # The job timed out or the server stops: the worker finishes this order, then
            # comes back to the pool once its answer is read.
            answer.add_done_callback(lambda f: self._back(worker, f))
            raise
        self._idle.put_nowait(worker)
        if kind == "ok":
            assert isinstance(value, bytes)
            return value
        if kind == "rejected":
            raise FormatRejected(value)
        raise SigningFailed(value)

    def _back(self, worker: _Worker, answer: asyncio.Future[Any]) -> None:
        if answer.exception() is not None:
            self._retire(worker)
        elif self._idle is not None:
            self._idle.put_nowait(worker)

    def _retire(self, worker: _Worker) -> None:
        log.error(
            "signing worker gone", extra={"fields": {"event": "worker_gone", "worker": worker.process.name}}
        )
        if worker in self._workers:
            self._workers.remove(worker)
        worker.conn.close()
        worker.process.is_alive()  # reaps it if it is gone
        if not self._workers and self._idle is not None:
            self._idle.put_nowait(None)

    def close(self) -> None:
        """Let the workers exit (they stop when their pipe closes)."""
        for w in self._workers:
            w.conn.close()
        for w in self._workers:
            w.process.join(timeout=5)
            if w.process.is_alive():
                w.process.kill()
        self._workers.clear()


def scratch_base(fallback: Path) -> Path:
    """Where workers keep their scratch folders: memory-backed ``/dev/shm`` if usable."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK) else fallback


def sign_small(signer: Signer, scratch: Path, serial: int, order: Order) -> bytes:
    """Sign ``order`` with files in ``scratch`` only; returns the output."""
    src, out, work = (scratch / f"{kind}-{serial}" for kind in ("in", "out", "work"))
    src.write_bytes(order.data)
    try:
        if signer.uses_work_dir:
            work.mkdir()
        digests = {"sha256": hashlib.sha256(order.data)}
        signer.sign(
            SignRequest(input=src, output=out, filename=order.filename, work_dir=work, digests=digests)
        )
        try:
            return out.read_bytes()
        except FileNotFoundError:
            raise SigningFailed(f"format '{order.fmt}' produced no output") from None
    finally:
        src.unlink(missing_ok=True)
        out.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)


def _serve(
    conn: Connection, server_ends: list[Connection], signers: Mapping[str, Signer], base: Path
) -> None:
    """A worker's life: sign orders until the pipe closes."""
    for end in server_ends:
        end.close()
    # The server handles signals and stops us by closing the pipe; a Ctrl-C on the terminal
    # reaches the whole process group and must not kill a job half-way.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    scratch = Path(tempfile.mkdtemp(prefix="sealbox-signer-", dir=base))
    serial = itertools.count()
    try:
        while True:
            try:
                order = conn.recv()
            except (EOFError, OSError):
                return
            try:
                answer: tuple[str, Any] = ("ok", sign_small(signers[order.fmt], scratch, next(serial), order))
            except FormatRejected as e:
                answer = ("rejected", str(e))
            except (SigningFailed, OSError) as e:
                answer = ("failed", str(e))
            except Exception as e:  # never let one order take the worker down
                answer = ("failed", f"internal error: {type(e).__name__}")
            try:
                conn.send(answer)
            except OSError:
                return
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        os._exit(0)  # no inherited finalizers (the server's connections, files) run here
