"""Running an external tool: the one way sealbox starts a child process that does work.

Shared by the signers (through :func:`sealbox.formats.base.run_tool`, which adds the key
hand-off and the signing errors) and the task runner, so it imports nothing of either. The
child gets no stdin, only the environment it is given (:func:`child_env`: nothing of ours,
hence no secrets), only the descriptors in ``pass_fds``, and a process group of its own: on a
timeout the whole group is killed (the JVM behind a launcher script, a shell's children), not
just the process that was started. Its output (stdout and stderr merged) is read as it comes
and kept bounded: the first and the last bytes, where tools put their verdict and their reason.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "OUTPUT_HEAD",
    "OUTPUT_TAIL",
    "ToolResult",
    "child_env",
    "kill_group",
    "run_process",
    "tool_reason",
]

#: bytes of a tool's output kept from its start and from its end
OUTPUT_HEAD = 16 * 1024
OUTPUT_TAIL = 48 * 1024
_READ = 64 * 1024


def child_env(home: Path | str = "/nonexistent", path: str | None = None) -> dict[str, str]:
    """The whole environment a tool gets: nothing of ours (no secrets) leaks in."""
    return {"PATH": path or os.environ.get("PATH", os.defpath), "LANG": "C.UTF-8", "HOME": str(home)}


def tool_reason(text: str) -> str:
    """The line of a tool's output that says why it failed (an error or exception line, else
    the last one), at most 300 characters."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    line = next((ln for ln in lines if "Exception" in ln or "rror" in ln), lines[-1] if lines else "")
    return line[:300]


@dataclass(frozen=True)
class ToolResult:
    """How a tool ended: its exit status and its (bounded) output, decoded."""

    returncode: int
    output: str

    @property
    def reason(self) -> str:
        return tool_reason(self.output)


class _Output:
    """The first :data:`OUTPUT_HEAD` and the last :data:`OUTPUT_TAIL` bytes of a stream."""

    def __init__(self) -> None:
        self.head = bytearray()
        self.tail = bytearray()
        self.dropped = 0

    def add(self, chunk: bytes) -> None:
        room = OUTPUT_HEAD - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        self.tail += chunk
        if len(self.tail) > OUTPUT_TAIL:
            cut = len(self.tail) - OUTPUT_TAIL
            del self.tail[:cut]
            self.dropped += cut

    def text(self) -> str:
        gap = f"\n[... {self.dropped} bytes of output not kept ...]\n".encode() if self.dropped else b""
        return bytes(self.head + gap + self.tail).decode(errors="replace")


class _TimedOut(Exception):
    pass


def run_process(
    argv: Sequence[str],
    *,
    what: str,
    timeout: float,
    failure: Callable[[str], Exception],
    env: Mapping[str, str],
    cwd: Path | None = None,
    pass_fds: Sequence[int] = (),
    started: Callable[[], None] | None = None,
) -> ToolResult:
    """Run ``argv`` to its end within ``timeout`` seconds and return how it ended.

    A tool that cannot be started, or is still running (or its output still open) after
    ``timeout``, raises ``failure(message)``; on a timeout or any other way out (an interrupt)
    its whole process group is killed first. ``started`` runs once the child exists (e.g. to
    close the parent's ends of descriptors handed over in ``pass_fds``). A non-zero exit is
    not an error here: the caller decides what it means.
    """
    deadline = time.monotonic() + timeout
    try:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=cwd,
            pass_fds=tuple(pass_fds),
            start_new_session=True,  # its own process group: a timeout kills the whole of it
        )
    except OSError as e:
        raise failure(f"cannot run {what}: {e.strerror or e}") from None
    assert proc.stdout is not None
    output = _Output()
    try:
        if started is not None:
            started()
        _read_until_eof(proc.stdout.fileno(), output, deadline)
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise _TimedOut from None
    except _TimedOut:
        _kill_group(proc)
        raise failure(f"{what} timed out after {timeout:g} s") from None
    except BaseException:
        _kill_group(proc)
        raise
    finally:
        proc.stdout.close()
    return ToolResult(proc.returncode, output.text())


def _read_until_eof(fd: int, output: _Output, deadline: float) -> None:
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _TimedOut
            if not sel.select(left):
                continue
            chunk = os.read(fd, _READ)
            if not chunk:
                return
            output.add(chunk)


def kill_group(pid: int) -> None:
    """SIGKILL the process group led by ``pid`` (started with ``start_new_session``). Call it
    before the leader is reaped: until then its pid, the group's id, cannot have been reused."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    kill_group(proc.pid)
    proc.wait()
