"""Signing jobs: keyed by (format, input sha1), run in a bounded pool with a timeout.

An attempt reads as: get the input (the upload, or what the store holds), choose where it
runs (:meth:`JobManager._runs_in`, the one place: a signing worker process for a small
input of an in-process format, a thread for everything else), sign, put the output in the
store (:meth:`JobManager._store`, the one place a result is published; a thread job signs
and publishes in the same thread); the job then remembers the outcome. Signing never runs on
the event loop.

Each format gets at most ``concurrency`` jobs at once, so a slow format cannot starve the
others. A job that fails because of its input is remembered as permanent; other failures are
retried and then remembered for a short while, so polling clients learn about them within
seconds.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..errors import FormatRejected, SigningFailed
from ..formats.base import Signer, SignRequest
from ..fsutil import remove_tree
from ..hashing import hash_stream
from ..signlog import Recorder, RequestContext
from ..wire import SMALL_FILE
from .metrics import Metrics
from .storage import GONE, Blob, Input, InputGone, Result, Storage
from .workers import Order, WorkerLost, WorkerPool

log = logging.getLogger("sealbox.jobs")

TRANSIENT_ATTEMPTS = 2
TRANSIENT_FAILURE_TTL = 60.0
JOB_THREAD_PREFIX = "sealbox-job"  # names the job threads (the server's exit looks for busy ones)
Executor = Literal["worker", "thread"]


@dataclass
class _Job:
    fmt: str
    sha1: str
    #: the upload (in memory, or a file already in the store), or once read, what the store holds
    input: Input | None = None
    #: where the last attempt ran, for the job's log line: "worker" (a signing process) or "thread"
    ran_in: Executor | None = None
    #: the request that started the job, for the signing log
    context: RequestContext | None = None
    #: resolved when the job is no longer pending (a future, not an event: waiting on it
    #: needs no extra task per poll)
    done: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class JobManager:
    def __init__(
        self,
        storage: Storage,
        signers: Mapping[str, Signer],
        concurrency: int,
        timeout: float,
        workers: WorkerPool | None = None,
        metrics: Metrics | None = None,
        recorder: Recorder | None = None,
    ) -> None:
        self.storage = storage
        self.signers = signers
        self.timeout = timeout
        self.workers = workers
        self.metrics = metrics or Metrics()
        #: the signing log: every result is recorded, durably, before it is published
        self.recorder = recorder
        self._limits = {fmt: asyncio.Semaphore(concurrency) for fmt in signers}
        self._pool = ThreadPoolExecutor(
            max_workers=min(64, concurrency * max(1, len(signers))), thread_name_prefix=JOB_THREAD_PREFIX
        )
        self._jobs: dict[tuple[str, str], _Job] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        #: set when the server stops: waits answer at once from then on
        self._stopping: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.finished = 0  # jobs done since start-up (the stop log counts those it drained)
        self.active = 0  # jobs holding a slot of their format: signing now

    def pending(self, fmt: str, sha1: str) -> bool:
        return (fmt, sha1) in self._jobs

    def submit(
        self, fmt: str, sha1: str, upload: Input | None = None, context: RequestContext | None = None
    ) -> None:
        """Queue a job unless one is already pending for (fmt, sha1).

        ``upload`` is a verified upload: still in memory (the store keeps it with the job's
        result), or a file already in the store. Without it the job reads the input from the
        store. ``context`` is the request that asked, for the signing log."""
        if (fmt, sha1) in self._jobs:
            return
        job = _Job(fmt, sha1, upload, context=context)
        self._jobs[(fmt, sha1)] = job
        task = asyncio.get_running_loop().create_task(self._run(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait(self, fmt: str, sha1: str, timeout: float) -> bool:
        """Wait up to ``timeout`` for a pending job; True once it is no longer pending."""
        job = self._jobs.get((fmt, sha1))
        if job is None:
            return True
        if self._stopping.done():
            return False
        # Futures, not coroutines: no extra task per poll.
        await asyncio.wait((job.done, self._stopping), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        return job.done.done()

    @property
    def running(self) -> int:
        return len(self._tasks)

    @property
    def queued(self) -> int:
        """Jobs waiting for a slot of their format."""
        return len(self._jobs) - self.active

    def stop_waiting(self) -> None:
        """The server is stopping: every wait answers now ("still pending"), so a client held
        in a long poll goes elsewhere instead of waiting out the drain; jobs go on."""
        if not self._stopping.done():
            self._stopping.set_result(None)

    async def drain(self, timeout: float) -> int:
        """Let every job finish, also those submitted meanwhile (used on SIGTERM), for up to
        ``timeout`` seconds; then no new thread work starts. The number left unfinished."""
        try:
            async with asyncio.timeout(timeout):
                while self._tasks:
                    await asyncio.wait(set(self._tasks))
        except TimeoutError:
            pass
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)
        return len(self._tasks)

    async def _run(self, job: _Job) -> None:
        started = time.monotonic()
        outcome, reason = "error", ""
        try:
            async with self._limits[job.fmt]:
                self.active += 1
                try:
                    outcome, reason = await self._attempts(job)
                finally:
                    self.active -= 1
        except Exception as e:  # never let a job take the server down
            log.exception("job crashed")
            outcome, reason = "error", f"internal error: {type(e).__name__}"
            self.storage.add_failure(job.fmt, job.sha1, False, reason)
        finally:
            self._jobs.pop((job.fmt, job.sha1), None)
            job.done.set_result(None)
            self.finished += 1
            seconds = time.monotonic() - started
            self.metrics.job(job.fmt, outcome, seconds)
            log.info(
                "job",
                extra={
                    "fields": {
                        "event": "job",
                        "format": job.fmt,
                        "sha1": job.sha1,
                        "outcome": outcome,
                        ("output_sha1" if outcome == "signed" else "reason"): reason,
                        "ms": round(seconds * 1000, 1),
                        "ran_in": job.ran_in,
                    }
                },
            )

    async def _attempts(self, job: _Job) -> tuple[str, str]:
        """Attempts until one signs, the input is rejected or the retries run out; the
        outcome is remembered: (outcome, the output's SHA-1 or the reason)."""
        reason = ""
        for attempt in range(1, TRANSIENT_ATTEMPTS + 1):
            try:
                async with asyncio.timeout(self.timeout):  # no extra task, unlike wait_for
                    result = await self._attempt(job)
                self.storage.clear_failure(job.fmt, job.sha1)
                return "signed", result.digest
            except FormatRejected as e:
                self.storage.add_failure(job.fmt, job.sha1, True, str(e))
                return "rejected", str(e)
            except InputGone as e:  # nothing learnt about the content: no failure to remember
                self.storage.drop_input(job.sha1)  # what is left of it: a poll then says "upload it"
                return "gone", str(e)
            except TimeoutError:
                reason = f"signing timed out after {self.timeout:g} s"
            except SigningFailed as e:
                reason = str(e)
            except OSError as e:  # the server's disk (a full one, say): its trouble, not the input's
                reason = f"server storage error: {e.strerror or type(e).__name__}"  # (no server path)
            if attempt < TRANSIENT_ATTEMPTS:
                await asyncio.sleep(0.5 * attempt)
        self.storage.add_failure(job.fmt, job.sha1, False, reason)
        return "failed", reason

    async def _attempt(self, job: _Job) -> Result:
        """Get the input, choose the executor, sign, put the output."""
        item = job.input = job.input or self.storage.get_input(job.sha1)
        if item is None:
            raise InputGone(GONE)
        job.ran_in = self._runs_in(job.fmt, item)
        if job.ran_in == "worker" and self.workers is not None and item.body is not None:
            try:
                output = Blob.of(await self.workers.run(Order(job.fmt, item.filename, item.body)))
            except WorkerLost:  # logged by the pool: this job signs in a thread instead
                job.ran_in = "thread"
            else:
                return await self._publish(job, item, output)
        return await self._in_thread(job, item)

    def _runs_in(self, fmt: str, item: Input) -> Executor:
        """Where a job runs, decided here alone: a signing worker process for an in-process
        format's small input held in memory (it shares no GIL with the event loop, and
        touches no disk), a thread for everything else and once no worker is left."""
        workers, data = self.workers, item.body
        if workers is not None and data is not None and item.size <= SMALL_FILE and workers.takes(fmt):
            return "worker"
        return "thread"

    async def _in_thread(self, job: _Job, item: Input) -> Result:
        """Sign and publish in one job thread (one hand-off each way, not two)."""
        abandoned = threading.Event()
        future = self._pool.submit(self._sign_and_publish, job, item, abandoned)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            # Timed out: the signer cannot be stopped. Its output is not published, unless
            # publishing began already (the signing log records it first, as always).
            abandoned.set()
            raise

    def _sign_and_publish(self, job: _Job, item: Input, abandoned: threading.Event) -> Result:
        output = self._sign_files(job.fmt, item)
        if abandoned.is_set():
            _discard(output)
            raise SigningFailed("abandoned: the job timed out")
        return self._publish_file(job, item, output)

    def _sign_files(self, fmt: str, item: Input) -> Blob:
        """Sign ``item`` with files in ``tmp/`` (in a job thread); the output, a file there."""
        signer = self.signers[fmt]
        item = self.storage.checked(item)
        out = self.storage.temp_path("out")
        # A timed-out job may still be running; it only ever writes to ``out`` and ``work``.
        work = self.storage.temp_dir() if signer.uses_work_dir else self.storage.temp_path("job")
        try:
            with self.storage.on_disk(item) as src:
                request = SignRequest(
                    input=src, output=out, filename=item.filename, work_dir=work, digests=item.digests
                )
                signer.sign(request)
            if not out.is_file():
                raise SigningFailed(f"format '{fmt}' produced no output")
            return Blob.of(out)
        except BaseException:
            out.unlink(missing_ok=True)
            raise
        finally:
            # Never raises (a hostile archive's tree may be deep or unreadable): what stays is
            # logged, and the periodic cleanup tries again.
            if signer.uses_work_dir and (kept := remove_tree(work)):
                log.warning(
                    "work dir kept",
                    extra={
                        "fields": {"event": "work_dir_kept", "format": fmt, "sha1": item.sha1, "kept": kept}
                    },
                )

    async def _publish(self, job: _Job, item: Input, output: Blob) -> Result:
        """Publish a signing worker's bytes, on the event loop (one SQLite commit), once the
        signing log, when on, has recorded them durably (fail closed: a log that cannot record
        fails the attempt as retryable, nothing is published)."""
        durable, digest = self._record(job, item, output)
        if durable is not None:
            await asyncio.wrap_future(durable)
        return self._store(job, item, output, digest)

    def _publish_file(self, job: _Job, item: Input, output: Blob) -> Result:
        """:meth:`_publish` of a file, in its job's thread (a big output is read)."""
        try:
            durable, digest = self._record(job, item, output)
            if durable is not None:
                durable.result()  # in the job's thread: wait until the entry is durable
        except BaseException:
            _discard(output)
            raise
        return self._store(job, item, output, digest)

    def _store(self, job: _Job, item: Input, output: Blob, digest: str | None) -> Result:
        """Put ``output``, ``item`` signed with ``job.fmt``, in the store: the one place a
        result is published, after its signing log entry is durable."""
        return self.storage.put_result(job.fmt, item, output, self._also_input(job.fmt), digest)

    def _also_input(self, fmt: str) -> bool:
        """Whether ``fmt``'s output is kept as an input too: it replaces the file, so chaining
        another format needs none (a detached signature is not something anyone signs next)."""
        return not self.signers[fmt].detached_suffix.get(fmt)

    def _record(
        self, job: _Job, item: Input, output: Blob
    ) -> tuple[concurrent.futures.Future[int] | None, str | None]:
        """Append the entry of the signature about to be published to the signing log; the
        future of its append (None: the log is off) and the output's SHA-1 taken on the way
        (so publishing does not read the output again). The result must not be published
        before the future resolves: it does once the entry is durable, or raises
        :class:`~sealbox.signlog.LogUnavailable` (the attempt then fails as retryable and
        nothing is published). Called right before publication, from the event loop or a job
        thread."""
        if self.recorder is None:
            return None, None
        state = item.digests.get("sha256")
        if state is None:  # not hashed on its way in: small, or a stored file
            with item.open() as f:
                state = hash_stream(f, ("sha256",))["sha256"]
        if isinstance(output.content, Path):
            with output.open() as f:
                states = hash_stream(f, ("sha1", "sha256"))
            out = {
                "sha1": states["sha1"].hexdigest(),
                "sha256": states["sha256"].hexdigest(),
                "size": output.size,
            }
        else:
            out = {
                "sha1": hashlib.sha1(output.content, usedforsecurity=False).hexdigest(),
                "sha256": hashlib.sha256(output.content).hexdigest(),
                "size": output.size,
            }
        sent = job.context.filename if job.context is not None else None
        source = {
            "sha1": item.sha1,
            "sha256": state.hexdigest(),
            "size": item.size,
            "filename": sent or item.filename,
        }
        entry = self.recorder.entry(job.fmt, job.context, source, out, job.ran_in)
        return self.recorder.log.append(entry), str(out["sha1"])

    def log_index(self, fmt: str, sha1: str) -> int | None:
        """The signing log's index of the result of (fmt, sha1), if the log knows it."""
        return self.recorder.log.lookup(fmt, sha1) if self.recorder is not None else None


def _discard(output: Blob) -> None:
    if isinstance(output.content, Path):
        output.content.unlink(missing_ok=True)
