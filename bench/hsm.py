"""What a key in an HSM costs: small-file gpg throughput with the key in a SoftHSM token vs
the same deployment kind with a key file (goal: at least 0.7x), the same 500 x 1 KiB
`sealbox sign -j 8` run as ``bench.core``; and the time of one signature through the server
of each format, in-process (gpg, mar, emevoucher, widevine: the token signs the digest) and
tools (sha2signcode: osslsigncode through OpenSSL's pkcs11 engine; jar and apk:
jarsigner / apksigner through SunPKCS11), key in the token vs key file (goal: at most 1.5x).

The VM's speed drifts from minute to minute, so both servers are started once, warmed up, and
take turns in adjacent pairs (ABBA: file, hsm, hsm, file, ...), fresh files each run; the ratio
is the median of the per-pair ratios, and the servers' CPU time per file a second measure. For
the tool formats each fresh input goes to one server, then the other. The cost of one RSA-3072
signature is timed apart in a forked process as a signing worker makes it: through the key
interface (``sign_digest``) with each backend, and SoftHSM's own ``C_Sign`` through
python-pkcs11 on the same session (what the interface adds is the difference).
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pkcs11

from bench import _formats_inputs as inputs
from bench._util import paired_throughput, start_servers, table
from sealbox.deploy.local import Deployment, ServerProcess
from sealbox.keys import PassphraseSource, load_key
from sealbox.keys._signing import DIGEST_INFO
from sealbox.server.config import load_config

FILES = 500
PAIRS = 8
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


def _backend(server: ServerProcess) -> str:
    return next(str(x["backend"]) for x in server.log_lines() if x.get("event") == "key_unlocked")


def _median_ms(fns: dict[str, Callable[[], object]], n: int) -> dict[str, float]:
    """Median ms of each of ``fns``, called in turns (one call each, ``n`` times): drift hits all."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(n + 1):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            if i:  # the first round warms up
                times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) * 1000 for name, ts in times.items()}


def _in_worker(dep: Deployment, n: int, out: Connection) -> None:
    """In a forked process, as a signing worker: ms of ``sign_digest``, and of raw ``C_Sign``
    on the key's session (PKCS#11 keys only)."""
    from sealbox import keys
    from sealbox.keys import _pkcs11

    cfg = load_config(dep.config)
    spec = cfg.key_spec("gpg")
    pin = PassphraseSource.from_file(dep.root / "passphrases").get("gpg")
    key = load_key(spec, pin)
    digest = hashlib.sha256(b"bench").digest()
    pid = os.fork()  # the key unlocked in the parent, as the server does before forking its workers
    if pid:
        os.waitpid(pid, 0)
        return
    try:
        keys.after_fork()
        fns: dict[str, Callable[[], object]] = {
            "interface": lambda: key.sign_digest(digest, "sha256", "pkcs1v15")
        }
        if isinstance(key, _pkcs11.Pkcs11Key):
            key.sign_digest(digest, "sha256", "pkcs1v15")  # this process's session, opened
            session = key._module.session(key.spec.token, pin, key.name)
            priv = session.get_key(object_class=pkcs11.ObjectClass.PRIVATE_KEY, **key.spec.search())
            data = DIGEST_INFO["sha256"] + digest
            fns["raw"] = lambda: priv.sign(data, mechanism=pkcs11.Mechanism.RSA_PKCS)
        out.send(_median_ms(fns, n))
    finally:
        os._exit(0)


def _signature_ms(dep: Deployment, n: int = 300) -> dict[str, float]:
    """Median milliseconds of one gpg-key signature of a digest in a forked worker: through the
    key interface and, for a token key, SoftHSM's raw ``C_Sign``. In a child process: SoftHSM
    reads one config per process."""
    ctx = multiprocessing.get_context("spawn")
    here, there = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_in_worker, args=(dep, n, there))
    proc.start()
    there.close()  # ours: the child's death then ends recv() (EOFError) instead of a hang
    result: dict[str, float] = here.recv()
    proc.join()
    return result


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
        servers = start_servers(stack, deps)
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
    try:
        with ExitStack() as stack:
            servers = start_servers(stack, deps)
            for mode, sp in servers.items():
                assert _backend(sp) == ("pkcs11" if mode == "hsm" else "file")
            paired = paired_throughput(servers, "file", "hsm", tmp, PAIRS, FILES)
        sig_ms = {mode: _signature_ms(dep) for mode, dep in deps.items()}
        tools = _tool_formats(tmp)
    finally:
        subprocess.run(["rm", "-rf", str(tmp)], check=False)
    ratio = paired.ratio
    passed = ratio >= GOAL
    print("\n## gpg key in SoftHSM vs key file (500 x 1 KiB, `sealbox sign -j 8`)\n")
    print(paired.method() + "\n")
    print(
        table(
            paired.rows(GOAL),
            ("key", "median", "server CPU", "runs, in order"),
        )
    )
    print("\nOne RSA-3072 signature in a forked signing worker (median ms): ", end="")
    print(
        f"key file {sig_ms['file']['interface']:.3f} through the key interface; SoftHSM "
        f"{sig_ms['hsm']['interface']:.3f} through the key interface, {sig_ms['hsm']['raw']:.3f} "
        "raw C_Sign (python-pkcs11, same session)"
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
        **paired.figures(),
        "signature_ms": sig_ms,
        "tool_formats_s": tools,
        "tool_formats_hsm_over_file": tool_ratios,
    }
    return res, passed and tools_passed
