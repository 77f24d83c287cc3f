"""What metrics cost: small-file throughput with ``[metrics] listen`` set vs not (goal: at
least 0.95x), the same 500 x 1 KiB `sealbox sign -j 8` run as ``bench.core``.

The VM's speed drifts from minute to minute (one run in ten can be a third slower), so the
two modes alternate (off, on, on, off, ...), each run on a freshly started server with fresh
files; the medians are compared. The cost of the counting itself, per file, is timed apart:
a figure no drift blurs.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import timeit
from pathlib import Path
from typing import Any

import httpx

from bench._util import small_file_throughput, table
from sealbox.deploy.local import Deployment, ServerProcess, start_server
from sealbox.server.metrics import PrometheusMetrics

FILES = 500
ORDER = ("off", "on", "on", "off") * 2 + ("off", "on")


def _throughput(server: ServerProcess, folder: Path, token_file: Path) -> float:
    return small_file_throughput(server.hostspec, server.deployment.ca, folder, token_file, FILES)


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
    dep = Deployment.create(tmp / "dep", "dep", ["gpg"])
    plain = dep.config.read_text()
    rates: dict[str, list[float]] = {"off": [], "on": []}
    try:
        for n, mode in enumerate(ORDER):
            extra = '\n[metrics]\nlisten = "127.0.0.1:0"\n' if mode == "on" else ""
            dep.config.write_text(plain + extra)
            server = start_server(dep)
            try:
                token_file = tmp / "token"
                token_file.write_text(server.token(duration=3600))
                rates[mode].append(_throughput(server, tmp / f"run{n}", token_file))
                if mode == "on":
                    assert _signed(server) == FILES
            finally:
                server.stop()
    finally:
        dep.config.write_text(plain)
        subprocess.run(["rm", "-rf", str(tmp)], check=False)
    off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
    ratio = on / off
    counting = _counting_us()
    share = counting / (1e6 / off)
    passed = ratio >= 0.95
    print("\n## Metrics on vs off (500 x 1 KiB, `sealbox sign -j 8`, gpg)\n")
    print(
        table(
            [
                (
                    mode,
                    f"{statistics.median(r):.0f} files/s",
                    ", ".join(f"{x:.0f}" for x in r),
                )
                for mode, r in rates.items()
            ]
            + [
                ("on / off", f"{ratio:.3f}", ">= 0.95 " + ("ok" if passed else "MISSED")),
                (
                    "counting per file",
                    f"{counting:.1f} µs",
                    f"{share:.2%} of a file's time at the off median",
                ),
            ],
            ("metrics", "median", "runs, in order"),
        )
    )
    sys.stdout.flush()
    res = {"off_runs": rates["off"], "on_runs": rates["on"], "on_over_off": ratio, "counting_us": counting}
    return res, passed
