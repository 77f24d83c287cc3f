"""Signing worker processes for small jobs of in-process signers (gpg, emevoucher, ...).

Why processes: a signing thread shares the event loop's GIL, and every file operation of
either one hands the GIL over; under load the two convoy and the loop stalls. A worker
process signs on the other core with no such coupling.

Workers are forked once, after the keys are unlocked and before the event loop or any
thread starts, so each holds the same signers and no passphrase is passed on. A worker
takes one order at a time: it signs the upload in a private scratch folder (in
``/dev/shm`` when there is one: nothing touches the disk) and answers with the output's
bytes; the job stores both (:meth:`.storage.Storage.put_result`). Which jobs come here is
decided in one place, :meth:`.jobs.JobManager._runs_in`. A worker that dies is not
replaced (forking from a threaded server is unsafe); its orders then run in threads like
every other job.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import multiprocessing
import os
import signal
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from .. import keys
from ..errors import FormatRejected, SigningFailed
from ..formats.base import Signer, SignRequest
from ..fsutil import remove_tree

log = logging.getLogger("sealbox.jobs")


@dataclass(frozen=True)
class Order:
    """What a worker signs: an input's bytes (they travel through a pipe: only small ones)
    and the name of some upload of them. No hash states: they cannot cross the pipe, and a
    signer that needs one takes it from the bytes (:meth:`.SignRequest.hash_state`), once."""

    fmt: str
    filename: str
    data: bytes


class WorkerLost(SigningFailed):
    """The worker died (or its pipe broke) before answering; the order can run elsewhere."""


class _Worker:
    def __init__(self, process: Any, conn: Connection) -> None:
        self.process = process
        self.conn = conn
        #: answers still owed, in the order the orders were sent
        self.owed: collections.deque[asyncio.Future[Any]] = collections.deque()


class WorkerPool:
    """``count`` forked workers; :meth:`run` signs an order in one of them.

    Each worker has up to ``DEPTH`` orders in its pipe: when it finishes one, the next is
    already there, so a busy worker is not put to sleep and woken for every order."""

    DEPTH = 2

    def __init__(self, signers: Mapping[str, Signer], count: int, scratch: Path) -> None:
        self.formats = frozenset(fmt for fmt, s in signers.items() if s.in_process)
        self._workers: list[_Worker] = []
        self.started = 0  # workers forked (one that dies is never replaced)
        # Set when an answer frees a slot; created (and the readers added) on first use, in
        # the event loop.
        self._slot_free: asyncio.Event | None = None
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
        self.started = len(self._workers)

    def census(self) -> tuple[int, int, int]:
        """(alive, started, lost): a worker that died is counted as soon as it is reaped,
        even before its pipe's end has been read."""
        alive = sum(w.process.is_alive() for w in self._workers)  # is_alive() also reaps
        return alive, self.started, self.started - alive

    def takes(self, fmt: str) -> bool:
        """Whether :meth:`run` can sign ``fmt`` now: an in-process format, a worker left."""
        return fmt in self.formats and bool(self._workers)

    async def run(self, order: Order) -> bytes:
        """Sign ``order`` in the least busy worker; its output, or what the signer raised."""
        worker = await self._pick()
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        # A job that timed out no longer awaits its answer; a worker's death must not be
        # reported as an exception nobody retrieved.
        answer.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            worker.conn.send(order)
        except OSError as e:
            self._retire(worker, f"is gone: {e}")
            raise WorkerLost(f"signing worker {worker.process.name} is gone: {e}") from None
        worker.owed.append(answer)
        kind, value = await asyncio.shield(answer)  # a timed-out job leaves the answer to the reader
        if kind == "ok":
            assert isinstance(value, bytes)
            return value
        if kind == "rejected":
            raise FormatRejected(value)
        raise SigningFailed(value)

    async def _pick(self) -> _Worker:
        if self._slot_free is None:
            loop = asyncio.get_running_loop()
            for w in self._workers:
                loop.add_reader(w.conn.fileno(), self._answers, w)
            self._slot_free = asyncio.Event()
        while True:
            if not self._workers:
                raise WorkerLost("no signing worker is left")
            worker = min(self._workers, key=lambda w: len(w.owed))
            if len(worker.owed) < self.DEPTH:
                return worker
            self._slot_free.clear()
            await self._slot_free.wait()

    def _answers(self, worker: _Worker) -> None:
        """Reader callback: settle every answer the worker has written."""
        try:
            while worker.conn.poll():
                answer = worker.conn.recv()
                if worker.owed:
                    worker.owed.popleft().set_result(answer)
        except (EOFError, OSError) as e:
            self._retire(worker, f"died: {e or type(e).__name__}")
        if self._slot_free is not None:
            self._slot_free.set()

    def _retire(self, worker: _Worker, how: str) -> None:
        if worker not in self._workers:
            return
        log.error(
            "signing worker gone",
            extra={"fields": {"event": "worker_gone", "worker": worker.process.name, "reason": how}},
        )
        self._workers.remove(worker)
        if self._slot_free is not None:  # its reader was added
            asyncio.get_running_loop().remove_reader(worker.conn.fileno())
        worker.conn.close()
        worker.process.is_alive()  # reaps it if it is gone
        while worker.owed:
            worker.owed.popleft().set_exception(WorkerLost(f"signing worker {worker.process.name} {how}"))
        if self._slot_free is not None:
            self._slot_free.set()  # waiters look again (and fail over if none is left)

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
        signer.sign(SignRequest(input=src, output=out, filename=order.filename, work_dir=work))
        try:
            return out.read_bytes()
        except FileNotFoundError:
            raise SigningFailed(f"format '{order.fmt}' produced no output") from None
    finally:
        src.unlink(missing_ok=True)
        out.unlink(missing_ok=True)
        remove_tree(work)  # never raises; what stays goes with the scratch folder at exit


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
    keys.after_fork()  # PKCS#11 sessions do not survive a fork: this process opens its own
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
        remove_tree(scratch)
        os._exit(0)  # no inherited finalizers (the server's connections, files) run here
