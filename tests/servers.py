"""Test helpers around the real servers (see sealbox.deploy.local)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from sealbox.deploy.local import BIN, Deployment, ServerProcess, free_port, start_server

__all__ = [
    "BIN",
    "Deployment",
    "ServerProcess",
    "env_without_proxy",
    "free_port",
    "gpg_verify",
    "start_server",
]


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
