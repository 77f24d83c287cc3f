"""Signing jobs: keyed by (format, input sha1), run in a bounded pool with a timeout.

Each format gets at most ``concurrency`` jobs at once, so a slow format cannot starve the
others. Signing never runs on the event loop: small uploads for in-process signers go to
the signing worker processes (:mod:`.workers`), everything else to worker threads. A job
that fails because of its input is remembered as permanent; other failures are retried
and then remembered for a short while, so polling clients learn about them within seconds.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..errors import FormatRejected, SigningFailed
from ..formats.base import Signer, SignRequest
from ..hashing import hash_stream
from .storage import Result, Storage
from .workers import Order, WorkerLost, WorkerPool

log = logging.getLogger("sealbox.jobs")

TRANSIENT_ATTEMPTS = 2
TRANSIENT_FAILURE_TTL = 60.0


@dataclass
class _Job:
    fmt: str
    sha1: str
    #: (filename, bytes) of an upload small enough to arrive in memory; the job stores it
    upload: tuple[str, bytes | bytearray] | None = None
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
    ) -> None:
        self.storage = storage
        self.signers = signers
        self.timeout = timeout
        self.workers = workers
        self._limits = {fmt: asyncio.Semaphore(concurrency) for fmt in signers}
        self._pool = ThreadPoolExecutor(
            max_workers=min(64, concurrency * max(1, len(signers))), thread_name_prefix="sign"
        )
        self._jobs: dict[tuple[str, str], _Job] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def pending(self, fmt: str, sha1: str) -> bool:
        return (fmt, sha1) in self._jobs

    def submit(
        self,
        fmt: str,
        sha1: str,
        digests: Mapping[str, Any] | None = None,
        upload: tuple[str, bytes | bytearray] | None = None,
    ) -> None:
        """Queue a job unless one is already pending for (fmt, sha1).

        ``upload`` is (filename, bytes) of a verified upload still in memory: the job
        stores it (a signing worker's job as a row, a thread's as a file), so the event loop
        does no disk work for it."""
        if (fmt, sha1) in self._jobs:
            return
        job = _Job(fmt, sha1, upload)
        self._jobs[(fmt, sha1)] = job
        task = asyncio.get_running_loop().create_task(self._run(job, dict(digests or {})))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait(self, fmt: str, sha1: str, timeout: float) -> bool:
        """Wait up to ``timeout`` for a pending job; True once it is no longer pending."""
        job = self._jobs.get((fmt, sha1))
        if job is None:
            return True
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(job.done)
        except TimeoutError:
            return False
        return True

    async def drain(self, timeout: float) -> None:
        """Let in-flight jobs finish (used on SIGTERM)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _run(self, job: _Job, digests: dict[str, Any]) -> None:
        started = time.monotonic()
        outcome, reason = "error", ""
        try:
            async with self._limits[job.fmt]:
                outcome, reason = await self._attempts(job, digests)
        except Exception as e:  # never let a job take the server down
            log.exception("job crashed")
            outcome, reason = "error", f"internal error: {type(e).__name__}"
            self.storage.add_failure(job.fmt, job.sha1, False, reason)
        finally:
            self._jobs.pop((job.fmt, job.sha1), None)
            job.done.set_result(None)
            log.info(
                "job",
                extra={
                    "fields": {
                        "event": "job",
                        "format": job.fmt,
                        "sha1": job.sha1,
                        "outcome": outcome,
                        ("output_sha1" if outcome == "signed" else "reason"): reason,
                        "ms": round((time.monotonic() - started) * 1000, 1),
                    }
                },
            )

    async def _attempts(self, job: _Job, digests: dict[str, Any]) -> tuple[str, str]:
        loop = asyncio.get_running_loop()
        reason = ""
        for attempt in range(1, TRANSIENT_ATTEMPTS + 1):
            try:
                async with asyncio.timeout(self.timeout):  # no extra task, unlike wait_for
                    result = await self._attempt(loop, job, digests)
                self.storage.clear_failure(job.fmt, job.sha1)
                return "signed", result.digest
            except FormatRejected as e:
                self.storage.add_failure(job.fmt, job.sha1, True, str(e))
                return "rejected", str(e)
            except TimeoutError:
                reason = f"signing timed out after {self.timeout:g} s"
            except (SigningFailed, OSError) as e:
                reason = str(e)
            if attempt < TRANSIENT_ATTEMPTS:
                await asyncio.sleep(0.5 * attempt)
        self.storage.add_failure(job.fmt, job.sha1, False, reason)
        return "failed", reason

    async def _attempt(self, loop: asyncio.AbstractEventLoop, job: _Job, digests: dict[str, Any]) -> Result:
        upload, workers = job.upload, self.workers
        if upload is None and workers is not None and job.fmt in workers.formats:
            upload = self.storage.small_input(job.sha1)  # held from a job of another format
        if upload is not None and workers is not None and workers.accepts(job.fmt, len(upload[1])):
            filename, data = upload[0], bytes(upload[1])
            try:
                output = await workers.run(Order(job.fmt, job.sha1, filename, data))
            except WorkerLost:
                pass  # logged by the pool: this job signs in a thread instead
            else:
                job.upload = None
                replaces = not self.signers[job.fmt].detached_suffix.get(job.fmt)
                return self.storage.add_small_job(job.fmt, job.sha1, filename, data, output, replaces)
        job.upload = None  # a second attempt reads the stored input
        return await loop.run_in_executor(
            self._pool, sign_job, self.storage, self.signers, job.fmt, job.sha1, upload, digests
        )


