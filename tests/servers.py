"""Test helpers around the real servers (see sealbox.deploy.local)."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from aiohttp import web

from sealbox.deploy.local import BIN, Deployment, ServerProcess, free_port, start_server

__all__ = [
    "BIN",
    "Deployment",
    "ServerProcess",
    "ThreadedApp",
    "env_without_proxy",
    "exec_image",
    "free_port",
    "gpg_verify",
    "refusing_port",
    "start_server",
]


def exec_image(
    argv: str | bytes | Sequence[str | bytes], env: Mapping[str, str] | None
) -> tuple[bytes, bytes]:
    """A child's argv and environment as ``subprocess.Popen(argv, env=env)`` execs it, NUL-separated
    like /proc/PID/cmdline and /proc/PID/environ: known for certain, even of a child that exits
    before anyone could read /proc."""
    args = [argv] if isinstance(argv, str | bytes) else argv
    environ = os.environb if env is None else {os.fsencode(k): os.fsencode(v) for k, v in env.items()}
    return b"".join(os.fsencode(a) + b"\0" for a in args), b"".join(
        k + b"=" + v + b"\0" for k, v in environ.items()
    )


@contextmanager
def refusing_port() -> Iterator[int]:
    """A loopback port that refuses connections while the block runs: bound, so no other
    process can take it meanwhile (as it could a port merely found free), but not listening."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


def gpg_verify(signature: Path, data: Path, public_key: Path) -> subprocess.CompletedProcess[bytes]:
    """Run the real gpg in a throwaway homedir; returns the completed --verify process."""
    import shutil
    import tempfile

    home = tempfile.mkdtemp(prefix="tg")
    try:
        subprocess.run(
            ["gpg", "--homedir", home, "--batch", "--import", str(public_key)],
            capture_output=True,
            check=True,
        )
        return subprocess.run(
            ["gpg", "--homedir", home, "--batch", "--status-fd", "1", "--verify", str(signature), str(data)],
            capture_output=True,
            check=False,
        )
    finally:
        subprocess.run(["gpgconf", "--homedir", home, "--kill", "all"], capture_output=True, check=False)
        shutil.rmtree(home, ignore_errors=True)


def env_without_proxy() -> dict[str, str]:
    env = dict(os.environ)
    for k in list(env):
        if k.lower() in ("http_proxy", "https_proxy", "all_proxy"):
            env.pop(k)
    env["NO_PROXY"] = "127.0.0.1,localhost"
    return env


class ThreadedApp:
    """An aiohttp application serving on loopback from a thread of its own (its own event
    loop), for a stand-in in front of or beside a real server; a context manager."""

    def __init__(self, app: web.Application, ssl_context: ssl.SSLContext | None = None) -> None:
        self.app, self.ssl_context = app, ssl_context
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        runner = web.AppRunner(self.app)
        self.loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", self.port, ssl_context=self.ssl_context)
        self.loop.run_until_complete(site.start())
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(runner.cleanup())
        self.loop.close()

    def __enter__(self) -> ThreadedApp:
        self._thread.start()
        assert self._ready.wait(30), "the stand-in did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)
