"""What metrics cost: small-file throughput with ``[metrics] listen`` set vs not (goal: at
least 0.95x), the same 500 x 1 KiB `sealbox sign -j 8` run as ``bench.core``.

The VM's speed drifts from minute to minute by more than metrics could cost, so two servers,
one of each mode, run side by side, started once and warmed up, and take turns in adjacent
pairs (ABBA: off, on, on, off, ...), fresh files each run; the ratio is the median of the
per-pair ratios, so drift between pairs cancels. The server's CPU time per file (its process
and signing workers) is a second measure; the cost of the counting itself, per file, is timed
apart: a figure no drift blurs.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import timeit
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

from bench._util import WARM_UP_FILES, paired_throughput, start_servers, table
from sealbox.deploy.local import Deployment, ServerProcess
from sealbox.server.metrics import PrometheusMetrics

FILES = 500
PAIRS = 10
GOAL = 0.95


def _signed(server: ServerProcess) -> float:
    """The scraped count of gpg signatures: the metrics saw every file."""
    port = next(int(str(x["port"])) for x in server.log_lines() if x.get("event") == "metrics_listening")
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", trust_env=False).text
    line = next(x for x in text.splitlines() if x.startswith('sealbox_signatures_total{format="gpg"'))
    return float(line.rsplit(" ", 1)[1])


def _counting_us() -> float:
    """Microseconds of metrics work per small file: its upload and its job counted."""
    m = PrometheusMetrics("dep", ["gpg"])
    n = 20000

    def count() -> None:
        m.upload("gpg", 1024)
        m.job("gpg", "signed", 0.004)

    return timeit.timeit(count, number=n) / n * 1e6


def run() -> tuple[dict[str, Any], bool]:
    tmp = Path(tempfile.mkdtemp(prefix="sealbox-bench-metrics-"))
    deps = {mode: Deployment.create(tmp / mode, "dep", ["gpg"]) for mode in ("off", "on")}
    with deps["on"].config.open("a") as f:
        f.write('\n[metrics]\nlisten = "127.0.0.1:0"\n')
    try:
        with ExitStack() as stack:
            servers = start_servers(stack, deps)
            paired = paired_throughput(servers, "off", "on", tmp, PAIRS, FILES)
            # the metrics saw every file: the warm-up's and each run's
            assert _signed(servers["on"]) == WARM_UP_FILES + PAIRS * FILES
    finally:
        subprocess.run(["rm", "-rf", str(tmp)], check=False)
    counting = _counting_us()
    share = counting / (1e6 / statistics.median(paired.rates["off"]))
    passed = paired.ratio >= GOAL
    print("\n## Metrics on vs off (500 x 1 KiB, `sealbox sign -j 8`, gpg)\n")
    print(paired.method() + "\n")
    rows = paired.rows(GOAL)
    rows.append(
        ("counting per file", f"{counting:.1f} µs", f"{share:.2%} of a file's time at the off median", "")
    )
    print(table(rows, ("metrics", "median", "server CPU", "runs, in order")))
    sys.stdout.flush()
    res = {
        **paired.figures(),
        "counting_us": counting,
    }
    return res, passed
