"""Local deployments and servers on loopback: what `make demo`, the benchmarks and the tests run.

``Deployment.create`` runs ``sealbox init --dev``; ``start_server`` runs ``sealbox serve`` in a
child process on a port the system picks when it binds, and waits until it listens.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..client import Server, SigningClient, request_token
from ..wire import host_port
from .dev import init_dev

BIN = Path(sys.executable).parent


def free_port() -> int:
    """A port free now; another process may take it before it is used (servers bind port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Deployment:
    root: Path
    level: str

    @classmethod
    def create(
        cls, root: Path, level: str = "dep", formats: Sequence[str] | None = None, hsm: bool = False
    ) -> Deployment:
        """``sealbox init --dev``; with ``hsm`` the formats' keys (all but macOS's) are made in
        a SoftHSM token, by the command in a child process (SoftHSM takes one config per
        process, and this process may make several deployments)."""
        listen = f"127.0.0.1:{free_port()}"
        if not hsm:
            init_dev(root, level, listen, list(formats) if formats else None)
            return cls(root, level)
        argv = [
            str(BIN / "sealbox"),
            "init",
            "--dev",
            str(root),
            "--level",
            level,
            "--listen",
            listen,
            "--hsm",
        ]
        for fmt in formats or ():
            argv += ["--format", fmt]
        res = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"sealbox init --hsm failed: {res.stderr.strip() or res.stdout.strip()}")
        return cls(root, level)

    @property
    def config(self) -> Path:
        return self.root / "sealbox.toml"

    @property
    def ca(self) -> Path:
        return self.root / "tls" / "ca.pem"

    @property
    def public(self) -> Path:
        return self.root / "public"

    @property
    def auth(self) -> tuple[str, str]:
        user, _, password = (self.root / "token-auth").read_text().partition(":")
        return user, password

    def passphrases(self) -> dict[str, str]:
        out = {}
        for line in (self.root / "passphrases").read_text().splitlines():
            name, _, value = line.partition(":")
            out[name] = value
        return out


@dataclass
class ServerProcess:
    deployment: Deployment
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    extra: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"

    @property
    def server(self) -> Server:
        return Server(self.host, self.port)

    @property
    def hostspec(self) -> str:
        return host_port(self.host, self.port)

    def token(self, ip: str | None = None, duration: int = 600) -> str:
        """A token bound to ``ip`` (default: the address the server is reached at)."""
        user, password = self.deployment.auth
        return request_token(self.server, self.deployment.ca, user, password, ip or self.host, duration)

    def client(self, **kw: Any) -> SigningClient:
        return SigningClient([self.server], self.deployment.ca, self.token(), **kw)

    def log_lines(self) -> list[dict[str, object]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"raw": line})
        return out

    def wait_log(
        self, done: Callable[[list[dict[str, object]]], object], timeout: float = 60
    ) -> list[dict[str, object]]:
        """Poll the log until ``done(lines)`` is true; the lines. A wait on a fact, not a sleep."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.log_lines()
            if done(lines):
                return lines
            if time.monotonic() > deadline:
                raise AssertionError(f"not in the server log after {timeout:g} s: {self.log.read_text()}")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(
    deployment: Deployment,
    port: int | None = None,
    extra: Sequence[str] = (),
    wait: bool = True,
    passphrase_file: Path | None = None,
    host: str = "127.0.0.1",
) -> ServerProcess:
    """Run ``sealbox serve`` on ``host`` (an IPv6 address without brackets); with ``wait``,
    return once it listens. Without a ``port`` it binds port 0 and reports the port it got in
    its "listening" log line."""
    port = port or 0
    log = deployment.root / f"server-{port or 'any'}-{time.monotonic_ns()}.log"
    args = [
        str(BIN / "sealbox"),
        "serve",
        "--config",
        str(deployment.config),
        "--listen",
        host_port(host, port),
        "--passphrase-file",
        str(passphrase_file or deployment.root / "passphrases"),
        *extra,
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    sp = ServerProcess(deployment, port, proc, log, list(extra), host)
    if wait:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited {proc.returncode}: {log.read_text()}")
            for line in log.read_text(errors="replace").splitlines(keepends=True):
                if '"listening"' in line and line.endswith("\n"):  # a whole line
                    entry = json.loads(line)
                    if entry.get("event") == "listening":
                        sp.port = int(entry["port"])
                        return sp
            time.sleep(0.05)
        sp.stop()
        raise RuntimeError(f"server did not start: {log.read_text()}")
    return sp
