"""While the server signs with external tools, no passphrase may show in a child's argv or environment."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import psutil

from sealbox.samples import android, macos
from sealbox.samples.msi import write_msi
from tests.servers import Deployment, start_server


def test_children_never_see_passphrases(tmp_path: Path) -> None:
    d = Deployment.create(tmp_path / "dep", "dep", ["sha2signcode", "jar", "focus-jar", "dmg", "gpg"])
    secrets = [s.encode() for s in d.passphrases().values()] + [d.auth[1].encode()]
    # osslsigncode may finish before any poll of /proc sees it: a wrapper records for certain
    # the argv and environment the server starts it with, then runs the real one.
    images = tmp_path / "osslsigncode-runs"
    images.mkdir()
    wrapper = tmp_path / "osslsigncode"
    wrapper.write_text(
        "#!/bin/sh\n"
        f"/bin/cat /proc/$$/cmdline > {images}/$$.cmdline\n"
        f"/bin/cat /proc/$$/environ > {images}/$$.environ\n"
        f'exec {shutil.which("osslsigncode")} "$@"\n'
    )
    wrapper.chmod(0o755)
    d.config.write_text(
        d.config.read_text().replace(
            "[formats.sha2signcode]\n", f'[formats.sha2signcode]\nosslsigncode = "{wrapper}"\n'
        )
    )
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
                ("sha2signcode", write_msi(tmp_path, "setup.msi")),  # MSI: the kind osslsigncode signs
                ("jar", android.write_apk(tmp_path, target_sdk=29)),  # classic names: v1-valid APKs
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
    runs = sorted(images.iterdir())
    assert runs, "osslsigncode never ran"
    for image in runs:
        assert not [s for s in secrets if s in image.read_bytes()], image.name
    tools = " ".join(seen.values())
    # The watcher really saw the JVM tools run (so the check above could have failed).
    assert "java" in tools, tools
