"""Signing worker processes for small jobs of in-process signers (gpg, emevoucher, ...).

Why processes: a signing thread shares the event loop's GIL, and every file operation of
either one hands the GIL over; under load the two convoy and the loop stalls. A worker
process signs on the other core with no such coupling.

Workers are forked once, after the keys are unlocked and before the event loop or any
thread starts, so each holds the same signers and no passphrase is passed on. A worker
takes one order at a time: it stores the upload, signs it and publishes the result in
the content store, then answers with the result's digest, size and (small) bytes. A
worker that dies is not replaced (forking from a threaded server is unsafe); its orders
then run in threads like every other job.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from ..errors import FormatRejected, SigningFailed
from ..formats.base import Signer
from .storage import Result, Storage

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

    def __init__(self, storage: Storage, signers: Mapping[str, Signer], count: int) -> None:
        self.formats = frozenset(fmt for fmt, s in signers.items() if s.in_process)
        self._workers: list[_Worker] = []
        self._idle: asyncio.Queue[_Worker] | None = None
        if not self.formats:
            return
        ctx = multiprocessing.get_context("fork")
        for i in range(count):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_serve, args=(child, storage, signers), name=f"sealbox-signer-{i}", daemon=True
            )
            proc.start()
            child.close()
            self._workers.append(_Worker(proc, parent))

    def accepts(self, fmt: str, size: int) -> bool:
        return fmt in self.formats and size <= MAX_ORDER_BYTES and bool(self._workers)

    async def run(self, order: Order) -> Result:
        """Sign ``order`` in an idle worker; raises what the signer raised (by kind)."""
        if self._idle is None:
            self._idle = asyncio.Queue()
            for w in self._workers:
                self._idle.put_nowait(w)
        worker = await self._idle.get()
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
            assert isinstance(value, Result)
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

    def close(self) -> None:
        """Let the workers exit (they stop when their pipe closes)."""
        for w in self._workers:
            w.conn.close()
        for w in self._workers:
            w.process.join(timeout=5)
            if w.process.is_alive():
                w.process.kill()
        self._workers.clear()


def _serve(conn: Connection, storage: Storage, signers: Mapping[str, Signer]) -> None:
    """A worker's life: sign orders until the pipe closes."""
    # The server handles signals and stops us by closing the pipe; a Ctrl-C on the terminal
    # reaches the whole process group and must not kill a job half-way.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    storage.indexing = False  # the server keeps the index; a worker only writes to disk
    from .jobs import sign_job

    while True:
        try:
            order = conn.recv()
        except (EOFError, OSError):
            os._exit(0)
        try:
            result = sign_job(storage, signers, order.fmt, order.sha1, (order.filename, order.data), None)
            answer: tuple[str, Any] = ("ok", result)
        except FormatRejected as e:
            answer = ("rejected", str(e))
        except (SigningFailed, OSError) as e:
            answer = ("failed", str(e))
        except Exception as e:  # never let one order take the worker down
            answer = ("failed", f"internal error: {type(e).__name__}")
        try:
            conn.send(answer)
        except (BrokenPipeError, OSError):
            os._exit(0)
