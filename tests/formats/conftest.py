"""Fixtures shared by format test files: the Authenticode kinds signed in-process, and the
container image tests' server; one of each for the whole run, however many of those files run."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sealbox.deploy.local import Deployment as Local
from tests.formats._authenticode_util import dev_signers, refusing_server
from tests.formats.test_authenticode import FORMATS, Deployment, LocalTSA
from tests.servers import ServerProcess, start_server


@pytest.fixture(scope="session")
def authenticode_dep(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    """A dev deployment's Authenticode signers (every name, file keys), without a server."""
    return dev_signers(tmp_path_factory.mktemp("authenticode-dep") / "dep", FORMATS)


@pytest.fixture(scope="session")
def inprocess_tsa(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalTSA]:
    t = LocalTSA(tmp_path_factory.mktemp("inprocess-tsa") / "tsa")
    yield t
    t.close()


@pytest.fixture(scope="session")
def inprocess_server(
    tmp_path_factory: pytest.TempPathFactory, inprocess_tsa: LocalTSA
) -> Iterator[ServerProcess]:
    """A server (file keys) whose osslsigncode says it is 2.5 and refuses to sign; its -v2 name
    is stamped by :func:`inprocess_tsa`."""
    sp = refusing_server(tmp_path_factory.mktemp("inprocess-server"), inprocess_tsa)
    yield sp
    sp.stop()


@pytest.fixture(scope="session")
def sigstore_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server of format ``sigstore`` (file key), for the container image tests."""
    sp = start_server(Local.create(tmp_path_factory.mktemp("sigstore") / "dep", "dep", ["sigstore"]))
    yield sp
    sp.stop()
