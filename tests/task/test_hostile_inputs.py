"""What a task's inputs cannot make the runner do: follow a link out of W/cot, write through a
planted name, sign bytes other than those its chain of trust checked, follow a store's redirect,
or crash on a record, a task file or an artifact folder that is not what it should be."""

from __future__ import annotations

import asyncio
import os
import shutil
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from sealbox.task.runner import run_task
from tests.servers import ServerProcess, ThreadedApp

from .helpers import Result, Worker, entry, run, write_task, write_upstream

NOTES = b"the bytes the build task produced\n"


def _in_store(worker: Worker, tmp_path: Path, task_id: str, files: dict[str, bytes]) -> None:
    """An upstream task's artifacts and signed record in the worker's (file://) store."""
    staging = tmp_path / "staging"
    write_upstream(staging, task_id, files, worker.dir / "keys/build.key")
    shutil.rmtree(worker.dir / "store" / task_id, ignore_errors=True)
    shutil.copytree(staging / "cot" / task_id, worker.dir / "store" / task_id)


def _failed(res: Result, code: int, *words: str) -> None:
    assert res.code == code, res.text
    assert res.first.startswith("sealbox task: error: ") and "Traceback" not in res.text, res.text
    for w in words:
        assert w in res.first, res.first


def test_a_link_in_cot_is_not_followed(tmp_path: Path, worker: Worker) -> None:
    """W/cot/<taskId>/public linked to a folder outside W: nothing is read from it or
    downloaded into it (the record, its signature and the artifact went there)."""
    _in_store(worker, tmp_path, "LinkedBuild1", {"public/build/notes.txt": NOTES})
    outside = tmp_path / "outside"
    outside.mkdir()
    work = tmp_path / "work"
    write_task(work, [entry("LinkedBuild1", ["public/build/notes.txt"], ["gpg"])])
    (work / "cot" / "LinkedBuild1").mkdir(parents=True)
    (work / "cot" / "LinkedBuild1" / "public").symlink_to(outside)
    _failed(run(worker.config, work, tmp_path / "out"), 4, "is a symbolic link")
    assert not any(outside.iterdir())


def test_a_download_is_not_written_through_a_planted_name(tmp_path: Path, worker: Worker) -> None:
    """A link planted where the download's temporary file would go (its name was predictable:
    .NAME.PID.part): the file it points to stays as it was."""
    _in_store(worker, tmp_path, "PlantedBuild1", {"public/build/notes.txt": NOTES})
    work = tmp_path / "work"
    write_task(work, [entry("PlantedBuild1", ["public/build/notes.txt"], ["gpg"])])
    folder = work / "cot" / "PlantedBuild1" / "public" / "build"
    folder.mkdir(parents=True)
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"not to be overwritten\n")
    (folder / f".notes.txt.{os.getpid()}.part").symlink_to(victim)
    res = run(worker.config, work, tmp_path / "out")
    assert res.code == 0, res.text
    assert victim.read_bytes() == b"not to be overwritten\n"
    assert (folder / "notes.txt").read_bytes() == NOTES and not (folder / "notes.txt").is_symlink()


def test_what_is_checked_is_what_is_signed(
    tmp_path: Path, worker: Worker, servers: dict[str, ServerProcess]
) -> None:
    """The input changes in W/cot once its sha256 was checked: the bytes checked are signed
    and published, not the new ones (the runner read the file again to sign it)."""
    work = tmp_path / "work"
    write_upstream(work, "SwappedBuild1", {"public/build/notes.txt": NOTES}, worker.dir / "keys/build.key")
    write_task(work, [entry("SwappedBuild1", ["public/build/notes.txt"], ["gpg"])])
    source = work / "cot/SwappedBuild1/public/build/notes.txt"
    lines: list[str] = []

    def echo(line: str) -> None:
        lines.append(line)
        if line.startswith("chain of trust:"):  # checked: now changed
            source.write_bytes(b"bytes no record lists\n")

    code = run_task(worker.config, work, tmp_path / "out", echo=echo, live_progress=False)
    assert code == 0, "\n".join(lines)
    assert (tmp_path / "out/public/build/notes.txt").read_bytes() == NOTES


@pytest.fixture
def hostile_store(servers: dict[str, ServerProcess]) -> Iterator[tuple[str, Path, dict[str, Any]]]:
    """An HTTPS artifact store (the dev deployment's certificate) serving files from a folder,
    told by ``behaviour`` how to answer some of them: {"redirect": path suffix (to plain http),
    "moved": path suffix (to https, under /moved/), "fail": suffix (503)}."""
    root_dir = servers["dep"].deployment.root
    behaviour: dict[str, Any] = {}
    store: dict[str, Path] = {}

    async def answer(request: web.Request) -> web.StreamResponse:
        path = request.match_info["tail"]
        if behaviour.get("fail") and path.endswith(behaviour["fail"]):
            return web.Response(status=503, text="busy")
        if behaviour.get("redirect") and path.endswith(behaviour["redirect"]):
            raise web.HTTPFound(f"http://127.0.0.1:{plain.port}/{path}")
        if behaviour.get("moved") and path.endswith(behaviour["moved"]) and not path.startswith("moved/"):
            raise web.HTTPSeeOther(f"/moved/{path}")  # relative, as a CDN hand-off may be
        path = path.removeprefix("moved/")
        f = store["root"] / path
        return web.Response(body=f.read_bytes()) if f.is_file() else web.Response(status=404)

    app = web.Application()
    app.router.add_get("/{tail:.*}", answer)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(root_dir / "tls/server.pem", root_dir / "tls/server.key")
    plain_app = web.Application()
    plain_app.router.add_get("/{tail:.*}", answer)
    with ThreadedApp(app, ctx) as running, ThreadedApp(plain_app) as plain:
        yield (
            f"https://127.0.0.1:{running.port}/{{taskId}}/{{path}}",
            root_dir / "tls/ca.pem",
            {
                "behaviour": behaviour,
                "store": store,
            },
        )


