"""What the signing log costs: small-file throughput with ``[log] enabled`` vs off (goal: at
least 0.9x), the same 500 x 1 KiB `sealbox sign -j 8` run as ``bench.core``.

The VM's speed drifts from minute to minute, so the two modes alternate (off, on, on, off,
...), each run on a freshly started server with fresh files; the medians are compared. Each
"on" run also reports how many entries one fsync made durable on average (group commit:
concurrent jobs share a flush), read from the server's heartbeat, and the log is audited
offline (``sealbox log verify``) after the run: every file has its entry.
"""

from __future__ import annotations

import json
import ssl
import statistics
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import httpx
import tomli_w

from bench._util import small_file_throughput, table
from sealbox.deploy.local import BIN, Deployment, ServerProcess, start_server

FILES = 500
ORDER = ("off", "on", "on", "off") * 2 + ("off", "on")


def _throughput(server: ServerProcess, folder: Path, token_file: Path) -> float:
    return small_file_throughput(server.hostspec, server.deployment.ca, folder, token_file, FILES)


def _log_check(server: ServerProcess) -> dict[str, Any]:
    ctx = ssl.create_default_context(cafile=str(server.deployment.ca))
    beat = httpx.get(f"{server.server.url}/__heartbeat__", verify=ctx).json()
    check: dict[str, Any] = beat["checks"]["signing_log"]
    return check


def run() -> tuple[dict[str, Any], bool]:
    tmp = Path(tempfile.mkdtemp(prefix="sealbox-bench-signlog-"))
    dep = Deployment.create(tmp / "dep", "dep", ["gpg"])
    cfg = tomllib.loads(dep.config.read_text())
    rates: dict[str, list[float]] = {"off": [], "on": []}
    per_flush: list[float] = []
    audited = True
    try:
        for n, mode in enumerate(ORDER):
            log_dir = tmp / f"log{n}"  # a fresh log per run: its entries are this run's files
            cfg["log"].update({"enabled": mode == "on", "dir": str(log_dir)})
            dep.config.write_text(tomli_w.dumps(cfg))
            server = start_server(dep)
            try:
                token_file = tmp / "token"
                token_file.write_text(server.token(duration=3600))
                rates[mode].append(_throughput(server, tmp / f"run{n}", token_file))
                if mode == "on":
                    check = _log_check(server)
                    per_flush.append(check["entries"] / max(1, check["flushes"]))
            finally:
                server.stop()
            if mode == "on":
                done = subprocess.run(
                    [
                        *(str(BIN / "sealbox"), "log", "verify", str(log_dir)),
                        *("--public", str(dep.public / "signlog.pub"), "--json"),
                    ],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                report = json.loads(done.stdout)[0]
                audited = audited and done.returncode == 0 and report["entries"] == FILES
    finally:
        subprocess.run(["rm", "-rf", str(tmp)], check=False)
    off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
    ratio = on / off
    passed = ratio >= 0.9 and audited
    print("\n## Signing log on vs off (500 x 1 KiB, `sealbox sign -j 8`, gpg)\n")
    print(
        table(
            [
                (mode, f"{statistics.median(r):.0f} files/s", ", ".join(f"{x:.0f}" for x in r))
                for mode, r in rates.items()
            ]
            + [
                ("on / off", f"{ratio:.3f}", ">= 0.9 " + ("ok" if ratio >= 0.9 else "MISSED")),
                (
                    "entries per fsync",
                    f"{statistics.median(per_flush):.1f}",
                    ", ".join(f"{x:.1f}" for x in per_flush),
                ),
                ("offline audit", "every file's entry" if audited else "FAILED", "sealbox log verify"),
            ],
            ("signing log", "median", "runs, in order"),
        )
    )
    sys.stdout.flush()
    res = {
        "off_runs": rates["off"],
        "on_runs": rates["on"],
        "on_over_off": ratio,
        "entries_per_fsync": per_flush,
        "audited": audited,
    }
    return res, passed
