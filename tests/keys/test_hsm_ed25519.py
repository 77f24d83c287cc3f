"""Ed25519 keys in a PKCS#11 token (CKM_EDDSA): the backend signs messages with them, and
``sealbox init --dev --hsm`` makes the signing log's checkpoint key there. A server started from
such a deployment proves the key, lists its backend in the heartbeat, and writes a log that the
offline audit (``sealbox log verify``) accepts with the deployment's public key, and no other."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sealbox.errors import ConfigError
from sealbox.keys import load_key
from sealbox.keys.softhsm import create_token, generate_key
from sealbox.signlog import Checkpoint
from sealbox.signlog.log import parse_public_key, public_key_text
from tests.keys.conftest import Token
from tests.keys.test_hsm_server import _INSPECT
from tests.servers import BIN, Deployment, ServerProcess, start_server

ED_ID = b"\x20"
CAP = 60.0
FILES = 3


def test_the_backend_signs_ed25519_messages_in_the_token(token: Token) -> None:
    # A token of its own beside the shared one (same SoftHSM config): libp11, which the tool
    # tests use on the shared token, cannot load any key from a token holding an Ed25519 key.
    ed_token = create_token(token.soft.conf.parent, "sealbox-tests-ed25519", token.pin)
    generate_key(ed_token, token.pin, "ed25519", ED_ID, "ed25519")
    key = load_key(ed_token.spec("ed25519", "ed25519", ED_ID), token.pin)
    assert key.backend == "pkcs11" and key.algorithm == "ed25519" and key.key_size == 256
    assert isinstance(key.public_key, Ed25519PublicKey)
    message = b"a checkpoint body\n" * 20
    sig = key.sign(message, "sha256", "ed25519")
    key.public_key.verify(sig, message)  # raises if bad: cryptography's check, public half only
    with pytest.raises(InvalidSignature):
        key.public_key.verify(sig, message + b"x")
    assert key.sign(message, "sha256", "ed25519") == sig  # Ed25519 is deterministic
    with pytest.raises(ConfigError, match="Ed25519 signs messages"):
        key.sign_digest(bytes(32), "sha256", "ed25519")
    with pytest.raises(ConfigError, match="cannot sign with pkcs1v15"):
        key.sign(message, "sha256", "pkcs1v15")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, dict[str, Any]]]:
    """An ``--hsm`` deployment's server after signing a few files, stopped (its log final), and
    its heartbeat's key check."""
    root = tmp_path_factory.mktemp("hsm-ed25519")
    d = Deployment.create(root / "dep", "dep", ["gpg"], hsm=True)
    sp = start_server(d)
    try:
        with sp.client(timeout=CAP) as c:
            for i in range(FILES):
                src = root / f"f{i}.bin"
                src.write_bytes(os.urandom(2048))
                res = c.sign(src, ["gpg"])
                assert res.ok, res.error
        ctx = ssl.create_default_context(cafile=str(d.ca))
        # a proof of the last entry: the server signs a checkpoint covering it, in the token
        proof = httpx.get(f"{sp.server.url}/log/proof/{FILES - 1}", verify=ctx, timeout=CAP)
        assert proof.status_code == 200, proof.text
        cp = Checkpoint.from_json(proof.json()["checkpoint"])
        assert cp.size == FILES and cp.verify(parse_public_key((d.public / "signlog.pub").read_text()))
        beat = httpx.get(f"{sp.server.url}/__heartbeat__", verify=ctx, timeout=CAP)
        assert beat.status_code == 200, beat.text
        yield sp, beat.json()["checks"]["keys"]
    finally:
        sp.stop()


def test_init_dev_hsm_makes_the_log_key_in_the_token(served: tuple[ServerProcess, dict[str, Any]]) -> None:
    sp, _ = served
    d = sp.deployment
    cfg = tomllib.loads(d.config.read_text())
    log_key = cfg["log"]["key"]
    entry = cfg["keys"][log_key]
    assert entry["kind"] == "pkcs11" and "path" not in entry
    assert not (d.root / "keys").exists() or not list((d.root / "keys").glob(f"{log_key}.*"))
    # Non-extractable: flags read, and its private scalar refused, by a child with the token's config.
    env = {"PATH": os.environ["PATH"], "SOFTHSM2_CONF": entry["module_env"]["SOFTHSM2_CONF"]}
    argv = [sys.executable, "-c", _INSPECT, entry["module"], entry["token"], entry["label"]]
    res = subprocess.run(
        argv, input=d.passphrases()[log_key], capture_output=True, text=True, env=env, check=True
    )
    assert json.loads(res.stdout) == {entry["label"]: [True, False, True, "refused"]}


def test_start_up_proves_the_token_log_key_and_the_heartbeat_names_its_backend(
    served: tuple[ServerProcess, dict[str, Any]],
) -> None:
    sp, keys = served
    log_key = tomllib.loads(sp.deployment.config.read_text())["log"]["key"]
    unlocked = [e for e in sp.log_lines() if e.get("event") == "key_unlocked" and e.get("key") == log_key]
    assert [e["backend"] for e in unlocked] == ["pkcs11"]  # unlocked only after its test signature
    assert keys["keys"][log_key] == "ok" and keys["backends"][log_key] == "pkcs11"


def test_the_log_signed_in_the_token_verifies_with_its_public_key(
    served: tuple[ServerProcess, dict[str, Any]], tmp_path: Path
) -> None:
    d = served[0].deployment
    cfg = tomllib.loads(d.config.read_text())
    assert cfg["keys"][cfg["log"]["key"]]["kind"] == "pkcs11"  # the checkpoints were signed in the token
    public = d.public / "signlog.pub"
    parse_public_key(public.read_text())  # a raw 32-byte Ed25519 key, as with a key file

    def verify(pub: Path) -> subprocess.CompletedProcess[str]:
        argv = [str(BIN / "sealbox"), "log", "verify", str(d.root / "data" / "log"), "--public", str(pub)]
        return subprocess.run(argv, capture_output=True, text=True, check=False)

    done = verify(public)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f": ok: {FILES} entries" in done.stdout and " 0 checkpoint" not in done.stdout, done.stdout
    assert "not covered by a signed checkpoint" not in done.stdout, done.stdout
    other = tmp_path / "other.pub"
    other.write_text(public_key_text(Ed25519PrivateKey.generate().public_key()) + "\n")
    wrong = verify(other)
    assert wrong.returncode != 0 and "does not verify with the given public key" in wrong.stdout, (
        wrong.stdout + wrong.stderr
    )
