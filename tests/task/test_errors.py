"""The runner's exit codes follow the kind of the client's error, never its message text.

Token refused (wrong issuer password) -> 5 and no server for the token -> 4 are pinned in
test_refusals.py (test_wrong_token_credentials, test_server_down), a refused input -> 5 in
test_signing_failure; here the signing step's other paths, against the real servers."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest

from sealbox.errors import SealboxError
from sealbox.task import cot
from sealbox.task.runner import EXIT_FAILED, EXIT_UNAVAILABLE, TaskFailure
from tests.servers import ServerProcess, refusing_port

from .helpers import Worker, entry, run, write_task, write_upstream


def test_task_failure_is_a_sealbox_error() -> None:
    assert issubclass(TaskFailure, SealboxError)


def test_refusal_whose_text_looks_like_a_timeout_is_a_signing_failure(
    tmp_path: Path, worker: Worker, servers: dict[str, ServerProcess]
) -> None:
    # The server refuses the name (dev servers take no spaces): a refusal, exit 5, even though
    # the client's message, which names the file, reads "gave up after ...".
    name = "public/build/gave up after 3.0 s.txt"
    work = tmp_path / "work"
    write_upstream(work, "Build1", {name: b"release notes\n"}, worker.dir / "keys/build.key")
    write_task(work, [entry("Build1", [name], ["gpg"])])
    res = run(worker.config, work, tmp_path / "out")
    assert res.code == EXIT_FAILED, res.text
    assert res.first.startswith("sealbox task: error: signing failed: ")
    assert "Unacceptable filename" in res.first


def test_signing_server_unavailable_after_the_token_is_exit_4(
    tmp_path: Path, worker: Worker, servers: dict[str, ServerProcess]
) -> None:
    # The live dep server mints the token but serves only mar here; gpg goes to a port that
    # refuses connections, until the worker's timeout: the server is unavailable, exit 4.
    with refusing_port() as port:

        def split(data: dict[str, Any]) -> None:
            data["levels"]["dep"]["hosts"] = [f"mar:{servers['dep'].hostspec}", f"127.0.0.1:{port}"]
            data["worker"]["timeout"] = 2.0

        config = worker.variant("gpg-unavailable", split)
        work = tmp_path / "work"
        write_upstream(work, "Build1", {"public/build/notes.txt": b"notes\n"}, worker.dir / "keys/build.key")
        write_task(work, [entry("Build1", ["public/build/notes.txt"], ["gpg"])])
        res = run(config, work, tmp_path / "out")
    assert res.code == EXIT_UNAVAILABLE, res.text
    assert res.first.startswith("sealbox task: error: server unavailable: public/build/notes.txt: ")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_task_that_fails_after_signing_publishes_nothing(
    tmp_path: Path, worker: Worker, servers: dict[str, ServerProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Everything is signed, then writing the task's record fails (a test double in place of
    ``cot.write_record``: no disk fails on demand): the artifact folder stays empty. Before,
    the signed files were already in it, with no record."""

    def broken(*args: Any, **kwargs: Any) -> list[Path]:
        raise OSError(errno.EIO, "Input/output error")

    work = tmp_path / "work"
    notes = {"public/build/notes.txt": b"release notes\n"}
    write_upstream(work, "Build1", notes, worker.dir / "keys/build.key")
    write_task(work, [entry("Build1", list(notes), ["gpg"])], checksums={"path": "public/build"})
    monkeypatch.setattr(cot, "write_record", broken)  # the runner calls it as cot.write_record
    res = run(worker.config, work, tmp_path / "out")
    assert res.code == EXIT_FAILED and "Input/output error" in res.first, res.text
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*")), list(
        (tmp_path / "out").rglob("*")
    )
