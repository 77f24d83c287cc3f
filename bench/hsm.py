"""What a key in an HSM costs: small-file gpg throughput with the key in a SoftHSM token vs
the same deployment kind with a key file (goal: at least 0.7x), the same 500 x 1 KiB
`sealbox sign -j 8` run as ``bench.core``.

The VM's speed drifts from minute to minute, so the two modes alternate (file, hsm, hsm,
file, ...), each run on a freshly started server with fresh files; the medians are compared.
The cost of one RSA-3072 signature in each backend, in this process, is timed apart.
"""

from __future__ import annotations

import hashlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._util import random_file, table
from sealbox.config import load_config
from sealbox.deploy.local import BIN, Deployment, ServerProcess, start_server
from sealbox.keys import PassphraseSource, load_key

FILES = 500
ORDER = ("file", "hsm", "hsm", "file") * 2 + ("file", "hsm")
GOAL = 0.7


def _throughput(server: ServerProcess, folder: Path, token_file: Path) -> float:
    folder.mkdir()
    for i in range(FILES):
        random_file(folder / f"f{i:03d}.bin", 1024)
    base = ["-H", server.hostspec, "-c", str(server.deployment.ca), "-t", str(token_file)]
    t = time.perf_counter()
    cmd = [str(BIN / "sealbox"), "sign", *base, "-j", "8", "-f", "gpg", str(folder)]
    subprocess.run(cmd, check=True, capture_output=True)
    return FILES / (time.perf_counter() - t)


def _backend(server: ServerProcess) -> str:
    return next(str(x["backend"]) for x in server.log_lines() if x.get("event") == "key_unlocked")


def _signature_ms(dep: Deployment, n: int = 200) -> float:
    """Median milliseconds of one gpg-key signature of a digest, in this process."""
    cfg = load_config(dep.config)
    key = load_key(cfg.key_spec("gpg"), PassphraseSource.from_file(dep.root / "passphrases").get("gpg"))
    digest = hashlib.sha256(b"bench").digest()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        key.sign_digest(digest, "sha256", "pkcs1v15")
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def run() -> tuple[dict[str, Any], bool]:
    tmp = Path(tempfile.mkdtemp(prefix="sealbox-bench-hsm-"))
    deps = {
        "file": Deployment.create(tmp / "file", "dep", ["gpg"]),
        "hsm": Deployment.create(tmp / "hsm", "dep", ["gpg"], hsm=True),
    }
    rates: dict[str, list[float]] = {"file": [], "hsm": []}
    try:
        for n, mode in enumerate(ORDER):
            server = start_server(deps[mode])
            try:
                assert _backend(server) == ("pkcs11" if mode == "hsm" else "file")
                token_file = tmp / "token"
                token_file.write_text(server.token(duration=3600))
                rates[mode].append(_throughput(server, tmp / f"run{n}", token_file))
            finally:
                server.stop()
        sig_ms = {mode: _signature_ms(dep) for mode, dep in deps.items()}
    finally:
        subprocess.run(["rm", "-rf", str(tmp)], check=False)
    file_rate, hsm_rate = statistics.median(rates["file"]), statistics.median(rates["hsm"])
    ratio = hsm_rate / file_rate
    passed = ratio >= GOAL
    print("\n## gpg key in SoftHSM vs key file (500 x 1 KiB, `sealbox sign -j 8`)\n")
    print(
        table(
            [
                (
                    mode,
                    f"{statistics.median(r):.0f} files/s",
                    f"{sig_ms[mode]:.2f} ms",
                    ", ".join(f"{x:.0f}" for x in r),
                )
                for mode, r in rates.items()
            ]
            + [("hsm / file", f"{ratio:.3f}", "", f">= {GOAL} " + ("ok" if passed else "MISSED"))],
            ("key", "median", "one RSA-3072 signature", "runs, in order"),
        )
    )
    sys.stdout.flush()
    res = {
        "file_runs": rates["file"],
        "hsm_runs": rates["hsm"],
        "hsm_over_file": ratio,
        "signature_ms": sig_ms,
    }
    return res, passed
