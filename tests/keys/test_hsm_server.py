"""A real server whose in-process formats' keys live in a SoftHSM token (``sealbox init --dev
--hsm``): every such format signs through PKCS#11 and passes the same independent verifier as
with key files; the PIN and the keys stay out of argv, environments, logs and the data dir; a
wrong PIN stops start-up; a token that goes away fails the heartbeat and the jobs retryably."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import ssl
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.formats.test_formats_e2e import GOOD, _verify
from tests.servers import Deployment, ServerProcess, gpg_verify, start_server

IN_PROCESS = ["gpg", "mar", "mar_sha384", "emevoucher", "widevine", "widevine_blessed"]
CAP = 60.0  # bound of every wait


@pytest.fixture(scope="module")
def hsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The in-process formats with their keys in the token, and sha2signcode, whose tool reaches
    its key in the token itself, run through a wrapper that records its argv and environment."""
    root = tmp_path_factory.mktemp("hsm")
    d = Deployment.create(root / "dep", "release", [*IN_PROCESS, "sha2signcode"], hsm=True)
    cfg = tomllib.loads(d.config.read_text())
    cfg_keys = {cfg["formats"][f]["key"] for f in IN_PROCESS}
    assert {cfg["keys"][k]["kind"] for k in cfg_keys} == {"pkcs11"}
    assert cfg["keys"]["authenticode"]["kind"] == "pkcs11"
    images = root / "tool-runs"
    images.mkdir()
    wrapper = root / "osslsigncode"
    wrapper.write_text(
        "#!/bin/sh\n"
        f"/bin/cat /proc/$$/cmdline > {images}/$$.cmdline\n"
        f"/bin/cat /proc/$$/environ > {images}/$$.environ\n"
        f'exec {shutil.which("osslsigncode")} "$@"\n'
    )
    wrapper.chmod(0o755)
    section = "[formats.sha2signcode]\n"
    d.config.write_text(d.config.read_text().replace(section, f'{section}osslsigncode = "{wrapper}"\n'))
    sp = start_server(d)
    yield sp
    sp.stop()


def _heartbeat(sp: ServerProcess) -> httpx.Response:
    ctx = ssl.create_default_context(cafile=str(sp.deployment.ca))
    with httpx.Client(verify=ctx, timeout=CAP) as c:
        return c.get(f"{sp.server.url}/__heartbeat__")


def _pin(d: Deployment) -> str:
    keys = tomllib.loads(d.config.read_text())["keys"]
    pins = {v for k, v in d.passphrases().items() if keys[k]["kind"] == "pkcs11"}
    assert len(pins) == 1  # one token, one PIN, named by each of its keys
    return pins.pop()


@pytest.mark.parametrize("fmt", IN_PROCESS)
def test_every_in_process_format_signs_with_the_token_key(
    hsm: ServerProcess, tmp_path: Path, fmt: str
) -> None:
    with hsm.client(timeout=120) as c:
        for make in GOOD[fmt]:
            src = make(tmp_path)
            out = tmp_path / "out" / src.name
            res = c.sign(src, [fmt], out)
            assert res.ok, res.error
            _verify(hsm, fmt, src, out)  # the same independent verifier as with key files
            if fmt == "gpg":
                res_gpg = gpg_verify(out.with_name(out.name + ".asc"), out, hsm.deployment.public / "gpg.asc")
                assert res_gpg.returncode == 0 and b"VALIDSIG" in res_gpg.stdout


