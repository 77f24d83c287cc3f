"""Every refusal of the issue, with its exit code and a first line that says what and why.

Checks must all happen before a token is requested: most tests here run against a config whose
servers are down, so a refusal that came after the token request would show up as exit 4."""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from sealbox.deploy.taskdev import SCOPE_PREFIX
from sealbox.samples.pe import write_pe
from sealbox.task import cot
from tests.servers import ServerProcess

from .helpers import Result, Worker, entry, run, write_task, write_upstream

CERT_DEP = f"{SCOPE_PREFIX}cert:dep-signing"
FMT = f"{SCOPE_PREFIX}format:"


@pytest.fixture(scope="module")
def down_config(worker: Worker) -> Iterator[Path]:
    """The production worker with every server pointing at a port nobody listens on."""
    from tests.servers import refusing_port

    with ExitStack() as ports:  # held (refusing) until the module's tests are done

        def dead(data: dict[str, Any]) -> None:
            for level in data["levels"].values():
                level["hosts"] = [f"127.0.0.1:{ports.enter_context(refusing_port())}"]

        yield worker.variant("servers-down", dead)


@pytest.fixture
def upstream(tmp_path: Path, worker: Worker) -> Path:
    """A work dir with a signed build upstream ``Build1`` holding a PE and a text file."""
    work = tmp_path / "work"
    pe = write_pe(tmp_path, "setup.exe")
    files: dict[str, bytes | Path] = {
        "public/build/setup.exe": pe,
        "public/build/notes.txt": b"release notes\n",
    }
    write_upstream(work, "Build1", files, worker.dir / "keys/build.key")
    return work


def refused(res: Result, code: int, *words: str) -> None:
    assert res.code == code, res.text
    assert res.first.startswith("sealbox task: error: ")
    assert res.lines[0] == res.first or not res.lines[0].startswith("sealbox task: error")
    for w in words:
        assert w in res.first, res.first


def go(config: Path, work: Path, tmp_path: Path) -> Result:
    return run(config, work, tmp_path / "out")


# -- schema ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda t: t["payload"]["upstreamArtifacts"][0].pop("paths"), "payload.upstreamArtifacts[0].paths"),
        (
            lambda t: t["payload"]["upstreamArtifacts"][0].pop("taskType"),
            "payload.upstreamArtifacts[0].taskType",
        ),
        (lambda t: t["payload"].update(upstreamArtifacts=[]), "payload.upstreamArtifacts"),
        (lambda t: t.pop("scopes"), "scopes"),
        (lambda t: t["payload"]["upstreamArtifacts"][0].update(taskId="../x"), "taskId"),
        (lambda t: t["payload"]["upstreamArtifacts"][0].update(paths=["../etc/passwd"]), "paths"),
        (lambda t: t["payload"]["upstreamArtifacts"][0].update(formats=["rot13"]), "formats"),
        (lambda t: t["payload"]["upstreamArtifacts"][0].update(formats="gpg"), "formats"),
    ],
)
def test_schema_errors_name_the_field(
    mutate: Any, field: str, upstream: Path, down_config: Path, tmp_path: Path
) -> None:
    write_task(upstream, [entry("Build1", ["public/build/notes.txt"], ["gpg"])])
    task = json.loads((upstream / "task.json").read_text())
    mutate(task)
    (upstream / "task.json").write_text(json.dumps(task))
    refused(go(down_config, upstream, tmp_path), 3, "task.json", field)


def test_not_json(upstream: Path, down_config: Path, tmp_path: Path) -> None:
    (upstream / "task.json").write_text("{not json")
    refused(go(down_config, upstream, tmp_path), 3, "not valid JSON")


