from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path


def median_time(fn: Callable[[int], object], n: int) -> float:
    times = []
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def random_file(path: Path, size: int) -> Path:
    with path.open("wb") as f:
        left = size
        while left:
            n = min(left, 1 << 24)
            f.write(os.urandom(n))
            left -= n
    return path


@contextmanager
def local_gpg() -> Iterator[tuple[str, Callable[[Path], None]]]:
    """A throwaway GNUPGHOME with an RSA-3072 signing key: the raw-tool baseline."""
    home = tempfile.mkdtemp(prefix="bg")
    env = {**os.environ, "GNUPGHOME": home}
    subprocess.run(
        [
            "gpg",
            "--batch",
            "--pinentry-mode",
            "loopback",
            "--passphrase",
            "",
            "--quick-gen-key",
            "Bench <bench@example.invalid>",
            "rsa3072",
            "sign",
            "never",
        ],
        env=env,
        capture_output=True,
        check=True,
    )

    def sign(path: Path) -> None:
        subprocess.run(
            [
                "gpg",
                "--batch",
                "--yes",
                "--digest-algo",
                "SHA256",
                "--armor",
                "--detach-sign",
                "-o",
                str(path) + ".asc",
                str(path),
            ],
            env=env,
            capture_output=True,
            check=True,
        )

    try:
        yield home, sign
    finally:
        subprocess.run(["gpgconf", "--kill", "all"], env=env, capture_output=True, check=False)
        shutil.rmtree(home, ignore_errors=True)


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def small_file_throughput(hostspec: str, ca: Path, folder: Path, token_file: Path, files: int = 500) -> float:
    """Files per second of ``sealbox sign -j 8 -f gpg`` over ``files`` fresh 1 KiB files in
    ``folder`` (cold CLI start included), against ``hostspec``."""
    from sealbox.deploy.local import BIN

    folder.mkdir()
    for i in range(files):
        random_file(folder / f"f{i:03d}.bin", 1024)
    base = ["-H", hostspec, "-c", str(ca), "-t", str(token_file)]
    t = time.perf_counter()
    cmd = [str(BIN / "sealbox"), "sign", *base, "-j", "8", "-f", "gpg", str(folder)]
    subprocess.run(cmd, check=True, capture_output=True)
    return files / (time.perf_counter() - t)