def test_the_heartbeat_lists_each_keys_backend_and_workers_sign(hsm: ServerProcess, tmp_path: Path) -> None:
    r = _heartbeat(hsm)
    assert r.status_code == 200, r.text
    keys = r.json()["checks"]["keys"]
    cfg = tomllib.loads(hsm.deployment.config.read_text())
    for fmt in IN_PROCESS:
        name = cfg["formats"][fmt]["key"]
        assert keys["keys"][name] == "ok" and keys["backends"][name] == "pkcs11"
    # small jobs sign in the forked worker processes: each opened its own PKCS#11 session
    src = tmp_path / "small.txt"
    src.write_bytes(os.urandom(2048))
    with hsm.client() as c:
        assert c.sign(src, ["gpg"]).ok
    sha1 = hashlib.sha1(src.read_bytes(), usedforsecurity=False).hexdigest()
    lines = hsm.wait_log(lambda ls: [e for e in ls if e.get("event") == "job" and e.get("sha1") == sha1])
    assert [e["ran_in"] for e in lines if e.get("event") == "job" and e.get("sha1") == sha1] == ["worker"]


def test_no_pin_or_key_material_in_argv_environ_logs_or_files(hsm: ServerProcess, tmp_path: Path) -> None:
    d = hsm.deployment
    pin = _pin(d).encode()
    with hsm.client() as c:
        for fmt in [*IN_PROCESS, "sha2signcode"]:
            folder = tmp_path / fmt
            folder.mkdir()
            src = GOOD[fmt][0](folder)
            assert c.sign(src, [fmt], folder / "out" / src.name).ok
    server = psutil.Process(hsm.proc.pid)
    procs = [server, *server.children(recursive=True)]
    assert len(procs) > 1  # the signing workers
    images = [Path(f"/proc/{p.pid}/{kind}") for p in procs for kind in ("cmdline", "environ")]
    tool_runs = sorted((d.root.parent / "tool-runs").iterdir())
    assert tool_runs  # the tool child's argv and environment, recorded by its wrapper
    for image in [*images, *tool_runs]:
        data = image.read_bytes()
        assert pin not in data, image
        if image.suffix == ".environ":  # tools: a minimal environment, plus the module's variables
            names = {kv.split(b"=", 1)[0] for kv in data.split(b"\0") if kv}
            assert names <= {b"PATH", b"LANG", b"HOME", b"SOFTHSM2_CONF"}, image
    assert pin not in hsm.log.read_bytes()
    # Nothing the server wrote holds the PIN or a private key; no key file but the TLS key (the
    # signing log's Ed25519 key is on the token too).
    for path in d.root.rglob("*"):
        if not path.is_file() or path.is_relative_to(d.root / "hsm"):
            continue
        data = path.read_bytes()
        if path.name != "passphrases":
            assert pin not in data, path
        if b"PRIVATE KEY" in data:
            assert path.relative_to(d.root).as_posix() == "tls/server.key", path
    assert not list(d.root.glob("keys/*.p12"))


# Run in a child (SoftHSM takes one config per process; this one has the tests' token): reads
# each private key's flags and tries to read its private value (an RSA key's private exponent,
# an EC or Ed25519 key's scalar). The PIN comes on stdin.
_INSPECT = """
import json, sys, pkcs11
from pkcs11 import Attribute, KeyType, ObjectClass
FLAGS = (Attribute.SENSITIVE, Attribute.EXTRACTABLE, Attribute.NEVER_EXTRACTABLE)
module, token, labels = sys.argv[1], sys.argv[2], sys.argv[3:]
out = {}
with pkcs11.lib(module).get_token(token_label=token).open(user_pin=sys.stdin.read()) as s:
    for label in labels:
        k = s.get_key(object_class=ObjectClass.PRIVATE_KEY, label=label)
        flags = [bool(k[a]) for a in FLAGS]
        try:
            k[Attribute.PRIVATE_EXPONENT if k.key_type == KeyType.RSA else Attribute.VALUE]
            flags.append("read")
        except pkcs11.AttributeSensitive:
            flags.append("refused")
        out[label] = flags
print(json.dumps(out))
"""


