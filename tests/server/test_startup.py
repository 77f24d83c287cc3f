"""Start-up: passphrases proven by a test signature, clear refusals, no secret in logs."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.servers import BIN, Deployment, ServerProcess, start_server


def _until(done: Callable[[], bool], cap: float = 60) -> None:
    deadline = time.monotonic() + cap
    while not done():
        assert time.monotonic() < deadline, f"still not so after {cap:g} s"
        time.sleep(0.05)


def test_wrong_passphrase_refuses_to_start(tmp_path: Path) -> None:
    d = Deployment.create(tmp_path / "pp", "dep", ["gpg"])
    wrong = tmp_path / "wrong"
    wrong.write_text("gpg:not-the-passphrase\n")
    sp = start_server(d, wait=False, passphrase_file=wrong)
    rc = sp.proc.wait(60)
    out = sp.log.read_text()
    assert rc == 2
    assert "key 'gpg': wrong passphrase" in out and "not starting" in out
    assert "not-the-passphrase" not in out


def test_missing_passphrase_and_no_terminal(tmp_path: Path) -> None:
    d = Deployment.create(tmp_path / "pp2", "dep", ["gpg"])
    res = subprocess.run(
        [str(BIN / "sealbox"), "serve", "--config", str(d.config)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 2 and "no terminal" in res.stderr


def test_invalid_config_value_is_named(tmp_path: Path) -> None:
    d = Deployment.create(tmp_path / "cfg", "dep", ["gpg"])
    d.config.write_text(d.config.read_text().replace('level = "dep"', 'level = "prod"'))
    res = subprocess.run(
        [
            str(BIN / "sealbox"),
            "serve",
            "--config",
            str(d.config),
            "--passphrase-file",
            str(d.root / "passphrases"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 2 and "server.level" in res.stderr


def test_a_path_in_the_way_is_named(tmp_path: Path) -> None:
    """A file where the store needs a folder: the refusal says which path, not only
    "File exists"."""
    d = Deployment.create(tmp_path / "cfg", "dep", ["gpg"])
    (d.root / "data").mkdir(exist_ok=True)
    blocker = d.root / "data" / "tmp"
    if blocker.is_dir():
        blocker.rmdir()
    blocker.write_text("not a folder\n")
    sp = start_server(d, wait=False)
    assert sp.proc.wait(60) == 2
    out = sp.log.read_text()
    assert f"not starting: File exists: {blocker}" in out, out


def _serve(d: Deployment, *extra: str, pass_fds: tuple[int, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "sealbox"), "serve", "--config", str(d.config), *extra],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        pass_fds=pass_fds,
    )


REFUSALS: dict[str, tuple[Callable[[Deployment], object], list[str]]] = {  # break it, words said
    "config not UTF-8": (
        lambda d: d.config.write_bytes(b"\xff" + d.config.read_bytes()),
        ["sealbox.toml", "not UTF-8"],
    ),
    "key file endless": (
        lambda d: _repoint(d, 'path = "keys/gpg.pem"', 'path = "/dev/zero"'),
        ["key 'gpg'", "/dev/zero holds more than"],
    ),
    "token secret endless": (
        lambda d: _repoint(d, '"secrets/token-secret"', '"/dev/zero"'),
        ["security.token_secret_files", "/dev/zero holds more than"],
    ),
    "gpg public key not a key": (
        lambda d: (d.root / "public/gpg.asc").write_text("not a key\n"),
        ["format 'gpg': public_key", "gpg.asc", "not an ASCII-armoured OpenPGP block"],
    ),
}


def _repoint(d: Deployment, old: str, new: str) -> None:
    text = d.config.read_text()
    assert old in text
    d.config.write_text(text.replace(old, new))


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_start_up_refusal_names_what_is_wrong(tmp_path: Path, case: str) -> None:
    """One refusal line, exit 2, naming the file or the setting; a device is never read to its end
    (/dev/zero as a key took the memory), and no traceback."""
    d = Deployment.create(tmp_path / "dep", "dep", ["gpg"])
    breaks, words = REFUSALS[case]
    breaks(d)
    res = _serve(d, "--passphrase-file", str(d.root / "passphrases"))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    line = res.stderr.strip().splitlines()[-1]  # (after the JSON log lines of what did start)
    assert line.startswith("sealbox: error: not starting: ")
    for w in words:
        assert w in line, line


def test_a_passphrase_source_that_is_not_one_is_named(tmp_path: Path) -> None:
    d = Deployment.create(tmp_path / "dep", "dep", ["gpg"])
    binary = tmp_path / "binary"
    binary.write_bytes(b"gpg:\xff\xfe\n")
    res = _serve(d, "--passphrase-file", str(binary))
    assert res.returncode == 2 and str(binary) in res.stderr and "not UTF-8" in res.stderr, res.stderr
    for fd, why in ((2**31, "not a file descriptor"), (1023, "Bad file descriptor")):
        res = _serve(d, "--passphrase-fd", str(fd))
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert f"--passphrase-fd {fd}: {why}" in res.stderr, res.stderr


def test_passphrases_never_logged(gpg_server: ServerProcess, tmp_path: Path, payload: Path) -> None:
    with gpg_server.client() as c:
        assert c.sign(payload, ["gpg"]).ok
    # The request and job lines are written as the answers go out: wait for them, not on luck.
    gpg_server.wait_log(lambda lines: {"request", "job"} <= {e.get("event") for e in lines})
    log = gpg_server.log.read_text()
    assert '"event":"request"' in log and '"event":"job"' in log
    for secret in gpg_server.deployment.passphrases().values():
        assert secret not in log
    assert gpg_server.deployment.auth[1] not in log


def test_results_survive_restart(tmp_path: Path, payload: Path) -> None:
    d = Deployment.create(tmp_path / "rs", "dep", ["gpg"])
    sp = start_server(d)
    with sp.client() as c:
        assert c.sign(payload, ["gpg"], tmp_path / "a.bin").ok
    assert sp.stop() == 0
    assert '"event":"stopped"' in sp.log.read_text()
    sp2 = start_server(d)
    try:
        with sp2.client() as c:
            out = c.sign(payload, ["gpg"], tmp_path / "b.bin")
        assert out.ok
        jobs = [e for e in sp2.log_lines() if e.get("event") == "job"]
        assert jobs == []  # served from the content store kept on disk, nothing signed again
    finally:
        sp2.stop()


def test_sigterm_finishes_in_flight_jobs(tmp_path: Path) -> None:
    import hashlib
    import ssl

    import httpx

    from sealbox.formats.android import DEFAULT_JAVA_OPTIONS
    from sealbox.samples.android import write_jar

    d = Deployment.create(tmp_path / "drain", "dep", ["jar"])
    # The job's JVM (apksig's, started by the first job) creates this file and waits at start-up
    # until it is gone: the job is in flight for certain when SIGTERM comes, and ends only after
    # the server saw it.
    paused = tmp_path / "jvm-paused"
    pause = ["-XX:+UnlockDiagnosticVMOptions", "-XX:+PauseAtStartup", f"-XX:PauseAtStartupFile={paused}"]
    options = json.dumps([*DEFAULT_JAVA_OPTIONS, *pause])
    d.config.write_text(
        d.config.read_text().replace("[formats.jar]\n", f"[formats.jar]\njava_options = {options}\n")
    )

    def let_start_up_prove() -> None:  # start-up's test signature runs (then stops) such a JVM too
        _until(paused.exists)
        paused.unlink()

    prover = threading.Thread(target=let_start_up_prove, daemon=True)
    prover.start()
    sp = start_server(d)
    prover.join()
    jar = write_jar(tmp_path, "lib.jar", extra_size=4096)
    digest = hashlib.sha1(jar.read_bytes(), usedforsecurity=False).hexdigest()
    try:
        with httpx.Client(verify=ssl.create_default_context(cafile=str(d.ca))) as c:
            r = c.post(
                f"{sp.server.url}/sign/jar",
                data={"sha1": digest, "filename": jar.name, "token": sp.token(), "nonce": ""},
                files={"filedata": (jar.name, jar.read_bytes())},
            )
        assert r.status_code == 202
        _until(paused.exists)  # the job's JVM is running
        sp.proc.send_signal(signal.SIGTERM)
        sp.wait_log(lambda lines: any(e.get("event") == "stopping" for e in lines))
        paused.unlink()  # the job may finish now
        assert sp.proc.wait(60) == 0  # one SIGTERM: a second one would mean "do not wait"
    finally:
        paused.unlink(missing_ok=True)
        sp.stop()
    events = [e.get("event") for e in sp.log_lines()]
    assert events.index("stopping") < events.index("job") < events.index("stopped")
    assert (d.root / "data" / "signed" / "jar" / digest).is_file()
