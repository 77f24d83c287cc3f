"""The real signtool 4.0.1 client from PyPI against `sealbox serve`."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.servers import BIN, ServerProcess, env_without_proxy, gpg_verify


def run_signtool(
    server: ServerProcess, tmp: Path, fmt: str, src: Path, dest: Path
) -> subprocess.CompletedProcess[str]:
    token = tmp / "token"
    token.write_text(server.token())
    return subprocess.run(
        [
            str(BIN / "signtool"),
            "-v",
            "-H",
            server.hostspec,
            "-c",
            str(server.deployment.ca),
            "-t",
            str(token),
            "-n",
            str(tmp / "nonce"),
            "-f",
            fmt,
            "-o",
            str(dest),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env_without_proxy(),
        check=False,
    )


def test_signtool_signs_gpg_and_gpg_verifies(
    gpg_server: ServerProcess, tmp_path: Path, payload: Path
) -> None:
    dest = tmp_path / "payload.bin.asc"
    res = run_signtool(gpg_server, tmp_path, "gpg", payload, dest)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "nonce").read_text() == "UNUSED"
    check = gpg_verify(dest, payload, gpg_server.deployment.public / "gpg.asc")
    assert check.returncode == 0 and b"[GNUPG:] VALIDSIG" in check.stdout
    # SHA-256 or stronger: OpenPGP hash algorithm 8 (SHA256) in the VALIDSIG status line.
    validsig = next(line for line in check.stdout.decode().splitlines() if "VALIDSIG" in line)
    assert validsig.split()[9] in ("8", "9", "10")
    # A second run is served from the server's content store with a single GET.
    dest.unlink()
    again = run_signtool(gpg_server, tmp_path, "gpg", payload, dest)
    assert again.returncode == 0 and dest.is_file()


def test_signtool_fails_on_bad_token(gpg_server: ServerProcess, tmp_path: Path, payload: Path) -> None:
    token = tmp_path / "token"
    token.write_text("127.0.0.1:1:2:abc!forged")
    res = subprocess.run(
        [
            str(BIN / "signtool"),
            "-H",
            gpg_server.hostspec,
            "-c",
            str(gpg_server.deployment.ca),
            "-t",
            str(token),
            "-n",
            str(tmp_path / "nonce"),
            "-f",
            "gpg",
            "-o",
            str(tmp_path / "x.asc"),
            str(payload),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env_without_proxy(),
        check=False,
    )
    assert res.returncode != 0
    assert not (tmp_path / "x.asc").exists()
