"""The client's errors come as one exception type per cause, against a real server over HTTPS:
a refused input is SigningRefused, nothing answering is ServerUnavailable, a refused token or
issuer password is TokenRefused. Callers branch on the type, never on the message."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import sealbox.client
from sealbox.client import (
    ClientError,
    Server,
    ServerUnavailable,
    SigningClient,
    SigningRefused,
    TokenRefused,
    request_token,
)
from sealbox.errors import SealboxError
from tests.servers import ServerProcess, refusing_port

KINDS = (SigningRefused, TokenRefused, ServerUnavailable)


def test_kinds_are_exported_client_errors() -> None:
    for kind in KINDS:
        assert issubclass(kind, ClientError) and issubclass(kind, SealboxError)
        assert kind.__name__ in sealbox.client.__all__
    # distinct kinds: catching one never catches another
    assert not any(issubclass(a, b) for a in KINDS for b in KINDS if a is not b)


def test_refused_input_is_signing_refused(gpg_server: ServerProcess, tmp_path: Path) -> None:
    tiny = tmp_path / "tiny.txt"
    tiny.write_bytes(b"tiny")  # under the server's min_filesize: a 400, the same every time
    with gpg_server.client() as c:
        with pytest.raises(SigningRefused, match="File too small"):
            c.sign_one(tiny, "gpg", tmp_path / "tiny.txt.asc")
        [outcome] = c.sign_many([(tiny, ["gpg"], None)])
    assert not outcome.ok and isinstance(outcome.exception, SigningRefused)
    assert outcome.error == str(outcome.exception)


def test_nothing_listening_is_server_unavailable(
    gpg_server: ServerProcess, tmp_path: Path, payload: Path
) -> None:
    ca = gpg_server.deployment.ca
    with refusing_port() as port:
        nobody = Server("127.0.0.1", port)
        with SigningClient([nobody], ca, "some-token", timeout=1.0) as c:
            with pytest.raises(ServerUnavailable, match="gave up after"):
                c.sign_one(payload, "gpg", tmp_path / "out.asc")
            [outcome] = c.sign_many([(payload, ["gpg"], tmp_path / "out")])
        with pytest.raises(ServerUnavailable, match="cannot mint a token"):
            request_token(nobody, ca, *gpg_server.deployment.auth, "127.0.0.1", 60, timeout=1.0)
    assert isinstance(outcome.exception, ServerUnavailable)


def test_wrong_issuer_password_is_token_refused(gpg_server: ServerProcess) -> None:
    user, _ = gpg_server.deployment.auth
    with pytest.raises(TokenRefused, match="401"):
        request_token(gpg_server.server, gpg_server.deployment.ca, user, "wrong-password", "127.0.0.1", 60)


@pytest.mark.parametrize("size", [2048, 300 * 1024])  # uploaded at once; asked about first
def test_token_the_server_rejects_is_token_refused(
    gpg_server: ServerProcess, tmp_path: Path, size: int
) -> None:
    data = tmp_path / "data.bin"
    data.write_bytes(os.urandom(size))  # bytes no server has signed: the token is needed
    with (
        SigningClient([gpg_server.server], gpg_server.deployment.ca, "not-a-token") as c,
        pytest.raises(TokenRefused, match="Invalid token"),
    ):
        c.sign_one(data, "gpg", tmp_path / "data.bin.asc")
    with SigningClient([gpg_server.server], gpg_server.deployment.ca, None) as c:
        [outcome] = c.sign_many([(data, ["gpg"], None)])
    assert isinstance(outcome.exception, TokenRefused) and "no token" in str(outcome.exception)


@pytest.mark.parametrize(
    "headers, kind",
    [
        ({"X-Sealbox-Refusal": "token_expired", "X-Sealbox-Error": "anything"}, TokenRefused),
        # the kind, not the text, decides: a reason that merely starts like a token's
        ({"X-Sealbox-Refusal": "filename", "X-Sealbox-Error": "Invalid token-like name"}, SigningRefused),
        # a server of an earlier release says it only in its reason
        ({"X-Sealbox-Error": "Invalid token: expired"}, TokenRefused),
        ({"X-Sealbox-Error": "Hash mismatch"}, SigningRefused),
        ({}, SigningRefused),  # a classic server's bare 400
    ],
)
def test_the_kind_of_a_refusal(headers: dict[str, str], kind: type[Exception]) -> None:
    from sealbox.client._aio import _refusal_kind

    assert _refusal_kind(headers) is kind
