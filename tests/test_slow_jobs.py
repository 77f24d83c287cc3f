"""A slow job times out with a reason, and meanwhile the server and other formats keep going."""

from __future__ import annotations

import re
import sys
import threading
import time
from pathlib import Path

from sealbox.samples.macos import write_app_tarball
from tests.servers import Deployment, start_server


def test_slow_job_times_out_without_blocking_others(tmp_path: Path) -> None:
    d = Deployment.create(tmp_path / "slow", "dep", ["gpg", "dmg"])
    cfg = d.config.read_text()
    slow = (
        f'signer_command = ["{sys.executable}", "-c", "import time; time.sleep(8)", "{{key}}"]\ntimeout = 6'
    )
    cfg = re.sub(r"signer_command = \[[^\]]*\]", slow, cfg)
    cfg = cfg.replace("[server]\n", "[server]\njob_timeout = 2.0\n")
    d.config.write_text(cfg)
    sp = start_server(d)
    try:
        app = write_app_tarball(tmp_path)
        outcome: dict[str, object] = {}

        def sign_slow() -> None:
            with sp.client(timeout=60) as c:
                started = time.monotonic()
                outcome["res"] = c.sign(app, ["dmg"], tmp_path / "out" / app.name)
                outcome["seconds"] = time.monotonic() - started

        t = threading.Thread(target=sign_slow)
        t.start()
        time.sleep(0.5)  # the dmg job is running now
        quick = []
        with sp.client() as c:
            for i in range(5):
                p = tmp_path / f"quick{i}.txt"
                p.write_text(f"signed while a slow job runs {i}\n" * 5)
                started = time.monotonic()
                assert c.sign(p, ["gpg"]).ok
                quick.append(time.monotonic() - started)
        t.join(60)
        res = outcome["res"]
        assert max(quick) < 1.5, quick  # not stuck behind the slow job
        assert not res.ok and "timed out after 2 s" in (res.error or ""), res.error  # type: ignore[attr-defined]
        assert outcome["seconds"] < 20  # type: ignore[operator]
    finally:
        sp.stop()
