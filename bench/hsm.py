"""What a key in an HSM costs: small-file gpg throughput with the key in a SoftHSM token vs
the same deployment kind with a key file (goal: at least 0.7x), the same 500 x 1 KiB
`sealbox sign -j 8` run as ``bench.core``; and the time of one signature through the server
of each format, in-process (gpg, mar, emevoucher, widevine: the token signs the digest) and
tools (sha2signcode: osslsigncode through OpenSSL's pkcs11 engine; jar and apk:
jarsigner / apksigner through SunPKCS11), key in the token vs key file (goal: at most 1.5x).

The VM's speed drifts from minute to minute, so the two modes alternate (file, hsm, hsm,
file, ...), each run on a freshly started server with fresh files; the medians are compared.
For the tool formats both servers run side by side and each fresh input goes to one, then the
other. The cost of one RSA-3072 signature in each backend, in this process, is timed apart.
"""

from __future__ import annotations

import hashlib
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench import _formats_inputs as inputs
from bench._util import small_file_throughput, table
from sealbox.deploy.local import Deployment, ServerProcess, start_server
from sealbox.keys import PassphraseSource, load_key
from sealbox.server.config import load_config

FILES = 500
ORDER = ("file", "hsm", "hsm", "file") * 2 + ("file", "hsm")
GOAL = 0.7
#: formats timed through the server, in-process ones and tools: (wire name, typical input,
#: samples per key kind)
TOOL_CASES = (
    ("gpg", inputs.blob(1024 * 1024, ".bin"), 21),
    ("mar", inputs.mar(), 21),
    ("emevoucher", inputs.blob(4096, ".bin"), 21),
    ("widevine", inputs.pe, 21),
    ("sha2signcode", inputs.pe, 21),
    ("jar", inputs.jar(), 9),
    ("apk", inputs.apk(), 9),
)
TOOL_GOAL = 1.5


def _throughput(server: ServerProcess, folder: Path, token_file: Path) -> float:
    return small_file_throughput(server.hostspec, server.deployment.ca, folder, token_file, FILES)


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


def _tool_formats(tmp: Path) -> dict[str, dict[str, float]]:
    """Median seconds of one ``SigningClient.sign`` per tool format, key file vs key in the token,
    the two servers side by side (each fresh input goes to one, then to the other, in turns)."""
    fmts = [fmt for fmt, _, _ in TOOL_CASES]
    deps = {
        "file": Deployment.create(tmp / "tools-file", "dep", fmts),
        "hsm": Deployment.create(tmp / "tools-hsm", "dep", fmts, hsm=True),
    }
    out: dict[str, dict[str, float]] = {}
    with ExitStack() as stack:
        servers = {mode: start_server(dep) for mode, dep in deps.items()}
        for sp in servers.values():
            stack.callback(sp.stop)
        clients = {mode: stack.enter_context(sp.client(timeout=300)) for mode, sp in servers.items()}
        for fmt, make, n in TOOL_CASES:
            folder = tmp / f"in-{fmt}"
            folder.mkdir()
            times: dict[str, list[float]] = {"file": [], "hsm": []}
            for i in range(n + 1):  # the first of each is a warm-up, not timed
                src = make(folder, i)
                for mode in ("file", "hsm") if i % 2 else ("hsm", "file"):
                    t = time.perf_counter()
                    res = clients[mode].sign(src, [fmt], folder / mode / src.name)
                    if not res.ok:
                        raise RuntimeError(f"{fmt} ({mode}): {res.error}")
                    if i:
                        times[mode].append(time.perf_counter() - t)
            out[fmt] = {mode: statistics.median(t) for mode, t in times.items()}
    return out


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
        tools = _tool_formats(tmp)
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
    tool_ratios = {fmt: t["hsm"] / t["file"] for fmt, t in tools.items()}
    tools_passed = all(r <= TOOL_GOAL for r in tool_ratios.values())
    print("\n## Per format, key in SoftHSM vs key file (one signature through the server)\n")
    print(
        table(
            [
                (
                    f"`{fmt}`",
                    f"{t['file'] * 1000:.1f}",
                    f"{t['hsm'] * 1000:.1f}",
                    f"{tool_ratios[fmt]:.2f}",
                    f"<= {TOOL_GOAL} " + ("ok" if tool_ratios[fmt] <= TOOL_GOAL else "MISSED"),
                )
                for fmt, t in tools.items()
            ],
            ("format", "key file (ms)", "key in SoftHSM (ms)", "hsm / file", "goal"),
        )
    )
    sys.stdout.flush()
    res = {
        "file_runs": rates["file"],
        "hsm_runs": rates["hsm"],
        "hsm_over_file": ratio,
        "signature_ms": sig_ms,
        "tool_formats_s": tools,
        "tool_formats_hsm_over_file": tool_ratios,
    }
    return res, passed and tools_passed