def test_a_task_too_deep_or_too_big(upstream: Path, down_config: Path, tmp_path: Path) -> None:
    """Refused as malformed (exit 3), not an internal error: its copy in the record must be
    writable, and the file is not read past the limit."""
    write_task(upstream, [entry("Build1", ["public/build/notes.txt"], ["gpg"])])
    task = json.loads((upstream / "task.json").read_text())
    for depth in (33, 5000):  # deeper than the limit; deeper than Python's JSON parser goes
        (upstream / "task.json").write_text(
            json.dumps(task)[:-1] + ', "extra": ' + "[" * depth + "]" * depth + "}"
        )
        refused(go(down_config, upstream, tmp_path), 3, "task.json nests deeper than 32 levels")
    (upstream / "task.json").write_text(json.dumps({**task, "extra": {"pad": "x" * (4 << 20)}}))
    refused(go(down_config, upstream, tmp_path), 3, "task.json is larger than 4194304 bytes")


def test_duplicate_paths_from_two_upstreams(
    upstream: Path, worker: Worker, down_config: Path, tmp_path: Path
) -> None:
    write_upstream(upstream, "Build2", {"public/build/notes.txt": b"other\n"}, worker.dir / "keys/build.key")
    write_task(
        upstream,
        [
            entry("Build1", ["public/build/notes.txt"], ["gpg"]),
            entry("Build2", ["public/build/notes.txt"], ["gpg"]),
        ],
    )
    refused(go(down_config, upstream, tmp_path), 3, "public/build/notes.txt", "two upstream")


# -- scopes and levels --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scopes", "words"),
    [
        ([f"{FMT}gpg"], ("no cert-level scope",)),
        ([CERT_DEP, f"{SCOPE_PREFIX}cert:release-signing", f"{FMT}gpg"], ("more than one cert-level scope",)),
        ([CERT_DEP], ("format scope missing", f"{FMT}gpg")),
        ([CERT_DEP, "other:prefix:format:gpg"], ("format scope missing",)),
        ([f"{SCOPE_PREFIX}cert:beta-signing", f"{FMT}gpg"], ("unknown cert level", "beta-signing")),
        (["other:prefix:cert:dep-signing", f"{FMT}gpg"], ("no cert-level scope",)),
    ],
)
def test_scope_refusals(
    scopes: list[str], words: tuple[str, ...], upstream: Path, down_config: Path, tmp_path: Path
) -> None:
    write_task(upstream, [entry("Build1", ["public/build/notes.txt"], ["gpg"])], scopes=scopes)
    refused(go(down_config, upstream, tmp_path), 3, *words)


def test_format_not_served_by_the_level(upstream: Path, down_config: Path, tmp_path: Path) -> None:
    write_task(upstream, [entry("Build1", ["public/build/setup.exe"], ["jar"])])  # dep serves no jar here
    refused(go(down_config, upstream, tmp_path), 3, "does not serve", "jar")


@pytest.mark.parametrize(
    ("source", "tasks_for", "words"),
    [
        ("https://hg.example.invalid/projects/elm/file/tip", "hg-push", ("not in a tree allowed", "release")),
        ("https://hg.example.invalid/mozilla-central/file/tip", "hg-push", ("not in a tree allowed",)),
        ("https://hg.example.invalid/try/file/tip", "hg-push", ("try",)),
        (
            "https://hg.example.invalid/releases/mozilla-release/file/tip",
            "github-pull-request",
            ("pull-request",),
        ),
        ("https://github.com/example/firefox/pull/12", "github-push", ("pull request",)),
    ],
)
def test_restricted_level_from_a_disallowed_tree(
    source: str, tasks_for: str, words: tuple[str, ...], upstream: Path, down_config: Path, tmp_path: Path
) -> None:
    write_task(
        upstream,
        [entry("Build1", ["public/build/notes.txt"], ["gpg"])],
        level="release",
        source=source,
        extra={"tasks_for": tasks_for},
    )
    refused(go(down_config, upstream, tmp_path), 3, *words)