def test_the_deployments_token_keys_cannot_be_read_out(hsm: ServerProcess) -> None:
    d = hsm.deployment
    keys = {k: v for k, v in tomllib.loads(d.config.read_text())["keys"].items() if v["kind"] == "pkcs11"}
    for token in {k["token"] for k in keys.values()}:  # the formats' token, the signing log's
        labels = [k["label"] for k in keys.values() if k["token"] == token]
        first = next(k for k in keys.values() if k["token"] == token)
        env = {"PATH": os.environ["PATH"], "SOFTHSM2_CONF": first["module_env"]["SOFTHSM2_CONF"]}
        argv = [sys.executable, "-c", _INSPECT, first["module"], token, *labels]
        res = subprocess.run(argv, input=_pin(d), capture_output=True, text=True, env=env, check=True)
        assert json.loads(res.stdout) == {label: [True, False, True, "refused"] for label in labels}
    for name in keys:
        assert (
            not (d.root / "keys" / f"{name}.pem").exists() and not (d.root / "keys" / f"{name}.p12").exists()
        )


def _stopped_with(d: Deployment, passphrase_file: Path) -> str:
    with pytest.raises(RuntimeError) as e:
        start_server(d, passphrase_file=passphrase_file)
    return str(e.value)


def test_a_wrong_pin_stops_start_up_naming_the_key(tmp_path: Path) -> None:
    d = Deployment.create(tmp_path / "dep", "dep", ["gpg", "mar"], hsm=True)
    lines = (d.root / "passphrases").read_text().splitlines()
    wrong = tmp_path / "wrong"
    wrong.write_text("".join(f"{x}-wrong\n" if x.startswith("gpg:") else f"{x}\n" for x in lines))
    message = _stopped_with(d, wrong)
    assert "not starting" in message and "key 'gpg'" in message and "wrong PIN" in message, message
    assert _pin(d) not in message


def test_a_format_whose_tool_has_no_pkcs11_refuses_a_token_key(tmp_path: Path) -> None:
    d = Deployment.create(tmp_path / "dep", "dep", ["emevoucher", "macho"], hsm=True)
    text = d.config.read_text()
    assert "# a key FILE, not in the token: what uses 'macos'" in text
    section = '[formats.macho]\nkey = "macos"\n'
    assert section in text
    d.config.write_text(text.replace(section, '[formats.macho]\nkey = "emevoucher"\n'))
    message = _stopped_with(d, d.root / "passphrases")
    assert "format 'macho': key 'emevoucher' is in a PKCS#11 token" in message, message


def test_a_removed_token_fails_the_heartbeat_and_jobs_retryably(tmp_path: Path) -> None:
    d = Deployment.create(tmp_path / "dep", "dep", ["gpg"], hsm=True)
    sp = start_server(d)
    tokens = d.root / "hsm" / "tokens"
    try:

        def sign(name: str) -> tuple[bool, str]:
            src = tmp_path / name
            src.write_bytes(os.urandom(4096))
            with sp.client(timeout=30) as c:
                res = c.sign(src, ["gpg"])
            return res.ok, hashlib.sha1(src.read_bytes(), usedforsecurity=False).hexdigest()

        assert sign("before.txt")[0]
        os.rename(tokens, tokens.with_name("tokens.gone"))
        r = _heartbeat(sp)  # the first heartbeat: no cached key check yet
        assert r.status_code == 503, r.text
        keys = r.json()["checks"]["keys"]
        assert keys["status"] == "error" and "gpg" in keys["message"]
        assert "PKCS#11 token 'sealbox-dep' is unavailable" in keys["keys"]["gpg"]
        ok, sha1 = sign("during.txt")
        assert not ok
        jobs = sp.wait_log(lambda ls: [e for e in ls if e.get("event") == "job" and e.get("sha1") == sha1])
        outcome = next(e for e in jobs if e.get("event") == "job" and e.get("sha1") == sha1)
        assert outcome["outcome"] == "failed" and "unavailable" in str(outcome["reason"])  # not "rejected"
        assert sp.proc.poll() is None  # the server (and its workers) go on
        os.rename(tokens.with_name("tokens.gone"), tokens)
        deadline = time.monotonic() + CAP  # the token is back: the next jobs sign without a restart
        while not sign(f"after-{time.monotonic_ns()}.txt")[0]:
            assert time.monotonic() < deadline, "signing never came back"
    finally:
        sp.stop()
