"""Signing jobs: keyed by (format, input sha1), run in a bounded pool with a timeout.

Each format gets at most ``concurrency`` jobs at once, so a slow format cannot starve the
others, and signing runs in worker threads so the event loop keeps serving. A job that
fails because of its input is remembered as permanent; other failures are retried and
then remembered for a short while, so polling clients learn about them within seconds.
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
from ..hashing import CHUNK
from .storage import Storage

log = logging.getLogger("sealbox.jobs")

TRANSIENT_ATTEMPTS = 2
TRANSIENT_FAILURE_TTL = 60.0


@dataclass
class _Job:
    fmt: str
    sha1: str
    done: asyncio.Event = field(default_factory=asyncio.Event)


class JobManager:
    def __init__(
        self, storage: Storage, signers: Mapping[str, Signer], concurrency: int, timeout: float
    ) -> None:
        self.storage = storage
        self.signers = signers
        self.timeout = timeout
        self._limits = {fmt: asyncio.Semaphore(concurrency) for fmt in signers}
        self._pool = ThreadPoolExecutor(
            max_workers=min(64, concurrency * max(1, len(signers))), thread_name_prefix="sign"
        )
        self._jobs: dict[tuple[str, str], _Job] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def pending(self, fmt: str, sha1: str) -> bool:
        return (fmt, sha1) in self._jobs

    def submit(self, fmt: str, sha1: str, digests: Mapping[str, Any] | None = None) -> None:
        """Queue a job unless one is already pending for (fmt, sha1)."""
        if (fmt, sha1) in self._jobs:
            return
        job = _Job(fmt, sha1)
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
            await asyncio.wait_for(job.done.wait(), timeout)
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
            job.done.set()
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
            work = self.storage.temp_dir()
            try:
                fut = loop.run_in_executor(self._pool, self._sign, job, work, digests)
                digest = await asyncio.wait_for(fut, self.timeout)
                self.storage.clear_failure(job.fmt, job.sha1)
                return "signed", digest
            except FormatRejected as e:
                self.storage.add_failure(job.fmt, job.sha1, True, str(e))
                return "rejected", str(e)
            except TimeoutError:
                reason = f"signing timed out after {self.timeout:g} s"
            except SigningFailed as e:
                reason = str(e)
            finally:
                # A timed-out worker may still be writing here; it only ever writes inside ``work``.
                shutil.rmtree(work, ignore_errors=True)
            if attempt < TRANSIENT_ATTEMPTS:
                await asyncio.sleep(0.5 * attempt)
        self.storage.add_failure(job.fmt, job.sha1, False, reason)
        return "failed", reason

    def _sign(self, job: _Job, work: Any, digests: dict[str, Any]) -> str:
        """Runs in a worker thread: verify the stored input, sign it, publish the result."""
        storage = self.storage
        src = storage.input_path(job.sha1)
        filename = storage.input_filename(job.sha1)
        if filename is None or not src.is_file():
            raise FormatRejected("the input is no longer on the server; upload it again")
        if not digests:
            # Re-hash a stored input: a corrupt copy must never be signed.
            states = {"sha1": hashlib.sha1(usedforsecurity=False), "sha256": hashlib.sha256()}
            with src.open("rb") as f:
                while chunk := f.read(CHUNK):
                    for h in states.values():
                        h.update(chunk)
            if states["sha1"].hexdigest() != job.sha1:
                storage.drop_input(job.sha1)
                raise SigningFailed("stored input was corrupt and has been dropped; upload it again")
            digests = {"sha256": states["sha256"]}
        out = work / "out"
        signer = self.signers[job.fmt]
        signer.sign(SignRequest(input=src, output=out, filename=filename, work_dir=work, digests=digests))
        if not out.is_file():
            raise SigningFailed(f"format '{job.fmt}' produced no output")
        digest = storage.add_result(job.fmt, job.sha1, out)
        # Keep an output that replaces the file as an input too: chaining another format
        # needs no upload, and signing the output again with this format returns it
        # unchanged. (A detached signature is not something anyone signs next.)
        if not signer.detached_suffix.get(job.fmt):
            result = storage.result_path(job.fmt, job.sha1)
            storage.link_input(digest, filename, result)
            if digest != job.sha1:
                self._remember_identity(job.fmt, digest, result)
        return digest

    def _remember_identity(self, fmt: str, digest: str, result: Any) -> None:
        if self.storage.result(fmt, digest) is not None:
            return
        work = self.storage.temp_dir()
        try:
            copy = work / "out"
            try:
                os.link(result, copy)  # same bytes, no copy: results are never modified in place
            except OSError:
                shutil.copyfile(result, copy)
            self.storage.add_result(fmt, digest, copy)
        finally:
            shutil.rmtree(work, ignore_errors=True)
