"""A server listening on an IPv6 address, reached by the library and by `sealbox sign` with a
bracketed HOSTSPEC; and the HOSTSPEC parser's IPv6 cases."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sealbox.client import Server, parse_host
from sealbox.errors import SealboxError
from tests.client.test_client import sign_cli, verified
from tests.servers import Deployment, ServerProcess, start_server


@pytest.mark.parametrize(
    "spec, server",
    [
        ("[::1]:9110", Server("::1", 9110)),
        ("gpg:mar:[2001:db8::5]:443", Server("2001:db8::5", 443, frozenset({"gpg", "mar"}))),
        ("127.0.0.1:9110", Server("127.0.0.1", 9110)),
        ("gpg:signing.example:9110", Server("signing.example", 9110, frozenset({"gpg"}))),
    ],
)
def test_hostspecs(spec: str, server: Server) -> None:
    assert parse_host(spec) == server


@pytest.mark.parametrize(
    "spec", ["[::1]", "::1:9110", "[::1]9110", "gpg[::1]:9110", "[nothost]:9110", "[::1]:0"]
)
def test_bad_hostspecs(spec: str) -> None:
    with pytest.raises(SealboxError, match="IPv6 address in brackets"):
        parse_host(spec)


def test_urls_bracket_ipv6() -> None:
    assert Server("::1", 9110).url == "https://[::1]:9110"
    assert Server("127.0.0.1", 9110).url == "https://127.0.0.1:9110"


@pytest.fixture
def v6_server(gpg_deployment: Deployment, tmp_path: Path) -> Iterator[ServerProcess]:
    # a data folder of its own: the deployment's may be in use by another test's server
    sp = start_server(gpg_deployment, host="::1", extra=["--data-dir", str(tmp_path / "v6-data")])
    yield sp
    sp.stop()


def test_a_server_on_ipv6_signs_for_the_library_and_the_cli(
    v6_server: ServerProcess, tmp_path: Path, payload: Path
) -> None:
    listening = next(e for e in v6_server.log_lines() if e.get("event") == "listening")
    assert listening["url"] == f"https://[::1]:{v6_server.port}"
    with v6_server.client() as client:
        out = client.sign(payload, ["gpg"])
    assert out.ok, out.error
    assert verified(v6_server, payload)
    payload.with_name(payload.name + ".asc").unlink()
    assert v6_server.hostspec == f"[::1]:{v6_server.port}"
    res = sign_cli(v6_server, tmp_path, "-f", "gpg", str(payload))
    assert res.returncode == 0, res.stderr
    assert verified(v6_server, payload)
