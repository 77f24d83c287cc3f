"""The task runner signs an APT repository's ``Release`` as a step: ``apt-inrelease`` and
``apt-release-gpg`` on ``dists/<suite>/Release`` publish ``InRelease`` and ``Release.gpg`` beside
it (the Release unchanged), both checked by gpgv; other names are refused before any signing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sealbox.formats.apt import AptSigner
from sealbox.samples.linuxpkg import write_release
from tests.servers import Deployment, ServerProcess, start_server

from .helpers import Worker, _worker, entry, run, write_task, write_upstream

FORMATS = ["apt-inrelease", "apt-release-gpg"]
RELEASE = "public/repo/dists/stable/Release"


@pytest.fixture(scope="module")
def apt_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    sp = start_server(Deployment.create(tmp_path_factory.mktemp("apt-task") / "dep", "dep", FORMATS))
    yield sp
    sp.stop()


@pytest.fixture(scope="module")
def apt_worker(tmp_path_factory: pytest.TempPathFactory, apt_server: ServerProcess) -> Worker:
    return _worker(tmp_path_factory.mktemp("apt-worker") / "worker", {"dep": apt_server}, ["dep"], False)


def _work(tmp_path: Path, path: str, formats: list[str]) -> Path:
    work = tmp_path / "work"
    write_upstream(work, "Repo1", {path: write_release(tmp_path / "src")}, None)
    write_task(work, [entry("Repo1", [path], formats, task_type="repo")])
    return work


def test_release_gets_inrelease_and_release_gpg(
    tmp_path: Path, apt_worker: Worker, apt_server: ServerProcess
) -> None:
    out = tmp_path / "out"
    res = run(apt_worker.config, _work(tmp_path, RELEASE, FORMATS), out)
    assert res.code == 0, res.text
    release = out / RELEASE
    assert release.read_bytes() == (tmp_path / "src" / "Release").read_bytes()
    public = apt_server.deployment.public
    AptSigner.verify("apt-inrelease", release.with_name("InRelease"), release, public)
    AptSigner.verify("apt-release-gpg", release.with_name("Release.gpg"), release, public)
    assert sorted(p.name for p in release.parent.iterdir()) == ["InRelease", "Release", "Release.gpg"]


def test_only_inrelease_when_asked(tmp_path: Path, apt_worker: Worker, apt_server: ServerProcess) -> None:
    out = tmp_path / "out"
    res = run(apt_worker.config, _work(tmp_path, RELEASE, ["apt-inrelease"]), out)
    assert res.code == 0, res.text
    assert sorted(p.name for p in (out / RELEASE).parent.iterdir()) == ["InRelease", "Release"]


def test_a_file_not_named_release_is_refused(tmp_path: Path, apt_worker: Worker) -> None:
    res = run(apt_worker.config, _work(tmp_path, "public/repo/Packages", FORMATS), tmp_path / "out")
    assert res.code == 3 and "the apt formats sign a repository's Release file" in res.first, res.text
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*"))
