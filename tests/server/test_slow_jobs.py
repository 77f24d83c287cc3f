"""A slow job times out with a reason, and meanwhile the server and other formats keep going.

The slow job's tool (osslsigncode, through a wrapper) blocks until the test releases it: "still
running" is a fact the test controls, not a guess about how long something takes.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sealbox.client import SignOutcome
from sealbox.samples.msi import write_msi
from tests.servers import Deployment, ServerProcess, start_server

CAP = 120.0  # generous bound on every wait: a broken server fails the test instead of hanging it

# Stands in for osslsigncode: notes that it started, waits until the test releases it (a cap
# only in case the test died without doing so), then runs the real tool.
BLOCKING_TOOL = """\
#!/bin/sh
[ "$1" = "--version" ] && exec {real} --version  # start-up asks the version: not a job
echo started >> {marks}
i=0
while [ ! -e {release} ] && [ $i -lt 12000 ]; do /bin/sleep 0.05; i=$((i + 1)); done
echo finished >> {marks}
exec {real} "$@"
"""


@contextmanager
def _server_with_blocking_authenticode(
    tmp_path: Path, job_timeout: float | None
) -> Iterator[tuple[ServerProcess, Path]]:
    """A gpg + sha2signcode server whose osslsigncode blocks until ``release`` exists; yields
    it and the tool's marks file (a "started" line per run, a "finished" line when released)."""
    tool, marks, release = tmp_path / "osslsigncode", tmp_path / "marks", tmp_path / "release"
    tool.write_text(BLOCKING_TOOL.format(marks=marks, release=release, real=shutil.which("osslsigncode")))
    tool.chmod(0o755)
    marks.touch()
    d = Deployment.create(tmp_path / "slow", "dep", ["gpg", "sha2signcode"])
    # The tool may run as long as the test holds it: only the job timeout ends a job.
    cfg = d.config.read_text().replace(
        "[formats.sha2signcode]\n", f'[formats.sha2signcode]\nosslsigncode = "{tool}"\ntimeout = 600\n'
    )
    if job_timeout is not None:
        cfg = cfg.replace("[server]\n", f"[server]\njob_timeout = {job_timeout}\n")
    d.config.write_text(cfg)
    sp = start_server(d)
    try:
        yield sp, marks
    finally:
        release.touch()  # before stopping: a blocked tool would hold the server's exit
        sp.stop()


def _until(done: Callable[[], bool]) -> None:
    deadline = time.monotonic() + CAP
    while not done():
        assert time.monotonic() < deadline, f"still not so after {CAP:g} s"
        time.sleep(0.05)


def _sign_in_thread(
    sp: ServerProcess, src: Path, out: Path
) -> tuple[threading.Thread, dict[str, SignOutcome]]:
    result: dict[str, SignOutcome] = {}

    def run() -> None:
        with sp.client(timeout=CAP) as c:
            result["res"] = c.sign(src, ["sha2signcode"], out)

    t = threading.Thread(target=run)
    t.start()
    return t, result


def _lines(marks: Path) -> list[str]:
    return marks.read_text().splitlines()


def test_slow_job_times_out_with_a_reason(tmp_path: Path) -> None:
    with _server_with_blocking_authenticode(tmp_path, job_timeout=2.0) as (sp, marks):
        src = write_msi(tmp_path)
        t, outcome = _sign_in_thread(sp, src, tmp_path / "out" / src.name)
        t.join(CAP)
        assert not t.is_alive()
        res = outcome["res"]
        assert not res.ok and "timed out after 2 s" in (res.error or ""), res.error
        # Answered by the job timeout, not by the tool ending: it is still blocked.
        assert "started" in _lines(marks) and "finished" not in _lines(marks)


def test_other_formats_keep_going_while_a_slow_job_runs(tmp_path: Path) -> None:
    with _server_with_blocking_authenticode(tmp_path, job_timeout=None) as (sp, marks):
        src = write_msi(tmp_path)
        t, outcome = _sign_in_thread(sp, src, tmp_path / "out" / src.name)
        _until(lambda: "started" in _lines(marks))  # the slow job is running now
        with sp.client() as c:
            for i in range(5):
                p = tmp_path / f"quick{i}.txt"
                p.write_text(f"signed while a slow job runs {i}\n" * 5)
                assert c.sign(p, ["gpg"]).ok
        # Not stuck behind the slow job: all signed while it is still running.
        assert "finished" not in _lines(marks)
        assert not [
            e for e in sp.log_lines() if e.get("event") == "job" and e.get("format") == "sha2signcode"
        ]
        assert t.is_alive()
        (tmp_path / "release").touch()
        t.join(CAP)
        assert not t.is_alive() and outcome["res"].ok, outcome["res"].error
