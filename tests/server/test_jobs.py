"""The job layer on its own: a JobManager with a real store in tmp_path and the real signers of
a dev deployment (gpg, MAR and emevoucher in process, Authenticode through osslsigncode).

An attempt gets its input (the upload, or what the store holds), chooses where it runs,
signs, and puts the output in the store; the job remembers the outcome.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest

from sealbox.formats import signer_class
from sealbox.keys import PassphraseSource
from sealbox.samples.mar import write_mar
from sealbox.samples.pe import write_pe
from sealbox.server.config import load_config
from sealbox.server.jobs import TRANSIENT_ATTEMPTS, JobManager
from sealbox.server.run import Signers, load_signers
from sealbox.server.storage import GONE, Blob, Input, Result, Storage
from sealbox.server.workers import WorkerPool
from sealbox.wire import SMALL_FILE
from tests.servers import Deployment, gpg_verify

CAP = 120.0  # generous bound on every wait: a broken job layer fails the test instead of hanging it
T = TypeVar("T")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    root = tmp_path_factory.mktemp("jobs") / "dep"
    return Deployment.create(root, "dep", ["gpg", "mar", "emevoucher", "sha2signcode"])


@pytest.fixture(scope="module")
def signers(deployment: Deployment) -> Signers:
    cfg = load_config(deployment.config)
    return load_signers(cfg, PassphraseSource.from_file(deployment.root / "passphrases"))


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[Storage]:
    st = Storage(tmp_path / "data")
    yield st
    st.close()


@pytest.fixture
def workers(signers: Signers, tmp_path: Path) -> Iterator[WorkerPool]:
    """One signing worker, forked before any event loop or thread of the test exists."""
    pool = WorkerPool(signers, 1, tmp_path)
    yield pool
    pool.close()


@pytest.fixture
def job_lines(caplog: pytest.LogCaptureFixture) -> Callable[[], dict[tuple[str, str], dict[str, Any]]]:
    """The job log lines so far, by (format, sha1)."""
    caplog.set_level(logging.INFO, logger="sealbox.jobs")

    def lines() -> dict[tuple[str, str], dict[str, Any]]:
        fields = [getattr(r, "fields", {}) for r in caplog.records]
        return {(f["format"], f["sha1"]): f for f in fields if f.get("event") == "job"}

    return lines


def _with_jobs(
    storage: Storage,
    signers: Signers,
    body: Callable[[JobManager], Awaitable[T]],
    workers: WorkerPool | None = None,
    manager: type[JobManager] = JobManager,
) -> T:
    async def main() -> T:
        jobs = manager(storage, signers, concurrency=2, timeout=CAP, workers=workers)
        try:
            return await body(jobs)
        finally:
            await jobs.drain(CAP)

    return asyncio.run(main())


async def _sign(jobs: JobManager, fmt: str, sha1: str, upload: Input | None = None) -> None:
    jobs.submit(fmt, sha1, upload)
    assert await jobs.wait(fmt, sha1, CAP)


def _sha1(data: bytes) -> str:
    return hashlib.sha1(data, usedforsecurity=False).hexdigest()


def _upload(data: bytes, name: str = "f.bin") -> Input:
    """An upload still in memory, as the HTTP layer hands it to a job."""
    return Input(data, len(data), sha1=_sha1(data), filename=name)


def _spooled(storage: Storage, data: bytes, name: str = "big.bin") -> Input:
    """A big upload, spooled to a file and moved into the store, as the HTTP layer does."""
    path = storage.temp_path("up")
    path.write_bytes(data)
    item = Input(path, len(data), sha1=_sha1(data), filename=name, digests={"sha256": hashlib.sha256(data)})
    return storage.put_input(item)


def _read(blob: Blob) -> bytes:
    with blob.open() as f:
        return f.read()


def _signed(storage: Storage, fmt: str, sha1: str) -> Result:
    found = storage.result(fmt, sha1)
    assert found is not None, storage.failure(fmt, sha1, 60)
    return found


def _gpg_valid(tmp_path: Path, deployment: Deployment, data: bytes, signature: Result) -> bool:
    (tmp_path / "in.bin").write_bytes(data)
    (tmp_path / "in.bin.asc").write_bytes(_read(signature))
    res = gpg_verify(tmp_path / "in.bin.asc", tmp_path / "in.bin", deployment.public / "gpg.asc")
    return res.returncode == 0 and b"VALIDSIG" in res.stdout


def test_a_small_upload_without_workers_signs_in_a_thread(
    storage: Storage, signers: Signers, deployment: Deployment, tmp_path: Path, job_lines: Any
) -> None:
    data = os.urandom(3000)
    _with_jobs(storage, signers, lambda jobs: _sign(jobs, "gpg", _sha1(data), _upload(data)))
    line = job_lines()[("gpg", _sha1(data))]
    assert line["outcome"] == "signed" and line["ran_in"] == "thread"
    assert _gpg_valid(tmp_path, deployment, data, _signed(storage, "gpg", _sha1(data)))
    held = storage.get_input(_sha1(data))  # the upload, kept with its result
    assert held is not None and held.body == data and held.filename == "f.bin"


def test_a_small_upload_signs_in_a_worker_and_leaves_no_file(
    storage: Storage,
    signers: Signers,
    workers: WorkerPool,
    deployment: Deployment,
    tmp_path: Path,
    job_lines: Any,
) -> None:
    data = os.urandom(3000)
    _with_jobs(storage, signers, lambda jobs: _sign(jobs, "gpg", _sha1(data), _upload(data)), workers)
    assert job_lines()[("gpg", _sha1(data))]["ran_in"] == "worker"
    assert _gpg_valid(tmp_path, deployment, data, _signed(storage, "gpg", _sha1(data)))
    data_dir = tmp_path / "data"
    assert list((data_dir / "unsigned").iterdir()) == [] and list((data_dir / "signed").iterdir()) == []


def test_a_big_upload_signs_in_a_thread_from_its_file(
    storage: Storage,
    signers: Signers,
    workers: WorkerPool,
    deployment: Deployment,
    tmp_path: Path,
    job_lines: Any,
) -> None:
    data = os.urandom(SMALL_FILE + 1)
    item = _spooled(storage, data)
    assert item.content == tmp_path / "data" / "unsigned" / item.sha1
    _with_jobs(storage, signers, lambda jobs: _sign(jobs, "gpg", item.sha1, item), workers)
    assert job_lines()[("gpg", item.sha1)]["ran_in"] == "thread"  # too big for a worker
    assert _gpg_valid(tmp_path, deployment, data, _signed(storage, "gpg", item.sha1))


def test_held_content_signs_in_other_formats_and_outputs_chain(
    storage: Storage,
    signers: Signers,
    workers: WorkerPool,
    deployment: Deployment,
    tmp_path: Path,
    job_lines: Any,
) -> None:
    exe = write_pe(tmp_path)  # ~100 KiB: small
    data = exe.read_bytes()
    sha1 = _sha1(data)

    async def body(jobs: JobManager) -> str:
        await _sign(jobs, "gpg", sha1, _upload(data, exe.name))  # a worker's job: a row
        await _sign(jobs, "sha2signcode", sha1)  # no upload: the row, signed by a tool
        signed = _signed(storage, "sha2signcode", sha1).digest
        await _sign(jobs, "gpg", signed)  # no upload: the signed file
        return signed

    signed = _with_jobs(storage, signers, body, workers)
    lines = job_lines()
    assert [lines[k]["ran_in"] for k in (("gpg", sha1), ("sha2signcode", sha1), ("gpg", signed))] == [
        "worker",
        "thread",
        "thread",
    ]
    out = tmp_path / "signed.exe"
    out.write_bytes(_read(_signed(storage, "sha2signcode", sha1)))
    signer_class("sha2signcode").verify("sha2signcode", out, None, deployment.public)
    # The output replaces the file: kept as an input, and as its own result (signing it
    # again returns it unchanged).
    assert _signed(storage, "sha2signcode", signed).digest == signed
    assert _gpg_valid(tmp_path, deployment, out.read_bytes(), _signed(storage, "gpg", signed))


def test_a_workers_output_that_replaces_the_file_is_an_input_too(
    storage: Storage, signers: Signers, workers: WorkerPool, tmp_path: Path, job_lines: Any
) -> None:
    data = write_mar(tmp_path, "u.mar", size=2048).read_bytes()
    sha1 = _sha1(data)
    _with_jobs(storage, signers, lambda jobs: _sign(jobs, "mar", sha1, _upload(data, "u.mar")), workers)
    assert job_lines()[("mar", sha1)]["ran_in"] == "worker"
    found = _signed(storage, "mar", sha1)
    chained = storage.get_input(found.digest)
    assert chained is not None and chained.body == found.body and chained.filename == "u.mar"
    assert _signed(storage, "mar", found.digest).digest == found.digest


@pytest.mark.parametrize("where", ["worker", "thread"])
def test_an_input_the_format_refuses_is_remembered(
    storage: Storage, signers: Signers, signers_pool: Any, where: str, job_lines: Any
) -> None:
    data = b"not a MAR file at all" * 10
    _with_jobs(
        storage, signers, lambda jobs: _sign(jobs, "mar", _sha1(data), _upload(data)), signers_pool(where)
    )
    line = job_lines()[("mar", _sha1(data))]
    assert line["outcome"] == "rejected" and line["ran_in"] == where
    failure = storage.failure("mar", _sha1(data), 60)
    assert failure is not None and failure.permanent and failure.reason == line["reason"]


@pytest.fixture
def signers_pool(signers: Signers, tmp_path: Path) -> Iterator[Callable[[str], WorkerPool | None]]:
    """A pool for "worker" (forked on demand, before the test's event loop), none for "thread"."""
    pools: list[WorkerPool] = []

    def pool(where: str) -> WorkerPool | None:
        if where == "thread":
            return None
        pools.append(WorkerPool(signers, 1, tmp_path))
        return pools[-1]

    yield pool
    for p in pools:
        p.close()


def test_an_input_no_longer_held_is_gone_not_remembered(
    storage: Storage, signers: Signers, job_lines: Any
) -> None:
    """Nothing is known about content that is not there: no failure is remembered (a remembered
    one would refuse the upload the client is told to make)."""
    sha1 = "b" * 40
    _with_jobs(storage, signers, lambda jobs: _sign(jobs, "gpg", sha1))
    line = job_lines()[("gpg", sha1)]
    assert line["outcome"] == "gone" and line["reason"] == GONE
    assert storage.failure("gpg", sha1, 60) is None


def test_a_corrupt_stored_file_is_dropped_not_signed(
    storage: Storage, signers: Signers, tmp_path: Path, job_lines: Any
) -> None:
    data = os.urandom(SMALL_FILE + 1)
    item = _spooled(storage, data)
    (tmp_path / "data" / "unsigned" / item.sha1).write_bytes(b"bit rot" + data[7:])
    _with_jobs(storage, signers, lambda jobs: _sign(jobs, "gpg", item.sha1))  # as a GET submits it
    # Found corrupt and dropped, and nothing remembered: the client is to upload it again.
    line = job_lines()[("gpg", item.sha1)]
    assert line["outcome"] == "gone" and "upload it again" in line["reason"]
    assert storage.failure("gpg", item.sha1, 60) is None
    assert storage.result("gpg", item.sha1) is None and not storage.has_input(item.sha1)


class _Published(JobManager):
    """Notes every result :meth:`_store` puts in the store."""

    published: list[tuple[str, str, str]] = []

    def _store(self, job: Any, item: Input, output: Blob, digest: str | None) -> Result:
        found = super()._store(job, item, output, digest)
        self.published.append((job.fmt, item.sha1, found.digest))
        return found


def test_every_result_is_published_in_one_place(
    storage: Storage, signers: Signers, workers: WorkerPool, tmp_path: Path, job_lines: Any
) -> None:
    small, big = os.urandom(2000), os.urandom(SMALL_FILE + 1)
    exe = write_pe(tmp_path).read_bytes()

    async def body(jobs: JobManager) -> None:
        await _sign(jobs, "gpg", _sha1(small), _upload(small))  # a worker's bytes
        await _sign(jobs, "gpg", _sha1(big), _spooled(storage, big))  # a thread's file
        await _sign(jobs, "sha2signcode", _sha1(exe), _upload(exe, "setup.exe"))  # a tool's file

    _Published.published = []
    _with_jobs(storage, signers, body, workers, _Published)
    expected = [("gpg", _sha1(small)), ("gpg", _sha1(big)), ("sha2signcode", _sha1(exe))]
    assert [(fmt, sha1) for fmt, sha1, _ in _Published.published] == expected
    for fmt, sha1, digest in _Published.published:
        assert _signed(storage, fmt, sha1).digest == digest
    assert {job_lines()[k]["ran_in"] for k in expected} == {"worker", "thread"}


def test_where_a_job_runs_is_decided_in_one_place(
    storage: Storage, signers: Signers, workers: WorkerPool, tmp_path: Path
) -> None:
    small = _upload(os.urandom(SMALL_FILE))
    cases = [
        ("gpg", small, workers, "worker"),  # small, in memory, in process: a worker
        ("emevoucher", small, workers, "worker"),
        ("sha2signcode", small, workers, "thread"),  # a tool
        ("gpg", _upload(os.urandom(SMALL_FILE + 1)), workers, "thread"),  # too big to send
        ("gpg", _spooled(storage, b"a stored file"), workers, "thread"),  # a file: read in a thread
        ("gpg", small, None, "thread"),  # no workers at all
    ]

    async def body(jobs: JobManager) -> list[str]:
        where: list[str] = []
        for fmt, item, pool, _ in cases:
            jobs.workers = pool
            where.append(jobs._runs_in(fmt, item))
        return where

    assert _with_jobs(storage, signers, body) == [want for *_, want in cases]


class _Held:
    """A real signer whose ``sign`` waits for ``release`` first (then counts itself done)."""

    def __init__(self, inner: Any, release: threading.Event, done: threading.Semaphore) -> None:
        self._inner, self._release, self._done = inner, release, done

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def sign(self, request: Any) -> None:
        assert self._release.wait(CAP)
        try:
            self._inner.sign(request)
        finally:
            self._done.release()


def test_a_thread_job_that_times_out_publishes_nothing(storage: Storage, signers: Signers) -> None:
    """Signing and publishing share one job thread: a signer that finishes after its job
    timed out must not publish, and its output goes (the log would name no request for it)."""
    release, done = threading.Event(), threading.Semaphore(0)
    held = cast(Signers, {**signers, "gpg": _Held(signers["gpg"], release, done)})
    data = os.urandom(SMALL_FILE + 1)  # a file: a thread job
    sha1 = _sha1(data)

    async def main() -> JobManager:
        jobs = JobManager(storage, held, concurrency=1, timeout=0.2)
        jobs.submit("gpg", sha1, _spooled(storage, data))
        assert await jobs.wait("gpg", sha1, CAP)  # every attempt timed out, the signer still held
        return jobs

    jobs = asyncio.run(main())
    failure = storage.failure("gpg", sha1, CAP)
    assert failure is not None and "timed out" in failure.reason
    release.set()
    for _ in range(TRANSIENT_ATTEMPTS):  # each attempt's signer finishes now
        assert done.acquire(timeout=CAP)
    jobs._pool.shutdown(wait=True)  # and its thread has returned
    assert storage.result("gpg", sha1) is None
    assert not [p.name for p in storage.tmp.iterdir()], "an abandoned job's output was left behind"
