"""The task runner keeps a task's declared ``jar`` but sends an ``.apk`` under ``apk``: its output
keeps v1+v2+v3 (the classic name signs v1 only, for clients that zipalign afterwards)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from sealbox.formats.android import AndroidSigner
from sealbox.samples.android import write_apk, write_jar
from tests.servers import ServerProcess

from .helpers import Worker, entry, run, write_task, write_upstream

pytestmark = pytest.mark.skipif(AndroidSigner.available() is not None, reason=str(AndroidSigner.available()))


def _upstream(tmp_path: Path, worker: Worker) -> Path:
    work = tmp_path / "work"
    files: dict[str, bytes | Path] = {
        "public/build/app.apk": write_apk(tmp_path),
        "public/build/lib.jar": write_jar(tmp_path),
    }
    write_upstream(work, "Build1", files, worker.dir / "keys/build.key")
    write_task(
        work, [entry("Build1", ["public/build/app.apk", "public/build/lib.jar"], ["jar"])], level="release"
    )
    return work


def test_apk_is_sent_as_apk_and_keeps_v2_v3(
    tmp_path: Path, worker: Worker, servers: dict[str, ServerProcess]
) -> None:
    work, out = _upstream(tmp_path, worker), tmp_path / "out"
    res = run(worker.config, work, out)
    assert res.code == 0, res.text
    assert any("public/build/app.apk [jar]" in ln and "jar: sent as apk" in ln for ln in res.lines), res.text
    apk = out / "public/build/app.apk"
    verified = subprocess.run(
        ["apksigner", "verify", "--verbose", "--min-sdk-version", "18", str(apk)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    for scheme in ("v1", "v2", "v3"):
        assert re.search(rf"^Verified using {scheme} scheme .*: true$", verified.stdout, re.M), (
            verified.stdout
        )
    assert subprocess.run(["zipalign", "-c", "-p", "4", str(apk)], check=False).returncode == 0
    public = servers["release"].deployment.public
    AndroidSigner.verify("apk", apk, None, public)
    # a JAR under the same declared format still travels as jar (jarsigner)
    assert "jarsigner -verify" in AndroidSigner.verify("jar", out / "public/build/lib.jar", None, public)


def test_level_without_the_apk_name_is_refused_before_signing(tmp_path: Path, worker: Worker) -> None:
    def no_apk(data: dict[str, Any]) -> None:
        data["levels"]["release"]["formats"].remove("apk")

    config = worker.variant("no-apk", no_apk)
    res = run(config, _upstream(tmp_path, worker), tmp_path / "out")
    assert res.code == 3, res.text
    assert "jar on an .apk is sent as apk" in res.first and "does not serve" in res.first, res.text
    assert not (tmp_path / "out" / "public/build/app.apk").exists()