def sign_job(
    storage: Storage,
    signers: Mapping[str, Signer],
    fmt: str,
    sha1: str,
    upload: tuple[str, bytes | bytearray] | None,
    digests: Mapping[str, Any] | None,
) -> Result:
    """Store or verify the input, sign it, publish the result as a file (in a worker thread).

    ``upload`` is (filename, bytes) of a verified upload still in memory; without it the
    input is read from the store and, without ``digests`` from its upload, re-hashed."""
    signer = signers[fmt]
    if upload is None and not storage.input_path(sha1).is_file():
        upload = storage.small_input(sha1)  # held as a row: this job needs it as a file
    if upload is not None:
        storage.add_input_bytes(sha1, *upload)
        if not digests:
            digests = {"sha256": hashlib.sha256(upload[1])}
    src = storage.input_path(sha1)
    filename = storage.input_filename(sha1)
    if filename is None or not src.is_file():
        raise FormatRejected("the input is no longer on the server; upload it again")
    if not digests:
        # Re-hash a stored input: a corrupt copy must never be signed.
        with src.open("rb") as f:
            states = hash_stream(f, ("sha1", "sha256"))
        if states["sha1"].hexdigest() != sha1:
            storage.drop_input(sha1)
            raise SigningFailed("stored input was corrupt and has been dropped; upload it again")
        digests = {"sha256": states["sha256"]}
    out = storage.temp_path("out")
    # A timed-out job may still be running; it only ever writes to ``out`` and ``work``.
    work = storage.temp_dir() if signer.uses_work_dir else storage.temp_path("job")
    try:
        signer.sign(SignRequest(input=src, output=out, filename=filename, work_dir=work, digests=digests))
        if not out.is_file():
            raise SigningFailed(f"format '{fmt}' produced no output")
        result = storage.add_result(fmt, sha1, out)
    finally:
        out.unlink(missing_ok=True)
        if signer.uses_work_dir:
            shutil.rmtree(work, ignore_errors=True)
    # Keep an output that replaces the file as an input too: chaining another format
    # needs no upload, and signing the output again with this format returns it
    # unchanged. (A detached signature is not something anyone signs next.)
    assert result.path is not None  # jobs in threads publish files
    if not signer.detached_suffix.get(fmt):
        storage.link_input(result.digest, filename, result.path)
        if result.digest != sha1:
            _remember_identity(storage, fmt, result)
    return result


def _remember_identity(storage: Storage, fmt: str, result: Result) -> None:
    if storage.result(fmt, result.digest) is not None:
        return
    assert result.path is not None
    copy = storage.temp_path("out")
    try:
        try:
            os.link(result.path, copy)  # same bytes, no copy: results are never modified in place
        except OSError:
            shutil.copyfile(result.path, copy)
        storage.add_result(fmt, result.digest, copy)
    finally:
        copy.unlink(missing_ok=True)
