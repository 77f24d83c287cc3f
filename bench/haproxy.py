"""What the load balancer costs: small-file throughput through the real HAProxy (TCP mode,
PROXY v2, the shipped config) vs straight to the same replica (goal: at least 0.8x), the
same 500 x 1 KiB `sealbox sign -j 8` run as ``bench.core``.

One server for both, so only the path differs; the two alternate (direct, proxy, proxy,
direct, direct, proxy) against the VM's drift, each run with fresh files; medians compared.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import tomli_w

from bench._util import small_file_throughput, table
from sealbox.deploy.haproxy import HAProxy
from sealbox.deploy.local import Deployment, start_server

FILES = 500
ORDER = ("direct", "proxy", "proxy", "direct", "direct", "proxy")


def run() -> tuple[dict[str, Any], bool]:
    if shutil.which("haproxy") is None:
        print("\n## HAProxy: not installed (scripts/bootstrap.sh installs it); skipped")
        return {}, True
    tmp = Path(tempfile.mkdtemp(prefix="sealbox-bench-haproxy-"))
    dep = Deployment.create(tmp / "dep", "dep", ["gpg"])
    cfg = tomllib.loads(dep.config.read_text())
    cfg["server"]["trusted_proxies"] = ["127.0.0.1/32"]
    dep.config.write_text(tomli_w.dumps(cfg))
    rates: dict[str, list[float]] = {"direct": [], "proxy": []}
    server = start_server(dep)
    haproxy = None
    try:
        haproxy = HAProxy(tmp, [server], dep.ca, check_inter="2s")
        haproxy.wait_up()
        token_file = tmp / "token"
        token_file.write_text(server.token(duration=3600))
        for n, mode in enumerate(ORDER):
            host = server.hostspec if mode == "direct" else haproxy.hostspec
            rates[mode].append(small_file_throughput(host, dep.ca, tmp / f"run{n}", token_file))
    finally:
        if haproxy is not None:
            haproxy.stop()
        server.stop()
        subprocess.run(["rm", "-rf", str(tmp)], check=False)
    direct, proxy = statistics.median(rates["direct"]), statistics.median(rates["proxy"])
    ratio = proxy / direct
    passed = ratio >= 0.8
    print("\n## Through HAProxy vs direct (500 x 1 KiB, `sealbox sign -j 8`, gpg)\n")
    print(
        table(
            [
                (mode, f"{statistics.median(r):.0f} files/s", ", ".join(f"{x:.0f}" for x in r))
                for mode, r in rates.items()
            ]
            + [("proxy / direct", f"{ratio:.3f}", ">= 0.8 " + ("ok" if passed else "MISSED"))],
            ("path", "median", "runs, in order"),
        )
    )
    sys.stdout.flush()
    return {"direct_runs": rates["direct"], "proxy_runs": rates["proxy"], "proxy_over_direct": ratio}, passed