def test_restricted_level_needs_a_source(upstream: Path, down_config: Path, tmp_path: Path) -> None:
    write_task(upstream, [entry("Build1", ["public/build/notes.txt"], ["gpg"])], level="release")
    task = json.loads((upstream / "task.json").read_text())
    del task["metadata"]
    (upstream / "task.json").write_text(json.dumps(task))
    refused(go(down_config, upstream, tmp_path), 3, "metadata.source")


def test_restricted_level_on_a_dep_worker_is_a_config_error(dep_worker: Worker, tmp_path: Path) -> None:
    def add_release(data: dict[str, Any]) -> None:
        data["levels"]["release"] = dict(data["levels"]["dep"])

    config = dep_worker.variant("dep-with-release", add_release)
    write_task(tmp_path / "w", [entry("Build1", ["a.txt"], ["gpg"])])
    refused(go(config, tmp_path / "w", tmp_path), 5, "levels", "dep worker")


# -- chain of trust -----------------------------------------------------------------------------


def test_bad_cot_signature(upstream: Path, down_config: Path, tmp_path: Path) -> None:
    record = upstream / "cot/Build1" / cot.RECORD
    data = json.loads(record.read_text())
    data["artifacts"]["public/build/notes.txt"]["sha256"] = "0" * 64
    record.write_text(json.dumps(data, indent=2, sort_keys=True))
    write_task(upstream, [entry("Build1", ["public/build/notes.txt"], ["gpg"])])
    refused(go(down_config, upstream, tmp_path), 3, "chain of trust", "Build1", "does not verify")


def test_untrusted_class_key(tmp_path: Path, down_config: Path) -> None:
    work = tmp_path / "work"
    stranger = tmp_path / "stranger.key"
    cot.write_private_key(stranger, cot.generate_key())
    write_upstream(work, "Build9", {"public/build/notes.txt": b"x\n"}, stranger)
    write_task(work, [entry("Build9", ["public/build/notes.txt"], ["gpg"])])
    refused(go(down_config, work, tmp_path), 3, "trusted worker class")


def test_class_may_not_produce_that_task_type(upstream: Path, down_config: Path, tmp_path: Path) -> None:
    write_task(upstream, [entry("Build1", ["public/build/notes.txt"], ["gpg"], task_type="decision")])
    refused(go(down_config, upstream, tmp_path), 3, "worker class 'build'")


def test_rotated_keys_both_verify(upstream: Path, worker: Worker, tmp_path: Path) -> None:
    new = tmp_path / "new-build.key"
    cot.write_private_key(new, cot.generate_key())

    def rotate(data: dict[str, Any]) -> None:
        data["trusted"]["build"]["keys"].append(cot.public_key_text(cot.load_private_key(new)))
        for level in data["levels"].values():
            level["hosts"] = ["127.0.0.1:1"]

    config = worker.variant("rotated", rotate)
    write_upstream(upstream, "Build5", {"public/build/new.txt": b"new\n"}, new)
    write_task(
        upstream,
        [
            entry("Build1", ["public/build/notes.txt"], ["gpg"]),
            entry("Build5", ["public/build/new.txt"], ["gpg"]),
        ],
    )
    res = go(config, upstream, tmp_path)
    # both records verify (old and new key); the task only fails at the (dead) server
    refused(res, 4, "gave a token")
    assert sum("signature verified" in ln for ln in res.lines) == 2


def test_wrong_task_id_in_record(tmp_path: Path, worker: Worker, down_config: Path) -> None:
    work = tmp_path / "work"
    write_upstream(
        work, "Build1", {"public/build/notes.txt": b"x\n"}, worker.dir / "keys/build.key", "Build7"
    )
    write_task(work, [entry("Build1", ["public/build/notes.txt"], ["gpg"])])
    refused(go(down_config, work, tmp_path), 3, "record is for task Build7, not Build1")


