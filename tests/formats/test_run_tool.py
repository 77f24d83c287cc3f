"""``run_tool`` (formats) and ``run_process`` (its core in ``sealbox.procs``, shared with the task
runner): the one way a tool is run. Real child processes: a timeout kills the tool's whole
process group, output is kept bounded, key material reaches the child (and only it) through
inherited pipes, the child's environment is the minimal one, failures are classified."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sealbox.errors import FormatRejected, SigningFailed
from sealbox.formats.base import run_tool
from sealbox.keys._handoff import ToolSecrets
from sealbox.procs import OUTPUT_HEAD, OUTPUT_TAIL, child_env, run_process

PY = sys.executable


def _wait_until(condition: Any, what: str, cap: float = 30.0) -> None:
    """Poll ``condition`` (bounded wait; nothing here depends on how fast it comes true)."""
    end = time.monotonic() + cap
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"still waiting after {cap:g} s: {what}")
        time.sleep(0.01)


def _group_members(pgid: int) -> set[int]:
    """Live (not zombie) processes in process group ``pgid``."""
    found: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.add(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def started_pids(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The pid of every child started (each is the leader of its own process group)."""
    pids: list[int] = []
    real = subprocess.Popen

    class SpyPopen(real):  # type: ignore[valid-type,misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            pids.append(self.pid)

    monkeypatch.setattr(subprocess, "Popen", SpyPopen)
    yield pids


# -- timeout: the whole group goes ------------------------------------------------------------------


def test_timeout_kills_the_grandchildren_too(tmp_path: Path, started_pids: list[int]) -> None:
    # The tool starts a grandchild and waits for it forever. The deadline passes while
    # ``started`` waits (up to 60 s) for the grandchild to exist: it is killed for certain.
    script = "sleep 1000 & echo $! > grandchild.pid; wait"
    pid_file = tmp_path / "grandchild.pid"

    def grandchild_exists() -> None:
        _wait_until(lambda: pid_file.is_file() and pid_file.read_text().strip(), "the grandchild", 60)

    with pytest.raises(SigningFailed, match=r"^hanger timed out after 0\.2 s$"):
        run_process(["sh", "-c", script], what="hanger", timeout=0.2, failure=SigningFailed,
                    env=child_env(tmp_path), cwd=tmp_path, started=grandchild_exists)  # fmt: skip
    grandchild = int(pid_file.read_text())
    [leader] = started_pids
    _wait_until(lambda: not _alive(grandchild), "the grandchild to die")
    _wait_until(lambda: not _group_members(leader), "the tool's process group to be gone")


def test_run_tool_timeout_is_a_signing_failure_and_leaves_nothing(
    tmp_path: Path, started_pids: list[int]
) -> None:
    with pytest.raises(SigningFailed, match=r"^osslsigncode timed out after 0\.2 s$"):
        run_tool(["sh", "-c", "sleep 1000 & sleep 1000 & wait"], what="osslsigncode", timeout=0.2,
                 cwd=tmp_path)  # fmt: skip
    [leader] = started_pids
    _wait_until(lambda: not _group_members(leader), "the tool's process group to be gone")


def test_a_tool_holding_its_output_open_past_the_deadline_is_killed(
    tmp_path: Path, started_pids: list[int]
) -> None:
    # The tool itself exits at once, but leaves a grandchild holding its output open.
    with pytest.raises(SigningFailed, match="timed out"):
        run_tool(["sh", "-c", "sleep 1000 & echo started"], what="tool", timeout=1, cwd=tmp_path)
    [leader] = started_pids
    _wait_until(lambda: not _group_members(leader), "the tool's process group to be gone")


# -- output -----------------------------------------------------------------------------------------


def test_output_is_bounded_to_its_head_and_tail(tmp_path: Path) -> None:
    script = (
        "import sys; w = sys.stdout.write; w('FIRST-LINE\\n')\n"
        "for i in range(40000): w(f'filler line {i:08d} ' + 'x' * 40 + '\\n')\n"
        "sys.stdout.flush(); sys.stderr.write('LAST-LINE: error: the reason\\n')"
    )
    res = run_tool([PY, "-c", script], what="chatty", timeout=120, cwd=tmp_path)
    assert res.returncode == 0
    assert len(res.output.encode()) <= OUTPUT_HEAD + OUTPUT_TAIL + 100
    assert res.output.startswith("FIRST-LINE\n")
    assert res.output.endswith("LAST-LINE: error: the reason\n")  # stderr is merged, in order
    assert "bytes of output not kept" in res.output
    assert res.reason == "LAST-LINE: error: the reason"


