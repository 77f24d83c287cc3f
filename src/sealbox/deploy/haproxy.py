"""The real HAProxy on loopback in front of local replicas, configured from the shipped
``packaging/haproxy/haproxy.cfg`` (its settings come from the environment): what the pool
test and the proxy benchmark run. A checkout's helper, like :mod:`sealbox.deploy.local`.
"""

from __future__ import annotations

import csv
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from ..client import Server
from .local import ServerProcess, free_port

TEMPLATE = Path(__file__).resolve().parents[3] / "packaging" / "haproxy" / "haproxy.cfg"
BACKEND = "sealbox_replicas"


class HAProxy:
    """``haproxy -db`` (foreground) on the shipped config, in front of ``replicas`` (the
    template's three ``server`` lines; fewer replicas are repeated)."""

    def __init__(
        self, folder: Path, replicas: Sequence[ServerProcess], ca: Path, check_inter: str = "100ms"
    ) -> None:
        self.port = free_port()  # haproxy binds it itself
        # A short path: unix socket names are limited to 107 bytes.
        self.stats_path = Path(tempfile.mkdtemp(prefix="hap")) / "stats.sock"
        env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy")}
        env.update(
            SEALBOX_FRONTEND=f"127.0.0.1:{self.port}",
            SEALBOX_CA=str(ca),
            SEALBOX_HAPROXY_STATS=str(self.stats_path),
            SEALBOX_CHECK_INTER=check_inter,
        )
        for i in range(3):
            env[f"SEALBOX_REPLICA_{i + 1}"] = replicas[i % len(replicas)].hostspec
        text = TEMPLATE.read_text()
        if os.geteuid() != 0:  # only root may chroot and change user: run as who we are
            drop = ("chroot ", "user ", "group ")
            text = "".join(line for line in text.splitlines(True) if not line.strip().startswith(drop))
        config = folder / "haproxy.cfg"
        config.write_text(text)
        self.log = folder / "haproxy.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                ["haproxy", "-db", "-f", str(config)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    @property
    def server(self) -> Server:
        return Server("127.0.0.1", self.port)

    @property
    def hostspec(self) -> str:
        return f"127.0.0.1:{self.port}"

    def servers(self) -> dict[str, dict[str, str]]:
        """``show stat`` on the admin socket: each replica's row (status, check_status, ...)."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"haproxy exited {self.proc.returncode}: {self.log.read_text()}")
        if not self.stats_path.exists():
            return {}
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.stats_path))
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        rows = csv.DictReader(data.decode().removeprefix("# ").splitlines())
        return {r["svname"]: r for r in rows if r["pxname"] == BACKEND and r["svname"] != "BACKEND"}

    def state(self, name: str) -> str:
        """ "UP L7OK", "DOWN L7STS" (the heartbeat answered an error), ... or "unknown"."""
        row = self.servers().get(name)
        return f"{row['status']} {row['check_status']}" if row else "unknown"

    def wait_up(self, timeout: float = 60) -> None:
        """Until every replica passed its health check: a heartbeat over TLS after a PROXY
        v2 LOCAL header."""
        deadline = time.monotonic() + timeout
        while not (rows := self.servers()) or any(
            f"{r['status']} {r['check_status']}" != "UP L7OK" for r in rows.values()
        ):
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"replicas not UP in haproxy after {timeout:g} s: {self.log.read_text()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.stats_path.parent, ignore_errors=True)