def test_missing_artifact_entry(upstream: Path, worker: Worker, down_config: Path, tmp_path: Path) -> None:
    # the file exists on disk but was never listed in the upstream's signed record
    (upstream / "cot/Build1/public/build/extra.txt").write_text("smuggled\n")
    write_task(upstream, [entry("Build1", ["public/build/extra.txt"], ["gpg"])])
    refused(go(down_config, upstream, tmp_path), 3, "public/build/extra.txt", "not listed")


def test_sha256_mismatch(upstream: Path, down_config: Path, tmp_path: Path) -> None:
    (upstream / "cot/Build1/public/build/notes.txt").write_text("swapped after the build\n")
    write_task(upstream, [entry("Build1", ["public/build/notes.txt"], ["gpg"])])
    refused(go(down_config, upstream, tmp_path), 3, "public/build/notes.txt", "sha256")


def test_unsigned_record_on_a_production_worker(tmp_path: Path, down_config: Path) -> None:
    work = tmp_path / "work"
    write_upstream(work, "Build1", {"public/build/notes.txt": b"x\n"}, None)
    write_task(work, [entry("Build1", ["public/build/notes.txt"], ["gpg"])])
    refused(go(down_config, work, tmp_path), 3, "not signed")


# -- archives and formats -----------------------------------------------------------------------


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("members", "words"),
    [
        ({"firefox/../../evil.exe": b"MZ"}, ("'..'", "evil.exe")),
        ({"/abs/evil.exe": b"MZ"}, ("absolute", "evil.exe")),
        ({"firefox/readme.txt": b"nothing to sign"}, ("did not find any files to sign",)),
        ({"bomb.bin": bytes(3 << 20)}, ("more than", "bomb.bin")),
    ],
)
def test_archive_refusals_name_the_member(
    members: dict[str, bytes], words: tuple[str, ...], tmp_path: Path, worker: Worker
) -> None:
    def limited(data: dict[str, Any]) -> None:
        data["limits"] = {"max_archive_size": 1 << 20, "max_archive_members": 100}
        for level in data["levels"].values():
            level["hosts"] = ["127.0.0.1:1"]

    config = worker.variant("limited", limited)
    work = tmp_path / "work"
    write_upstream(work, "Build1", {"public/build/target.zip": _zip(members)}, worker.dir / "keys/build.key")
    write_task(work, [entry("Build1", ["public/build/target.zip"], ["sha2signcode"])])
    refused(go(config, work, tmp_path), 3, "public/build/target.zip", *words)


def test_widevine_needs_one_precomplete(tmp_path: Path, worker: Worker, down_config: Path) -> None:
    work = tmp_path / "work"
    data = _zip({"firefox/firefox.exe": b"MZ" + bytes(100)})
    write_upstream(work, "Build1", {"public/build/target.zip": data}, worker.dir / "keys/build.key")
    write_task(work, [entry("Build1", ["public/build/target.zip"], ["widevine"])], level="release")
    refused(go(down_config, work, tmp_path), 3, "precomplete")


def test_authenticode_on_a_non_windows_name(upstream: Path, down_config: Path, tmp_path: Path) -> None:
    write_task(upstream, [entry("Build1", ["public/build/notes.txt"], ["sha2signcode"])])
    refused(go(down_config, upstream, tmp_path), 3, "notes.txt", "sha2signcode")


def test_reserved_output_path(upstream: Path, down_config: Path, tmp_path: Path) -> None:
    write_task(upstream, [entry("Build1", [cot.RECORD], [])])
    refused(go(down_config, upstream, tmp_path), 3, "reserved")


# -- availability and signing failures ----------------------------------------------------------


