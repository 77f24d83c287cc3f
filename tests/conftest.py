from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import Deployment, ServerProcess, start_server


@pytest.fixture(scope="session")
def gpg_deployment(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    return Deployment.create(tmp_path_factory.mktemp("gpgdep") / "dep", "dep", ["gpg"])


@pytest.fixture(scope="session")
def gpg_server(gpg_deployment: Deployment) -> Iterator[ServerProcess]:
    sp = start_server(gpg_deployment)
    yield sp
    sp.stop()


@pytest.fixture
def payload(tmp_path: Path) -> Path:
    p = tmp_path / "payload.bin"
    p.write_bytes(b"sealbox test payload\n" + __import__("os").urandom(2048))
    return p
