"""Shared fixtures of the task-runner tests: one dep and one release server (real ``sealbox serve``
processes over HTTPS), a production worker for both levels, a dep worker, and task builders."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.servers import Deployment, ServerProcess, refusing_port, start_server

from .helpers import Worker, _worker

DEP_FORMATS = ["gpg", "sha2signcode", "mar"]
# an .apk asked for as jar travels as apk (v1+v2+v3): a level serving jar for APKs serves apk too
RELEASE_FORMATS = ["gpg", "sha2signcode", "mar", "jar", "apk", "widevine", "widevine_blessed", "dmg"]


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServerProcess]]:
    root = tmp_path_factory.mktemp("task-servers")
    dep = Deployment.create(root / "dep", "dep", DEP_FORMATS)
    rel = Deployment.create(root / "release", "release", RELEASE_FORMATS)
    procs = {"dep": start_server(dep), "release": start_server(rel)}
    yield procs
    for sp in procs.values():
        sp.stop()


@pytest.fixture(scope="session")
def worker(tmp_path_factory: pytest.TempPathFactory, servers: dict[str, ServerProcess]) -> Worker:
    """A production worker serving dep and release."""
    return _worker(tmp_path_factory.mktemp("w") / "worker", servers, ["dep", "release"], True)


@pytest.fixture(scope="session")
def dep_worker(tmp_path_factory: pytest.TempPathFactory, servers: dict[str, ServerProcess]) -> Worker:
    """A dep worker (no signature checks, unsigned records) serving dep only."""
    return _worker(tmp_path_factory.mktemp("dw") / "worker", servers, ["dep"], False)


@pytest.fixture
def free_hostspec() -> Iterator[str]:
    """A host:port where nothing answers (connections are refused) for the whole test."""
    with refusing_port() as port:
        yield f"127.0.0.1:{port}"
