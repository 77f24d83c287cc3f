"""Run the benchmarks and print a Markdown table; raw figures go to bench/results/latest.json.

.venv/bin/python -m bench            # everything (about 3 minutes)
.venv/bin/python -m bench core       # server/client/gpg figures only
.venv/bin/python -m bench formats    # per-format figures only
.venv/bin/python -m bench formats macho mar   # ... of these formats (wire names or row labels)
.venv/bin/python -m bench metrics    # small-file throughput with metrics on vs off
.venv/bin/python -m bench haproxy    # small-file throughput through HAProxy vs direct
.venv/bin/python -m bench hsm        # small-file gpg throughput, key in SoftHSM vs key file
.venv/bin/python -m bench signlog    # small-file throughput with the signing log on vs off
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from bench import core, formats, haproxy, hsm, metrics, signlog

RESULTS = Path(__file__).parent / "results"


BENCHES = ("core", "formats", "metrics", "haproxy", "hsm", "signlog")


def main(argv: list[str]) -> int:
    which = [a for a in argv[1:] if a in BENCHES] or list(BENCHES)
    only = [a for a in argv[1:] if a not in BENCHES]  # formats' cases
    RESULTS.mkdir(exist_ok=True)
    out: dict[str, object] = {"when": time.strftime("%Y-%m-%d %H:%M:%S")}
    ok = True
    if "core" in which:
        res, passed = core.run()
        out["core"], ok = res, ok and passed
    if "formats" in which:
        out["formats"] = formats.run(only)
    if "metrics" in which:
        res, passed = metrics.run()
        out["metrics"], ok = res, ok and passed
    if "haproxy" in which:
        res, passed = haproxy.run()
        out["haproxy"], ok = res, ok and passed
    if "hsm" in which:
        res, passed = hsm.run()
        out["hsm"], ok = res, ok and passed
    if "signlog" in which:
        res, passed = signlog.run()
        out["signlog"], ok = res, ok and passed
    (RESULTS / "latest.json").write_text(json.dumps(out, indent=2))
    print(f"\nraw figures: {RESULTS / 'latest.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
