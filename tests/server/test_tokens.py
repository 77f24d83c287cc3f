"""Token minting and checking: unit level and through the real server."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ssl
import time
from pathlib import Path

import httpx
import pytest

from sealbox.client import SigningClient
from sealbox.errors import TokenError
from sealbox.server import tokens
from tests.servers import Deployment, ServerProcess, start_server

SECRET = b"0123456789abcdef0123456789abcdef"


def test_roundtrip_and_rotation() -> None:
    t = tokens.mint(SECRET, "127.0.0.1", 60)
    assert tokens.verify(t, [SECRET], "127.0.0.1").ip == "127.0.0.1"
    assert tokens.verify(t + "\n", [b"other-secret-value-xx", SECRET], "::ffff:127.0.0.1")
    with pytest.raises(TokenError, match="signature"):
        tokens.verify(t, [b"another-secret-entirely"], "127.0.0.1")


def test_ipv6_tokens_verify() -> None:
    for ip in ("::1", "2001:db8::7"):
        t = tokens.mint(SECRET, ip, 60)
        assert tokens.verify(t, [SECRET], ip).ip == ip
        with pytest.raises(TokenError, match="bound to"):
            tokens.verify(t, [SECRET], "2001:db8::8")


def test_matches_the_classic_worked_example() -> None:
    data = "127.0.0.1:1795309587:1795310787:6AeElobP6RTgqB48F4EGyQ"
    sig = (
        base64.b64encode(hmac.new(b"secretstring", data.encode(), hashlib.sha256).digest())
        .decode()
        .rstrip("=")
    )
    assert sig == "f72msbGXrqIzumuO511kKyQ3mwjUHhyIkiedWY1257E"
    assert tokens.verify(f"{data}!{sig}", [b"secretstring"], "127.0.0.1", now=1795309600)


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB"), "signature"),
        (lambda t: "garbage", "no signature"),
        (lambda t: "", "empty"),
        (lambda t: "a" * 1000, "too long"),
        (lambda t: "1.2.3.4:x:y:z!" + tokens._mac(SECRET, "1.2.3.4:x:y:z"), "integers"),
    ],
)
def test_refusals(mutate, reason) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TokenError, match=reason):
        tokens.verify(mutate(tokens.mint(SECRET, "127.0.0.1", 60)), [SECRET], "127.0.0.1")


def test_time_window_and_ip() -> None:
    now = time.time()
    t = tokens.mint(SECRET, "127.0.0.1", 10, now=now)
    with pytest.raises(TokenError, match="expired"):
        tokens.verify(t, [SECRET], "127.0.0.1", now=now + 11)
    with pytest.raises(TokenError, match="not valid yet"):
        tokens.verify(t, [SECRET], "127.0.0.1", now=now - 5)
    with pytest.raises(TokenError, match="bound to"):
        tokens.verify(t, [SECRET], "127.0.0.2", now=now)


# -- through the server ----------------------------------------------------------------------------


def _ctx(d: Deployment) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(d.ca))


def _upload(server: ServerProcess, token: str, data: bytes, source: str | None = None) -> httpx.Response:
    ctx = _ctx(server.deployment)
    with httpx.Client(transport=httpx.HTTPTransport(verify=ctx, local_address=source), verify=ctx) as c:
        return c.post(
            f"{server.server.url}/sign/gpg",
            data={
                "sha1": hashlib.sha1(data, usedforsecurity=False).hexdigest(),
                "filename": "t.bin",
                "token": token,
                "nonce": "",
            },
            files={"filedata": ("t.bin", data)},
        )


def _secret(d: Deployment) -> bytes:
    return (d.root / "secrets" / "token-secret").read_bytes().strip()


def _nothing_signed(server: ServerProcess, data: bytes) -> bool:
    r = httpx.get(
        f"{server.server.url}/sign/gpg/{hashlib.sha1(data, usedforsecurity=False).hexdigest()}",
        verify=_ctx(server.deployment),
    )
    return r.status_code == 404 and "X-Pending" not in r.headers


@pytest.mark.parametrize("case", ["forged", "expired", "not-yet-valid", "garbage", "other-secret"])
def test_server_refuses_bad_tokens(gpg_server: ServerProcess, case: str) -> None:
    secret, now = _secret(gpg_server.deployment), time.time()
    token = {
        "forged": tokens.mint(b"not-the-server-secret-at-all!", "127.0.0.1", 600),
        "expired": tokens.mint(secret, "127.0.0.1", 5, now=now - 100),
        "not-yet-valid": tokens.mint(secret, "127.0.0.1", 600, now=now + 300),
        "garbage": "\x00garbage!!",
        "other-secret": tokens.mint(b"rotated-away-secret-value-xxxx", "127.0.0.1", 600),
    }[case]
    data = f"token case {case} {now}".encode() * 10
    r = _upload(gpg_server, token, data)
    assert r.status_code == 400 and "Invalid token" in r.headers["X-Sealbox-Error"]
    assert "X-Nonce" not in r.headers
    assert _nothing_signed(gpg_server, data)


def _uploads_from(ip: str, lines: list[dict[str, object]]) -> int:
    return sum(
        e.get("event") == "request" and e.get("method") == "POST" and e.get("peer") == ip for e in lines
    )


def test_token_bound_to_another_ip(gpg_server: ServerProcess, tmp_path: Path, payload: Path) -> None:
    before = _uploads_from("127.0.0.2", gpg_server.log_lines())
    with SigningClient(
        [gpg_server.server],
        gpg_server.deployment.ca,
        gpg_server.token("127.0.0.1"),
        source_address="127.0.0.2",
        timeout=30,
    ) as c:
        out = c.sign(payload, ["gpg"], tmp_path / "x.bin")
    assert not out.ok and "Invalid token" in (out.error or "") and "127.0.0.2" in (out.error or "")
    lines = gpg_server.wait_log(lambda lines: _uploads_from("127.0.0.2", lines) > before)
    assert _uploads_from("127.0.0.2", lines) == before + 1  # refused, not retried
    assert _nothing_signed(gpg_server, payload.read_bytes())
    # The same client with a token for its own address succeeds.
    with SigningClient(
        [gpg_server.server],
        gpg_server.deployment.ca,
        gpg_server.token("127.0.0.2"),
        source_address="127.0.0.2",
    ) as c:
        assert c.sign(payload, ["gpg"], tmp_path / "y.bin").ok


def test_secret_rotation(tmp_path: Path, payload: Path) -> None:
    d = Deployment.create(tmp_path / "rot", "dep", ["gpg"])
    old = _secret(d)
    new_file = d.root / "secrets" / "token-secret-new"
    new_file.write_bytes(base64.b64encode(b"n" * 32))
    cfg = d.config.read_text().replace(
        'token_secret_files = [\n    "secrets/token-secret",\n]',
        'token_secret_files = ["secrets/token-secret-new", "secrets/token-secret"]',
    )
    d.config.write_text(cfg)
    sp = start_server(d)
    try:
        assert (
            _upload(sp, tokens.mint(old, "127.0.0.1", 600), b"old secret still accepted").status_code == 202
        )
        minted = sp.token()
        tokens.verify(minted, [new_file.read_bytes().strip()], "127.0.0.1")  # minted with the first secret
        assert _upload(sp, minted, b"new secret accepted too!").status_code == 202
    finally:
        sp.stop()


def test_issuer_checks(gpg_server: ServerProcess) -> None:
    url, ca = f"{gpg_server.server.url}/token", _ctx(gpg_server.deployment)
    user, password = gpg_server.deployment.auth
    ok = httpx.post(url, data={"slave_ip": "127.0.0.1", "duration": "60"}, auth=(user, password), verify=ca)
    assert ok.status_code == 200 and not ok.text.endswith("\n")
    bad = httpx.post(url, data={"slave_ip": "127.0.0.1", "duration": "60"}, auth=(user, "wrong"), verify=ca)
    assert bad.status_code == 401 and bad.text == ""
    assert httpx.post(url, data={"slave_ip": "127.0.0.1", "duration": "60"}, verify=ca).status_code == 401
    for duration in ("0", "-5", "abc", "999999"):
        r = httpx.post(
            url, data={"slave_ip": "127.0.0.1", "duration": duration}, auth=(user, password), verify=ca
        )
        assert r.status_code == 400, duration
    r = httpx.post(url, data={"slave_ip": "not-an-ip", "duration": "60"}, auth=(user, password), verify=ca)
    assert r.status_code == 400
    # 127.0.0.2 may talk to the server (allowed_ips is 127/8) but may not mint tokens.
    transport = httpx.HTTPTransport(verify=ca, local_address="127.0.0.2")
    with httpx.Client(transport=transport, verify=ca) as c:
        r = c.post(url, data={"slave_ip": "127.0.0.2", "duration": "60"}, auth=(user, password))
    assert r.status_code == 403
