from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sealbox.deploy.local import Deployment, ServerProcess


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
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    elapsed = time.perf_counter() - t
    if done.returncode != 0:
        raise RuntimeError(f"sealbox sign exited {done.returncode}: {(done.stderr or done.stdout)[-2000:]}")
    return files / elapsed


def _process_tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by ``pid`` and its live children (the signing
    workers), from ``/proc``."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:  # gone meanwhile
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state is field 3
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        todo += [int(c) for c in children]
    return total


@dataclass
class Paired:
    """Small-file throughput of two warm servers (``base`` and ``test``) in ABBA order."""

    base: str
    test: str
    #: files/s per run, by mode, in the order run
    rates: dict[str, list[float]]
    #: server CPU (server + signing workers) per file, ms, by mode, in the order run
    cpu_ms: dict[str, list[float]]
    #: the 1-minute load average before and after the runs (other work on the machine)
    load: tuple[float, float]

    @property
    def ratios(self) -> list[float]:
        """test / base of each adjacent pair: both runs within seconds of each other."""
        return [t / b for b, t in zip(self.rates[self.base], self.rates[self.test], strict=True)]

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)

    @property
    def spread(self) -> tuple[float, float]:
        """First and third quartile of the pair ratios: wide when the machine was loaded."""
        q1, _, q3 = statistics.quantiles(self.ratios, n=4)
        return q1, q3

    @property
    def cpu_ratio(self) -> float:
        """Median over pairs of the server CPU per file, test / base."""
        pairs = zip(self.cpu_ms[self.base], self.cpu_ms[self.test], strict=True)
        return statistics.median(t / b for b, t in pairs)

    def method(self) -> str:
        return (
            f"method: both servers started once, warmed up, then {len(self.ratios)} adjacent pairs "
            f"in ABBA order ({self.base}, {self.test}, {self.test}, {self.base}, ...), fresh files "
            "each run; the ratio is the median of the per-pair ratios (drift between pairs cancels). "
            "Second measure: the server's CPU time (its process and signing workers, /proc) per "
            "file. No instruction counts: `perf stat -e instructions` is not supported on this "
            "VM (no PMU) and callgrind slows a server 50-fold. "
            f"Load average {self.load[0]:.1f} before, {self.load[1]:.1f} after; pair ratios' "
            f"quartiles {self.spread[0]:.3f} .. {self.spread[1]:.3f}"
            + (" (wide: a loaded machine; the CPU figure drifts less)." if self._wide else ".")
        )

    @property
    def _wide(self) -> bool:
        q1, q3 = self.spread
        return q3 - q1 > 0.1

    def figures(self) -> dict[str, Any]:
        """The raw figures for ``bench/results/latest.json``, keyed by the modes' names."""
        return {
            f"{self.base}_runs": self.rates[self.base],
            f"{self.test}_runs": self.rates[self.test],
            "pair_ratios": self.ratios,
            f"{self.test}_over_{self.base}": self.ratio,
            "cpu_ms_per_file": self.cpu_ms,
            f"cpu_{self.test}_over_{self.base}": self.cpu_ratio,
        }

    def rows(self, goal: float) -> list[tuple[str, ...]]:
        """Table rows: each mode's median and runs, the pair ratios against ``goal`` (the
        least test / base ratio), the CPU per file."""
        verdict = f">= {goal} " + ("ok" if self.ratio >= goal else "MISSED")
        out: list[tuple[str, ...]] = [
            (
                mode,
                f"{statistics.median(self.rates[mode]):.0f} files/s",
                f"{statistics.median(self.cpu_ms[mode]):.2f} ms CPU/file",
                ", ".join(f"{x:.0f}" for x in self.rates[mode]),
            )
            for mode in (self.base, self.test)
        ]
        out.append(
            (
                f"{self.test} / {self.base}",
                f"{self.ratio:.3f} (median of pairs)",
                f"CPU/file {self.cpu_ratio:.3f}",
                verdict + "; pairs: " + ", ".join(f"{x:.3f}" for x in self.ratios),
            )
        )
        return out


def start_servers(stack: ExitStack, deps: Mapping[str, Deployment]) -> dict[str, ServerProcess]:
    """A server per deployment, by mode; each stopped when ``stack`` closes, also when a later
    one fails to start."""
    from sealbox.deploy.local import start_server

    servers: dict[str, ServerProcess] = {}
    for mode, dep in deps.items():
        servers[mode] = start_server(dep)
        stack.callback(servers[mode].stop)
    return servers


#: files in :func:`paired_throughput`'s untimed warm-up run on each server
WARM_UP_FILES = 50


def paired_throughput(
    servers: Mapping[str, ServerProcess], base: str, test: str, folder: Path, pairs: int, files: int = 500
) -> Paired:
    """Run :func:`small_file_throughput` on two already started servers in ABBA order, ``pairs``
    pairs after one untimed warm-up run each; CPU per file read around each run."""
    tokens = {}
    for mode, sp in servers.items():
        tokens[mode] = folder / f"token-{mode}"
        tokens[mode].write_text(sp.token(duration=3600))
        small_file_throughput(
            sp.hostspec, sp.deployment.ca, folder / f"warm-{mode}", tokens[mode], WARM_UP_FILES
        )
    rates: dict[str, list[float]] = {base: [], test: []}
    cpu: dict[str, list[float]] = {base: [], test: []}
    load = os.getloadavg()[0]
    for i in range(pairs):
        for mode in (base, test) if i % 2 == 0 else (test, base):
            sp = servers[mode]
            before = _process_tree_cpu(sp.proc.pid)
            run = folder / f"run{i}-{mode}"
            rates[mode].append(small_file_throughput(sp.hostspec, sp.deployment.ca, run, tokens[mode], files))
            cpu[mode].append((_process_tree_cpu(sp.proc.pid) - before) / files * 1000)
            shutil.rmtree(run, ignore_errors=True)
    return Paired(base, test, rates, cpu, (load, os.getloadavg()[0]))
