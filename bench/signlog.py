"""What the signing log costs: small-file throughput with ``[log] enabled`` vs off (goal: at
least 0.9x), the same 500 x 1 KiB `sealbox sign -j 8` run as ``bench.core``.

The VM's speed drifts from minute to minute, so two servers, one of each mode, run side by
side, started once and warmed up, and take turns in adjacent pairs (ABBA), fresh files each
run; the ratio is the median of the per-pair ratios (:func:`bench._util.paired_throughput`, as
``bench.metrics`` measures). The log server's heartbeat tells how many entries one fsync made
durable on average (group commit: concurrent jobs share a flush), and its log is audited
offline (``sealbox log verify``) afterwards: every file of every run has its entry.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import tempfile
import tomllib
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import tomli_w

from bench._util import WARM_UP_FILES, paired_throughput, start_servers, table
from sealbox.deploy.local import BIN, Deployment, ServerProcess

FILES = 500
PAIRS = 8
GOAL = 0.9


def _log_check(server: ServerProcess) -> dict[str, Any]:
    ctx = ssl.create_default_context(cafile=str(server.deployment.ca))
    beat = httpx.get(f"{server.server.url}/__heartbeat__", verify=ctx).json()
    check: dict[str, Any] = beat["checks"]["signing_log"]
    return check


def run() -> tuple[dict[str, Any], bool]:
    tmp = Path(tempfile.mkdtemp(prefix="sealbox-bench-signlog-"))
    deps = {mode: Deployment.create(tmp / mode, "dep", ["gpg"]) for mode in ("off", "on")}
    for mode, dep in deps.items():
        cfg = tomllib.loads(dep.config.read_text())
        cfg["log"].update({"enabled": mode == "on", "dir": str(tmp / f"log-{mode}")})
        dep.config.write_text(tomli_w.dumps(cfg))
    try:
        with ExitStack() as stack:
            servers = start_servers(stack, deps)
            paired = paired_throughput(servers, "off", "on", tmp, PAIRS, FILES)
            check = _log_check(servers["on"])
        done = subprocess.run(  # once the server stopped: its last checkpoint is written
            [
                *(str(BIN / "sealbox"), "log", "verify", str(tmp / "log-on")),
                *("--public", str(deps["on"].public / "signlog.pub"), "--json"),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        report = json.loads(done.stdout)[0]
        audited = done.returncode == 0 and report["entries"] == WARM_UP_FILES + PAIRS * FILES
    finally:
        subprocess.run(["rm", "-rf", str(tmp)], check=False)
    per_flush = check["entries"] / max(1, check["flushes"])
    passed = paired.ratio >= GOAL and audited
    print("\n## Signing log on vs off (500 x 1 KiB, `sealbox sign -j 8`, gpg)\n")
    print(paired.method() + "\n")
    rows = paired.rows(GOAL)
    rows.append(("entries per fsync", f"{per_flush:.1f}", "", "group commit, over every run"))
    rows.append(("offline audit", "every file's entry" if audited else "FAILED", "", "sealbox log verify"))
    print(table(rows, ("signing log", "median", "server CPU", "runs, in order")))
    sys.stdout.flush()
    res = {
        **paired.figures(),
        "entries_per_fsync": per_flush,
        "audited": audited,
    }
    return res, passed