def test_short_output_is_kept_whole(tmp_path: Path) -> None:
    res = run_tool(["sh", "-c", "echo one; echo two >&2; exit 0"], what="t", timeout=120, cwd=tmp_path)
    assert (res.returncode, res.output) == (0, "one\ntwo\n")


# -- key hand-off and environment -------------------------------------------------------------------

_CHILD_REPORT = """
import json, os, sys
blobs = [open(p, 'rb').read().hex() for p in sys.argv[1:]]
fds = []
for name in os.listdir('/proc/self/fd'):
    try:
        os.fstat(int(name))  # the descriptor listdir used is closed by now
    except OSError:
        continue
    fds.append(int(name))
print(json.dumps({'blobs': blobs, 'fds': sorted(fds), 'env': dict(os.environ), 'cwd': os.getcwd()}))
"""


def test_secrets_reach_the_child_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEALBOX_TEST_CANARY", "must-not-leak")
    leak_r, leak_w = os.pipe()
    os.set_inheritable(leak_r, True)  # even a descriptor marked inheritable stays ours
    try:
        with ToolSecrets(b"the keystore \x00\xff", b"the password\n") as sec:
            handed = sec.fds
            res = run_tool([PY, "-c", _CHILD_REPORT, *sec.paths], what="reporter", timeout=120,
                           cwd=tmp_path, secrets=sec)  # fmt: skip
            # the parent's read ends were closed once the child had started
            assert sec.fds == ()
            for fd in handed:
                with pytest.raises(OSError):
                    os.fstat(fd)
    finally:
        os.close(leak_r)
        os.close(leak_w)
    report = json.loads(res.output)
    assert [bytes.fromhex(b) for b in report["blobs"]] == [b"the keystore \x00\xff", b"the password\n"]
    assert set(report["fds"]) == {0, 1, 2, *handed}, report["fds"]
    assert leak_r not in report["fds"]
    # the minimal environment: nothing of ours, home in the work folder
    assert report["env"] == {"PATH": os.environ["PATH"], "LANG": "C.UTF-8", "HOME": str(tmp_path)}
    assert report["cwd"] == str(tmp_path)


def test_an_explicit_environment_is_all_the_child_gets(tmp_path: Path) -> None:
    env = child_env(tmp_path / "home", "/usr/bin:/bin")
    res = run_tool([PY, "-c", _CHILD_REPORT], what="reporter", timeout=120, cwd=tmp_path, env=env)
    assert json.loads(res.output)["env"] == env


# -- classification of failures ----------------------------------------------------------------------


def _fail(tmp_path: Path, text: str, **kwargs: Any) -> Any:
    script = f"printf '%s\\n' 'Loading...' {text!r} 'Done'; exit 3"
    return run_tool(["sh", "-c", script], what="apksigner", timeout=120, cwd=tmp_path, **kwargs)


def test_malformed_input_markers_make_a_refusal(tmp_path: Path) -> None:
    with pytest.raises(FormatRejected, match=r"^apksigner failed \(exit 3\): .*ApkFormatException: bad"):
        _fail(tmp_path, "ApkFormatException: bad zip", malformed=("ZipFormatException", "ApkFormatException"))


def test_a_malformed_predicate_makes_a_refusal(tmp_path: Path) -> None:
    with pytest.raises(FormatRejected, match=r"^apksigner failed \(exit 3\): Corrupt header error$"):
        _fail(tmp_path, "Corrupt header error", malformed=lambda out: "Corrupt" in out)


def test_other_failures_may_be_retried(tmp_path: Path) -> None:
    with pytest.raises(SigningFailed, match=r"^apksigner failed \(exit 3\): Error: out of memory$") as exc:
        _fail(tmp_path, "Error: out of memory", malformed=("ApkFormatException",))
    assert not isinstance(exc.value, FormatRejected)


def test_unchecked_failures_are_returned(tmp_path: Path) -> None:
    res = _fail(tmp_path, "DOES NOT VERIFY", check=False)
    assert res.returncode == 3
    assert res.output == "Loading...\nDOES NOT VERIFY\nDone\n"


def test_a_tool_that_cannot_start_is_a_signing_failure(tmp_path: Path) -> None:
    with (
        ToolSecrets(b"secret") as sec,
        pytest.raises(SigningFailed, match="cannot run zipalign: No such file"),
    ):
        run_tool([str(tmp_path / "missing")], what="zipalign", timeout=120, cwd=tmp_path, secrets=sec)