def test_unavailable_input(upstream: Path, down_config: Path, tmp_path: Path, worker: Worker) -> None:
    # listed in the record, but the file is neither in cot/ nor in the artifact store
    folder = upstream / "cot/Build1"
    (folder / "public/build/gone.txt").write_text("gone\n")
    cot.write_record(
        folder, {}, "Build1", "build", "w", "g", cot.load_private_key(worker.dir / "keys/build.key")
    )
    (folder / "public/build/gone.txt").unlink()
    write_task(upstream, [entry("Build1", ["public/build/gone.txt"], ["gpg"])])
    refused(go(down_config, upstream, tmp_path), 4, "input unavailable", "gone.txt")


def test_missing_task_json(tmp_path: Path, down_config: Path) -> None:
    (tmp_path / "empty").mkdir()
    refused(go(down_config, tmp_path / "empty", tmp_path), 4, "task.json")


def test_server_down(upstream: Path, down_config: Path, tmp_path: Path) -> None:
    write_task(upstream, [entry("Build1", ["public/build/notes.txt"], ["gpg"])])
    res = go(down_config, upstream, tmp_path)
    refused(res, 4, "no signing server of level 'dep' gave a token")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_signing_failure(tmp_path: Path, worker: Worker, servers: dict[str, ServerProcess]) -> None:
    work = tmp_path / "work"
    files: dict[str, bytes | Path] = {"public/build/update.mar": b"this is not a MAR file at all\n" * 4}
    write_upstream(work, "Build1", files, worker.dir / "keys/build.key")
    write_task(work, [entry("Build1", ["public/build/update.mar"], ["mar"])])
    res = go(worker.config, work, tmp_path)
    refused(res, 5, "signing failed", "update.mar")
    assert not (tmp_path / "out" / cot.RECORD).exists()


def test_wrong_token_credentials(upstream: Path, worker: Worker, tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.write_text("issuer:wrong-password")

    def wrong(data: dict[str, Any]) -> None:
        data["levels"]["dep"]["credentials"] = str(creds)

    config = worker.variant("wrong-creds", wrong)
    write_task(upstream, [entry("Build1", ["public/build/notes.txt"], ["gpg"])])
    refused(go(config, upstream, tmp_path), 5, "gave a token")


def test_an_unusable_ca_bundle_fails_the_task_not_retries_it(
    upstream: Path, worker: Worker, tmp_path: Path
) -> None:
    """A level's CA bundle that is not one is the worker's configuration, not a server that did
    not answer: exit 5 (failed), not 4 (a worker would retry that for ever)."""
    bundle = tmp_path / "not-a-bundle.pem"
    bundle.write_text("not a certificate\n")

    def broken(data: dict[str, Any]) -> None:
        data["levels"]["dep"]["ca"] = str(bundle)

    write_task(upstream, [entry("Build1", ["public/build/notes.txt"], ["gpg"])])
    refused(go(worker.variant("bad-ca", broken), upstream, tmp_path), 5, "level 'dep'", "cannot be loaded")


def test_config_errors_name_the_field(tmp_path: Path, worker: Worker, upstream: Path) -> None:
    def typo(data: dict[str, Any]) -> None:
        data["worker"]["prodcution"] = True

    refused(go(worker.variant("typo", typo), upstream, tmp_path), 5, "worker.prodcution")

    def bad_store(data: dict[str, Any]) -> None:
        data["worker"]["artifact_store"] = "http://example.invalid/{taskId}/{path}"

    refused(go(worker.variant("store", bad_store), upstream, tmp_path), 5, "worker.artifact_store")


def test_cli_first_stderr_line_says_what_and_why(upstream: Path, down_config: Path, tmp_path: Path) -> None:
    import subprocess

    from tests.servers import BIN

    write_task(upstream, [entry("Build1", ["public/build/notes.txt"], ["gpg"])], scopes=[f"{FMT}gpg"])
    argv = [str(BIN / "sealbox"), "task", "run", "--config", str(down_config), "--work-dir", str(upstream)]
    proc = subprocess.run(
        [*argv, "--artifact-dir", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 3
    assert proc.stderr.splitlines()[0].startswith("sealbox task: error: no cert-level scope")
