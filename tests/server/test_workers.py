"""The signing worker pool on its own: forked workers sign orders of in-process formats, a
refused order leaves its worker serving, and a lost worker's jobs run in threads instead."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from sealbox.errors import FormatRejected
from sealbox.keys import PassphraseSource
from sealbox.samples.mar import write_mar
from sealbox.server.config import load_config
from sealbox.server.jobs import JobManager
from sealbox.server.run import Signers, load_signers
from sealbox.server.storage import Input, Storage
from sealbox.server.workers import Order, WorkerLost, WorkerPool
from tests.servers import Deployment, gpg_verify

CAP = 120.0  # generous bound on every wait


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    return Deployment.create(
        tmp_path_factory.mktemp("workers") / "dep", "dep", ["gpg", "mar", "sha2signcode"]
    )


@pytest.fixture(scope="module")
def signers(deployment: Deployment) -> Signers:
    cfg = load_config(deployment.config)
    return load_signers(cfg, PassphraseSource.from_file(deployment.root / "passphrases"))


def _pool(signers: Signers, count: int, scratch: Path, formats: tuple[str, ...] | None = None) -> WorkerPool:
    """Forked before the test's event loop (or any thread) exists, as the server does."""
    chosen = {fmt: s for fmt, s in signers.items() if formats is None or fmt in formats}
    return WorkerPool(chosen, count, scratch)


def _workers() -> list[multiprocessing.process.BaseProcess]:
    return [p for p in multiprocessing.active_children() if p.name.startswith("sealbox-signer-")]


def _until(what: str, done: Callable[[], bool]) -> None:
    deadline = time.monotonic() + CAP
    while not done():
        assert time.monotonic() < deadline, f"{what}: still not so after {CAP:g} s"
        time.sleep(0.02)


def _gpg_valid(tmp_path: Path, deployment: Deployment, data: bytes, signature: bytes) -> bool:
    (tmp_path / "in.bin").write_bytes(data)
    (tmp_path / "in.bin.asc").write_bytes(signature)
    res = gpg_verify(tmp_path / "in.bin.asc", tmp_path / "in.bin", deployment.public / "gpg.asc")
    return res.returncode == 0 and b"VALIDSIG" in res.stdout


def test_workers_sign_orders_of_in_process_formats(
    signers: Signers, deployment: Deployment, tmp_path: Path
) -> None:
    pool = _pool(signers, 2, tmp_path)
    try:
        assert pool.census() == (2, 2, 0)
        assert pool.takes("gpg") and pool.takes("mar") and not pool.takes("sha2signcode")  # a tool
        data = os.urandom(4000)

        async def main() -> list[bytes]:
            return await asyncio.gather(*(pool.run(Order("gpg", f"f{i}.bin", data)) for i in range(5)))

        signatures = asyncio.run(main())
        assert all(_gpg_valid(tmp_path, deployment, data, sig) for sig in signatures)
    finally:
        pool.close()
    assert not _workers()  # close() lets them exit


def test_no_in_process_format_no_workers(signers: Signers, tmp_path: Path) -> None:
    pool = _pool(signers, 2, tmp_path, ("sha2signcode",))
    try:
        assert pool.census() == (0, 0, 0) and not pool.takes("sha2signcode") and not _workers()
    finally:
        pool.close()


def test_a_refused_order_leaves_its_worker_serving(signers: Signers, tmp_path: Path) -> None:
    pool = _pool(signers, 1, tmp_path)
    mar = write_mar(tmp_path, "u.mar", size=2048).read_bytes()

    async def main() -> bytes:
        with pytest.raises(FormatRejected):
            await pool.run(Order("mar", "u.mar", b"not a MAR file" * 10))
        return await pool.run(Order("mar", "u.mar", mar))

    try:
        assert asyncio.run(main()).startswith(b"MAR1")
        assert pool.census() == (1, 1, 0)
    finally:
        pool.close()


def test_a_lost_workers_jobs_run_in_threads(
    signers: Signers, deployment: Deployment, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sealbox.jobs")
    pool = _pool(signers, 1, tmp_path)
    storage = Storage(tmp_path / "data")
    [worker] = _workers()
    assert worker.pid is not None
    os.kill(worker.pid, signal.SIGKILL)
    _until("the worker reaped", lambda: pool.census() == (0, 1, 1))
    inputs = [os.urandom(3000), os.urandom(3000)]

    async def main() -> None:
        jobs = JobManager(storage, signers, concurrency=2, timeout=CAP, workers=pool)
        try:
            for data in inputs:  # the first finds the worker gone, the second no worker left
                sha1 = hashlib.sha1(data, usedforsecurity=False).hexdigest()
                jobs.submit("gpg", sha1, Input(data, len(data), sha1=sha1, filename="f.bin"))
                assert await jobs.wait("gpg", sha1, CAP)
            with pytest.raises(WorkerLost):
                await pool.run(Order("gpg", "f.bin", inputs[0]))
        finally:
            await jobs.drain(CAP)

    try:
        asyncio.run(main())
        fields = [getattr(r, "fields", {}) for r in caplog.records]
        assert sum(f.get("event") == "worker_gone" for f in fields) == 1  # logged once, by the pool
        jobs = [f for f in fields if f.get("event") == "job"]
        assert [(j["outcome"], j["ran_in"]) for j in jobs] == [("signed", "thread")] * 2
        for data in inputs:
            found = storage.result("gpg", hashlib.sha1(data, usedforsecurity=False).hexdigest())
            assert found is not None and found.body is not None
            assert _gpg_valid(tmp_path, deployment, data, found.body)
        assert not pool.takes("gpg")
    finally:
        storage.close()
        pool.close()