def _hostile_run(
    tmp_path: Path, worker: Worker, hostile_store: tuple[str, Path, dict[str, Any]], task_id: str
) -> Result:
    url, ca, knobs = hostile_store
    staging = tmp_path / "staging"
    write_upstream(staging, task_id, {"public/build/notes.txt": NOTES}, worker.dir / "keys/build.key")
    knobs["store"]["root"] = staging / "cot"

    def use(data: dict[str, Any]) -> None:
        data["worker"]["artifact_store"] = url
        data["worker"]["artifact_store_ca"] = str(ca)

    work = tmp_path / "work"
    write_task(work, [entry(task_id, ["public/build/notes.txt"], ["gpg"])])
    return run(worker.variant("hostile-store", use), work, tmp_path / "out")


def test_a_store_redirect_to_plain_http_is_not_followed(
    tmp_path: Path, worker: Worker, hostile_store: tuple[str, Path, dict[str, Any]]
) -> None:
    """A redirect to plain HTTP: no byte would be under TLS (it was followed)."""
    hostile_store[2]["behaviour"]["redirect"] = "notes.txt"
    _failed(_hostile_run(tmp_path, worker, hostile_store, "RedirectBuild1"), 4, "followed to https only")


def test_a_store_redirect_over_https_is_followed(
    tmp_path: Path, worker: Worker, hostile_store: tuple[str, Path, dict[str, Any]]
) -> None:
    """As a store hands artifacts to a CDN (Taskcluster's queue answers 303): followed, the
    same TLS checks on the new address."""
    hostile_store[2]["behaviour"]["moved"] = "notes.txt"
    res = _hostile_run(tmp_path, worker, hostile_store, "MovedBuild1")
    assert res.code == 0, res.text


def test_a_signature_the_store_fails_to_send_is_unavailable_not_missing(
    tmp_path: Path, worker: Worker, hostile_store: tuple[str, Path, dict[str, Any]]
) -> None:
    """A 503 for the record's signature: exit 4 (worth another try), not "not signed" (exit 3)."""
    hostile_store[2]["behaviour"]["fail"] = ".sig"
    _failed(_hostile_run(tmp_path, worker, hostile_store, "BusyBuild1"), 4, "503")


@pytest.mark.parametrize("record", ["deep", "huge"])
def test_a_record_too_deep_or_too_big_is_malformed(tmp_path: Path, dep_worker: Worker, record: str) -> None:
    work = tmp_path / "work"
    write_upstream(work, "OddBuild1", {"public/build/notes.txt": NOTES}, None)
    path = work / "cot/OddBuild1/public/chain-of-trust.json"
    if record == "deep":
        path.write_text("[" * 100_000 + "]" * 100_000)
    else:
        with path.open("wb") as f:  # sparse: 65 MiB of nothing, over the 64 MiB a record may hold
            f.truncate(65 << 20)
    write_task(work, [entry("OddBuild1", ["public/build/notes.txt"], ["gpg"])])
    res = run(dep_worker.config, work, tmp_path / "out")
    _failed(res, 3, "nests too deeply" if record == "deep" else "is larger than")


def test_an_artifact_folder_that_is_a_file_or_a_task_file_that_is_a_fifo(
    tmp_path: Path, worker: Worker
) -> None:
    work = tmp_path / "work"
    write_task(work, [entry("AnyBuild1", ["public/build/notes.txt"], ["gpg"])])
    out = tmp_path / "out"
    out.write_text("a file\n")
    _failed(run(worker.config, work, out), 5, f"artifact dir {out} is not a folder")
    (work / "task.json").unlink()
    os.mkfifo(work / "task.json")  # nothing ever writes it: reading it would wait for ever
    _failed(run(worker.config, work, tmp_path / "out2"), 3, "is not a regular file")


def test_a_download_that_stalls_is_a_timeout_not_a_write_error(
    tmp_path: Path, servers: dict[str, ServerProcess]
) -> None:
    """A store that sends its headers, then nothing: the download's time runs out, and that is
    what the failure says (the temporary file's handling once reported it as "cannot write")."""
    from sealbox.task.artifacts import ArtifactStore, Progress, Unavailable

    async def stall(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": "100"})
        await response.prepare(request)
        await response.write(b"x")
        await asyncio.sleep(5)  # (then the body ends short: also "cannot download")
        return response

    root_dir = servers["dep"].deployment.root
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(root_dir / "tls/server.pem", root_dir / "tls/server.key")
    app = web.Application()
    app.router.add_get("/{tail:.*}", stall)
    with ThreadedApp(app, ctx) as running:
        url = f"https://127.0.0.1:{running.port}/{{taskId}}/{{path}}"
        progress = Progress(lambda line: None, live=False)
        store = ArtifactStore(url, progress, root=tmp_path / "cot", ca=root_dir / "tls/ca.pem", timeout=1.0)
        with store, pytest.raises(Unavailable) as failed:
            store.fetch("StallBuild1", "public/x.bin", tmp_path / "cot/StallBuild1/public/x.bin")
    assert "cannot download" in str(failed.value) and "cannot write" not in str(failed.value), failed.value
    assert not any((tmp_path / "cot/StallBuild1/public").iterdir())
