"""``make demo``: dev deployments for every cert level, one server each, every format signed
and checked by its independent verifier, then a signing task over a small release.

Everything lives in ./demo (ignored by git) and is made anew on each run.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..client import detached_suffix
from ..errors import SealboxError
from ..formats import all_formats, signer_class
from .local import Deployment, ServerProcess, start_server

LEVELS = ("dep", "nightly", "release")
#: levels whose deployment keeps its keys in an HSM, as production would
HSM_LEVELS = ("release",)
console = Console(width=None if sys.stdout.isatty() else 150)


@dataclass
class Row:
    level: str
    fmt: str
    file: str
    verifier: str
    ok: bool
    seconds: float
    note: str = ""


def _inputs() -> dict[str, Callable[[Path], Path]]:
    from ..samples import android, linuxpkg, macos, mar, pe, sigstore, windows

    def text(d: Path) -> Path:
        p = d / "SHA256SUMS"
        p.write_text("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855  empty.txt\n")
        return p

    def voucher(d: Path) -> Path:
        p = d / "voucher.bin"
        p.write_bytes(b"EME voucher payload " * 50)
        return p

    return {
        "gpg": text,
        "sha2signcode": pe.write_pe,
        "sha2signcodestub": lambda d: pe.write_pe(d, "stub-installer.exe"),
        "sha2signcode-v2": lambda d: pe.write_dll(d, "xul.dll"),
        "sha2signcodestub-v2": lambda d: pe.write_pe(d, "stub-v2.exe"),
        "signcode": lambda d: pe.write_pe(d, "legacy.exe"),
        "osslsigncode": lambda d: pe.write_pe(d, "legacy2.exe"),
        # more rows of one wire name: "name (what)"; Authenticode tells the kind by the bytes
        "sha2signcode (msi)": lambda d: windows.write_wixl_msi(d, "setup.msi"),
        "sha2signcode (cab)": lambda d: windows.write_cab(d, "files.cab"),
        "sha2signcode (cat)": lambda d: windows.write_cat(d, "files.cat"),
        "sha2signcode (msix)": lambda d: windows.write_appx(d, "app.msix"),
        "sha2signcode (ps1)": lambda d: windows.write_ps1(d, "tool.ps1"),
        "mar": lambda d: mar.write_mar(d, "update.mar", channel="firefox-mozilla-release", size=256 * 1024),
        "mar_sha384": lambda d: mar.write_mar(
            d, "update384.mar", channel="firefox-mozilla-release", size=256 * 1024
        ),
        # the classic names sign APKs v1 only: Android accepts that for target SDK < 30 only
        "jar": lambda d: android.write_apk(d, "legacy.apk", target_sdk=29),
        "focus-jar": lambda d: android.write_jar(d, "focus.jar"),
        "apk": android.write_apk,
        "focus-apk": lambda d: android.write_apk(d, "focus.apk", package="org.sealbox.focus"),
        "emevoucher": voucher,
        "widevine": lambda d: pe.write_pe(d, "plugin.exe"),
        "widevine_blessed": lambda d: pe.write_pe(d, "plugin-container.exe"),
        "dmg": macos.write_app_tarball,
        "macho": lambda d: macos.write_macho(d, "ninja"),
        # the payload `sealbox sign-image` builds for an image (registry push: docs/formats/container.md)
        "sigstore": sigstore.write_payload,
        "rpm": linuxpkg.write_rpm,
        "deb": linuxpkg.write_deb,
        # a repository's Release: its InRelease, and its Release.gpg
        "apt-inrelease": linuxpkg.write_release,
        "apt-release-gpg": linuxpkg.write_release,
    }


def _sign_and_verify(server: ServerProcess, fmt: str, make: Callable[[Path], Path], work: Path) -> Row:
    cls = signer_class(fmt)
    src = make(work)
    out = work / "signed" / src.name
    started = time.monotonic()
    with server.client(timeout=120) as client:
        res = client.sign(src, [fmt], out)
    seconds = time.monotonic() - started
    verifier = _short(cls.verifier.split(";")[0].split(" (")[0])
    if not res.ok:
        return Row(server.deployment.level, fmt, src.name, verifier, False, seconds, res.error or "")
    suffix = detached_suffix(fmt)
    try:
        if suffix:
            how = cls.verify(fmt, out.with_name(out.name + suffix), out, server.deployment.public)
        else:
            how = cls.verify(fmt, out, None, server.deployment.public)
    except SealboxError as e:
        return Row(server.deployment.level, fmt, src.name, verifier, False, seconds, str(e))
    return Row(server.deployment.level, fmt, src.name + suffix, _short(how), True, seconds)


def _short(command: str) -> str:
    """The tool and its sub-command of each verifier step: 'apksigner verify + zipalign -c'."""
    steps = [part.split() for part in command.replace(" && ", " + ").split(" + ")]
    return " + ".join(" ".join(words[:2]) for words in steps if words)


def _cross_level(servers: dict[str, ServerProcess], work: Path) -> Row:
    """A nightly gpg signature must not verify against the release key."""
    src = work / "cross.txt"
    src.write_text("signed by nightly, checked with the release key\n")
    with servers["nightly"].client() as client:
        res = client.sign(src, ["gpg"])
    if not res.ok:
        return Row("nightly", "gpg", src.name, "gpg --verify", False, 0, res.error or "")
    try:
        signer_class("gpg").verify(
            "gpg", src.with_name(src.name + ".asc"), src, servers["release"].deployment.public
        )
    except SealboxError:
        return Row(
            "nightly",
            "gpg",
            src.name + ".asc",
            "gpg --verify with the RELEASE key",
            True,
            0,
            "rejected, as it must be",
        )
    return Row(
        "nightly",
        "gpg",
        src.name + ".asc",
        "gpg --verify with the RELEASE key",
        False,
        0,
        "a nightly signature verified against the release key!",
    )


def run(root: Path) -> int:
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    console.print(f"[bold]sealbox demo[/] in {root}")
    servers: dict[str, ServerProcess] = {}
    rows: list[Row] = []
    try:
        for level in LEVELS:
            started = time.monotonic()
            # release signs as production would: its keys in an HSM (a SoftHSM token here)
            dep = Deployment.create(root / level, level, hsm=level in HSM_LEVELS)
            servers[level] = start_server(dep)
            where = ", keys in a SoftHSM token (hsm/)" if level in HSM_LEVELS else ""
            console.print(
                f"  {level:8} server on https://127.0.0.1:{servers[level].port} "
                f"(deployment {dep.root}{where}, ready in {time.monotonic() - started:.1f} s)"
            )
        inputs = _inputs()
        for level in LEVELS:
            served = [f for f in all_formats() if f in (root / level / "sealbox.toml").read_text()]
            for fmt in served:
                for row in (k for k in inputs if k.partition(" (")[0] == fmt):
                    work = Path(tempfile.mkdtemp(prefix=f"{fmt}-", dir=root / level))
                    rows.append(_sign_and_verify(servers[level], fmt, inputs[row], work))
        rows.append(_cross_level(servers, root))
        _print(rows, _key_places(root))
        task_ok = _task(root, servers)
    finally:
        for sp in servers.values():
            sp.stop()
    failed = [r for r in rows if not r.ok]
    if failed or not task_ok:
        console.print(
            f"[bold red]demo FAILED[/]: {len(failed)} signature check(s) failed"
            + ("" if task_ok else ", the signing task failed")
        )
        return 1
    console.print(f"[bold green]demo passed[/]: {len(rows)} signatures checked by independent verifiers")
    return 0


def _key_places(root: Path) -> dict[tuple[str, str], str]:
    """(level, format) -> where its key lives: "HSM" (a PKCS#11 token) or "file"."""
    out = {}
    for level in LEVELS:
        cfg = tomllib.loads((root / level / "sealbox.toml").read_text())
        for fmt, section in cfg["formats"].items():
            kind = cfg["keys"].get(section.get("key"), {}).get("kind")
            out[(level, fmt)] = "HSM" if kind == "pkcs11" else "file"
    return out


def _print(rows: list[Row], keys: dict[tuple[str, str], str]) -> None:
    table = Table(title="signed through sealbox, checked by independent verifiers")
    for col in ("level", "format", "key", "file", "verifier", "result", "time"):
        table.add_column(col)
    for r in rows:
        result = "[green]ok[/]" if r.ok else "[red]FAILED[/]"
        if r.note:
            result += f" {r.note}"
        key = keys.get((r.level, r.fmt), "")
        table.add_row(r.level, r.fmt, key, r.file, r.verifier, result, f"{r.seconds * 1000:.0f} ms")
    console.print(table)
    console.print(
        f"key: HSM = generated in and signing inside a SoftHSM token via PKCS#11 ({', '.join(HSM_LEVELS)}); "
        "file = an encrypted key file (macOS, whose library has no PKCS#11, and the other levels)"
    )


def _task(root: Path, servers: dict[str, ServerProcess]) -> bool:
    from . import taskdev as task_demo

    return task_demo.run_demo(
        root / "task",
        {lvl: sp.deployment.root for lvl, sp in servers.items()},
        {lvl: [sp.hostspec] for lvl, sp in servers.items()},
        console,
    )


def main() -> None:
    sys.exit(run(Path.cwd() / "demo"))


if __name__ == "__main__":
    main()
