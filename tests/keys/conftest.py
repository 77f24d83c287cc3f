"""A SoftHSM token made at test time (its own config and token directory in tmp), shared by
the in-process tests of this folder: SoftHSM takes one config per process."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest

from sealbox.keys._pkcs11 import softhsm_module
from sealbox.keys.softhsm import SoftToken, create_token, generate_key

RSA_ID, EC_ID, RSA4096_ID = b"\x01", b"\x02", b"\x03"


@dataclass(frozen=True)
class Token:
    soft: SoftToken
    pin: bytes


@pytest.fixture(scope="session")
def token(tmp_path_factory: pytest.TempPathFactory) -> Token:
    if softhsm_module() is None:
        pytest.fail("SoftHSM is not installed (scripts/bootstrap.sh installs softhsm2)")
    pin = os.urandom(12).hex().encode()
    soft = create_token(tmp_path_factory.mktemp("hsm"), "sealbox-tests", pin)
    generate_key(soft, pin, "rsa", RSA_ID, "rsa", 2048)
    generate_key(soft, pin, "ec", EC_ID, "ec")
    return Token(soft, pin)
