"""While the server signs with external tools, no passphrase may show in a child's argv or environment."""

from __future__ import annotations

import threading
from pathlib import Path

import psutil

from sealbox.samples import android, macos, pe
from tests.servers import Deployment, start_server


def test_children_never_see_passphrases(tmp_path: Path) -> None:
    d = Deployment.create(tmp_path / "dep", "dep", ["sha2signcode", "jar", "focus-jar", "dmg", "gpg"])
    secrets = [s.encode() for s in d.passphrases().values()] + [d.auth[1].encode()]
    sp = start_server(d)
    seen: dict[int, str] = {}
    leaks: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        parent = psutil.Process(sp.proc.pid)
        while not stop.is_set():
            for child in parent.children(recursive=True):
                try:
                    cmdline = Path(f"/proc/{child.pid}/cmdline").read_bytes()
                    environ = Path(f"/proc/{child.pid}/environ").read_bytes()
                except OSError:
                    continue
                seen[child.pid] = cmdline.split(b"\0")[0].decode(errors="replace")
                for s in secrets:
                    if s in cmdline or s in environ:
                        leaks.append(f"{seen[child.pid]} (pid {child.pid})")

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with sp.client(timeout=120) as c:
            for fmt, src in [
                ("sha2signcode", pe.write_pe(tmp_path)),
                ("jar", android.write_apk(tmp_path)),
                ("focus-jar", android.write_jar(tmp_path)),
                ("dmg", macos.write_app_tarball(tmp_path)),
            ]:
                res = c.sign(src, [fmt], tmp_path / "out" / src.name)
                assert res.ok, res.error
    finally:
        stop.set()
        watcher.join(10)
        sp.stop()
    assert not leaks, leaks
    tools = " ".join(seen.values())
    # The watcher really saw the tools run (so the check above could have failed).
    assert "osslsigncode" in tools and "java" in tools, tools
