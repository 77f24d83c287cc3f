"""A real registry for the container image tests: Debian's docker-registry (distribution 2.8)
on loopback, plain HTTP, optionally asking for credentials (``auth`` config), and skopeo to
push test images into it."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from sealbox.samples.sigstore import write_oci_layout
from tests.servers import BIN, ServerProcess, env_without_proxy, free_port


def registry_binary() -> str:
    listed = subprocess.run(["dpkg", "-L", "docker-registry"], capture_output=True, text=True, check=False)
    for line in listed.stdout.splitlines():
        if line.endswith("/bin/docker-registry"):
            return line
    found = shutil.which("docker-registry")
    if found is None:
        pytest.fail("docker-registry is not installed (scripts/bootstrap.sh installs it)")
    return found


@dataclass
class Registry:
    port: int
    dir: Path
    #: a containers auth file with a login that may push (a registry that asks for one)
    authfile: Path | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def push(self, repo: str, content: bytes) -> str:
        """Push a tiny image built here as ``repo:1``; its manifest digest."""
        work = self.dir / f"img-{time.monotonic_ns()}"
        work.mkdir()
        layout = write_oci_layout(work, "1", content)
        dest = f"docker://{self.host}/{repo}:1"
        login = ["--dest-authfile", str(self.authfile)] if self.authfile else []
        skopeo("copy", "--dest-tls-verify=false", *login, f"oci:{layout}:1", dest, cwd=work, policy=None)
        index = json.loads((layout / "index.json").read_text())
        return str(index["manifests"][0]["digest"])

    def url(self, repo: str, what: str) -> str:
        return f"http://{self.host}/v2/{repo}/{what}"


def skopeo(*args: str, cwd: Path, policy: Path | None) -> subprocess.CompletedProcess[str]:
    argv = ["skopeo", "--policy", str(policy)] if policy else ["skopeo", "--insecure-policy"]
    res = subprocess.run(
        [*argv, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env_without_proxy(),
        timeout=120,
        check=False,
    )
    if policy is None and res.returncode != 0:
        raise AssertionError(f"skopeo {args[0]} failed: {res.stderr}")
    return res


@contextlib.contextmanager
def run_registry(root: Path, auth: str = "", authfile: Path | None = None) -> Iterator[Registry]:
    """A registry storing under ``root``; ``auth``: its ``auth:`` config section (YAML, indented
    two spaces), ``authfile`` the login that pushes test images into it."""
    port = free_port()
    config = root / "config.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
        f"    rootdirectory: {root / 'storage'}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n" + (f"auth:\n{auth}" if auth else "")
    )
    log = (root / "registry.log").open("wb")
    proc = subprocess.Popen(
        [registry_binary(), "serve", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30  # a cap: poll /v2/ until the registry answers
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"docker-registry exited: {(root / 'registry.log').read_text()}")
            try:
                # 200, or 401 from a registry that asks for credentials: it serves
                if httpx.get(f"http://127.0.0.1:{port}/v2/", timeout=2).status_code in (200, 401):
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("docker-registry did not answer on /v2/ within 30 s")
            time.sleep(0.05)
        yield Registry(port, root, authfile)
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def sign_image_argv(server: ServerProcess, tmp: Path) -> list[str]:
    """``sealbox sign-image`` for ``server`` (a token in ``tmp``), plain HTTP to the registry,
    a JSON summary; the images and other options follow."""
    token = tmp / "token"
    token.write_text(server.token())
    base = [str(BIN / "sealbox"), "sign-image", "-H", server.hostspec, "-c", str(server.deployment.ca)]
    return [*base, "-t", str(token), "--insecure-registry", "--json"]
