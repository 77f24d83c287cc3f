"""The tool formats with their keys in a SoftHSM token (``sealbox init --dev --hsm``), through a
real server: every Authenticode name (osslsigncode through OpenSSL's pkcs11 engine; the -v2
names timestamped by a local TSA), jar, focus-jar, apk and focus-apk (apksig in a long-lived
JVM, whose signatures the server makes in the token) sign there and pass the same independent
verifiers as with key files.
The PIN stays out of every tool's argv and environment (osslsigncode's recorded by a wrapper,
each JVM's while it waits at start-up for its pause file to go), the log and the data dir; the
deployment has no private key file but the TLS key and the signing log's."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from cryptography.hazmat.primitives.serialization import pkcs12

from sealbox.formats.android import DEFAULT_JAVA_OPTIONS, TRUSTSTORE_PASSWORD
from tests.formats.test_authenticode import LocalTSA
from tests.formats.test_formats_e2e import GOOD, _verify
from tests.keys.test_hsm_server import _INSPECT, _pin
from tests.servers import Deployment, ServerProcess, start_server

AUTHENTICODE = [
    "sha2signcode",
    "sha2signcodestub",
    "sha2signcode-v2",
    "sha2signcodestub-v2",
    "signcode",
    "osslsigncode",
]
ANDROID = ["jar", "focus-jar", "apk", "focus-apk"]
TOOL_FORMATS = AUTHENTICODE + ANDROID
CAP = 120.0  # bound of every wait
#: a tool's environment: the minimal one, the module's variable, and what bash adds itself (the
#: apksigner launcher is a bash script)
TOOL_ENV = {b"PATH", b"LANG", b"HOME", b"SOFTHSM2_CONF", b"PWD", b"OLDPWD", b"SHLVL", b"_"}


class JvmRecorder:
    """Records the argv and environment of every JVM the server starts. Each is started with
    ``-XX:+PauseAtStartup``: it creates the pause file and waits until it is removed, which
    happens here once its image is recorded, so no JVM runs unrecorded."""

    def __init__(self, pause: Path) -> None:
        self.pause = pause
        self.option = f"XX:PauseAtStartupFile={pause}".encode()
        self.seen: list[tuple[bytes, bytes]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _paused(self) -> list[tuple[bytes, bytes]]:
        """The images of the processes waiting on the pause file (the JVM, and for apksigner
        the launcher script that started it)."""
        found = []
        for proc in psutil.process_iter():
            try:
                cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
                if any(arg.endswith(self.option) for arg in cmdline.split(b"\0")):
                    found.append((cmdline, Path(f"/proc/{proc.pid}/environ").read_bytes()))
            except OSError:
                continue
        return found

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            if self.pause.exists():
                paused = self._paused()
                if paused:  # else the file appeared before the JVM's /proc entry was readable
                    self.seen.extend(paused)
                    self.pause.unlink()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(CAP)
        self.pause.unlink(missing_ok=True)


@dataclass
class Hsm:
    server: ServerProcess
    tsa: LocalTSA
    jvms: JvmRecorder
    tool_runs: Path


def _add_options(text: str, fmt: str, lines: list[str]) -> str:
    section = f"[formats.{fmt}]\n"
    assert section in text
    return text.replace(section, section + "".join(f"{line}\n" for line in lines))


@pytest.fixture(scope="module")
def hsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hsm]:
    root = tmp_path_factory.mktemp("hsm-tools")
    tsa = LocalTSA(root / "tsa")
    d = Deployment.create(root / "dep", "release", TOOL_FORMATS, hsm=True)
    cfg = tomllib.loads(d.config.read_text())
    assert {cfg["keys"][cfg["formats"][f]["key"]]["kind"] for f in TOOL_FORMATS} == {"pkcs11"}
    (d.public / "sha2signcode-tsa-ca.pem").write_bytes(tsa.ca.cert_pem())  # a private TSA's root
    tool_runs = root / "tool-runs"
    tool_runs.mkdir()
    wrapper = root / "osslsigncode"
    wrapper.write_text(
        "#!/bin/sh\n"
        f"/bin/cat /proc/$$/cmdline > {tool_runs}/$$.cmdline\n"
        f"/bin/cat /proc/$$/environ > {tool_runs}/$$.environ\n"
        f'exec {shutil.which("osslsigncode")} "$@"\n'
    )
    wrapper.chmod(0o755)
    pause = root / "jvm-paused"
    java_options = json.dumps(
        [
            *DEFAULT_JAVA_OPTIONS,
            "-XX:+UnlockDiagnosticVMOptions",
            "-XX:+PauseAtStartup",
            f"-XX:PauseAtStartupFile={pause}",
        ]
    )
    text = d.config.read_text()
    for fmt in AUTHENTICODE:
        text = _add_options(text, fmt, [f'osslsigncode = "{wrapper}"'])
    for fmt in ("sha2signcode-v2", "sha2signcodestub-v2"):
        text = _add_options(text, fmt, [f'timestamp_url = "{tsa.url}"'])
    for fmt in ANDROID:
        text = _add_options(text, fmt, [f"java_options = {java_options}"])
    d.config.write_text(text)
    jvms = JvmRecorder(pause)  # start-up proves each JVM format's hand-off: its JVMs wait too
    try:
        sp = start_server(d)
        try:
            yield Hsm(sp, tsa, jvms, tool_runs)
        finally:
            sp.stop()
    finally:
        jvms.stop()
        tsa.close()


@pytest.mark.parametrize("fmt", TOOL_FORMATS)
def test_every_tool_format_signs_with_its_token_key(hsm: Hsm, tmp_path: Path, fmt: str) -> None:
    with hsm.server.client(timeout=CAP) as c:
        for make in GOOD[fmt]:
            before = hsm.tsa.requests
            src = make(tmp_path)
            out = tmp_path / "out" / src.name
            res = c.sign(src, [fmt], out)
            assert res.ok, res.error
            _verify(hsm.server, fmt, src, out)  # the same independent verifier as with key files
            # the -v2 names timestamp (verified above against the TSA's root), the others do not
            assert hsm.tsa.requests == before + (fmt.endswith("-v2"))


def test_no_pin_in_tool_argv_environ_logs_or_data(hsm: Hsm, tmp_path: Path) -> None:
    d = hsm.server.deployment
    pin = _pin(d).encode()
    with hsm.server.client(timeout=CAP) as c:
        for fmt in ("sha2signcode", "jar", "apk"):
            folder = tmp_path / fmt
            folder.mkdir()
            src = GOOD[fmt][0](folder)
            assert c.sign(src, [fmt], folder / "out" / src.name).ok
    osslsigncode = [
        (run.read_bytes(), run.with_suffix(".environ").read_bytes())
        for run in sorted(hsm.tool_runs.glob("*.cmdline"))
    ]
    jvms = list(hsm.jvms.seen)
    assert osslsigncode and jvms
    # one long-lived JVM drives apksig; it never reaches the token: the server signs its digests
    assert any(b"SealboxApkSigner" in cmd for cmd, _ in jvms)
    for cmdline, environ in [*osslsigncode, *jvms]:
        assert pin not in cmdline and pin not in environ, cmdline
        assert b"pin-value" not in cmdline
        names = {kv.split(b"=", 1)[0] for kv in environ.split(b"\0") if kv}
        assert names <= TOOL_ENV, (cmdline, names)
        if b"SealboxApkSigner" in cmdline:
            assert b"SOFTHSM2_CONF" not in names and b"PKCS11" not in cmdline.upper(), cmdline
        elif not {b"verify", b"--version"} & set(cmdline.split(b"\0")):  # a signing run reaches the token
            assert b"SOFTHSM2_CONF" in names and b"PKCS11" in cmdline.upper(), cmdline
    signing = [cmd for cmd, _ in osslsigncode if b"\0--version\0" not in cmd]
    assert signing and all(b"\0-pkcs11module\0" in cmd and b"\0-key\0pkcs11:" in cmd for cmd in signing)
    server = psutil.Process(hsm.server.proc.pid)
    for proc in [server, *server.children(recursive=True)]:
        for kind in ("cmdline", "environ"):
            assert pin not in Path(f"/proc/{proc.pid}/{kind}").read_bytes()
    assert pin not in hsm.server.log.read_bytes()
    for path in d.root.rglob("*"):
        if path.is_file() and path.name != "passphrases" and not path.is_relative_to(d.root / "hsm"):
            assert pin not in path.read_bytes(), path


def test_no_private_key_file_but_tls(hsm: Hsm, tmp_path: Path) -> None:
    d = hsm.server.deployment
    holding = {
        p.relative_to(d.root).as_posix()
        for p in d.root.rglob("*")
        if p.is_file() and not p.is_relative_to(d.root / "hsm") and b"PRIVATE KEY" in p.read_bytes()
    }
    assert holding == {"tls/server.key"}  # the signing log's key is in a token of its own
    for store in d.root.rglob("*.p12"):  # only the public truststores, holding no key
        assert store.parent == d.public
        key, _, _ = pkcs12.load_key_and_certificates(store.read_bytes(), TRUSTSTORE_PASSWORD.encode())
        assert key is None, store
    # the tool formats' keys were generated in the token: sensitive, never extractable
    keys = tomllib.loads(d.config.read_text())["keys"]
    labels = sorted({keys[n]["label"] for n in ("authenticode", "jar", "focus-jar")})
    first = keys["authenticode"]
    env = {"PATH": os.environ["PATH"], "SOFTHSM2_CONF": first["module_env"]["SOFTHSM2_CONF"]}
    argv = [sys.executable, "-c", _INSPECT, first["module"], first["token"], *labels]
    res = subprocess.run(argv, input=_pin(d), capture_output=True, text=True, env=env, check=True)
    assert json.loads(res.stdout) == {label: [True, False, True, "refused"] for label in labels}
    # every key is in a token but macOS's, whose library has no PKCS#11
    everything = Deployment.create(tmp_path / "all", "dep", hsm=True)
    kinds = {name: k["kind"] for name, k in tomllib.loads(everything.config.read_text())["keys"].items()}
    assert {name for name, kind in kinds.items() if kind != "pkcs11"} == {"macos"}
