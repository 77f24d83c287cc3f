"""The PROXY protocol (v1, v2) in front of TLS: a strict parser, reading no byte past the
header, and a real ``sealbox serve`` that believes a header only from ``trusted_proxies``."""

from __future__ import annotations

import asyncio
import http.client
import ipaddress
import socket
import ssl
import struct
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w

from sealbox.server.proxy import (
    MAX_HEADER,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    crc32c,
    header_length,
    parse,
    read_header,
)
from tests.servers import Deployment, ServerProcess, start_server

CLIENT_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"  # how a TLS connection starts


def v2(
    command: int = 1,
    fam: int = 0x11,
    addresses: bytes | None = None,
    tlvs: bytes = b"",
    version: int = 2,
) -> bytes:
    """A v2 header; by default PROXY TCP4 from 192.0.2.7:40000 to 198.51.100.1:443."""
    if addresses is None:
        addresses = (
            ipaddress.IPv4Address("192.0.2.7").packed
            + ipaddress.IPv4Address("198.51.100.1").packed
            + struct.pack("!HH", 40000, 443)
        )
    body = addresses + tlvs
    return V2_SIGNATURE + bytes([version << 4 | command, fam]) + struct.pack("!H", len(body)) + body


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


def with_crc(header_without_crc: bytes, corrupt: bool = False) -> bytes:
    """``header_without_crc`` plus a CRC32C TLV over the whole (as HAProxy's ``crc32c`` option)."""
    zeroed = header_without_crc + tlv(0x03, bytes(4))
    length = struct.unpack("!H", zeroed[14:16])[0] + 7
    zeroed = zeroed[:14] + struct.pack("!H", length) + zeroed[16:]
    crc = crc32c(zeroed) ^ (1 if corrupt else 0)
    return zeroed[:-4] + struct.pack("!I", crc)


# -- the parser -----------------------------------------------------------------------------------
V1_TCP4 = b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 443\r\n"
V1_TCP6 = b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 443\r\n"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (V1_TCP4, ProxyHeader(1, ("192.0.2.7", 40000), ("198.51.100.1", 443))),
        (V1_TCP6, ProxyHeader(1, ("2001:db8::7", 40000), ("2001:db8::1", 443))),
        (b"PROXY UNKNOWN\r\n", ProxyHeader(1, None)),
        (b"PROXY UNKNOWN ffff::1 whatever\r\n", ProxyHeader(1, None)),  # ignored after UNKNOWN
        (
            b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n",
            ProxyHeader(1, ("0.0.0.0", 0), ("255.255.255.255", 65535)),
        ),
        (v2(), ProxyHeader(2, ("192.0.2.7", 40000), ("198.51.100.1", 443))),
        (
            v2(
                fam=0x21,
                addresses=ipaddress.IPv6Address("2001:db8::7").packed
                + ipaddress.IPv6Address("2001:db8::1").packed
                + struct.pack("!HH", 1, 2),
            ),
            ProxyHeader(2, ("2001:db8::7", 1), ("2001:db8::1", 2)),
        ),
        (v2(command=0, fam=0x00, addresses=b""), ProxyHeader(2, None)),  # HAProxy's health checks
        (v2(command=0), ProxyHeader(2, None)),  # LOCAL: whatever addresses it has are ignored
        (v2(command=1, fam=0x00, addresses=b""), ProxyHeader(2, None)),  # UNSPEC: none known
        (
            v2(tlvs=tlv(0x02, b"sign.example") + tlv(0x04, b"") + tlv(0xE0, b"\x00" * 300)),
            ProxyHeader(
                2,
                ("192.0.2.7", 40000),
                ("198.51.100.1", 443),
                ((0x02, b"sign.example"), (0x04, b""), (0xE0, b"\x00" * 300)),
            ),
        ),
    ],
)
def test_valid_headers_parse(header: bytes, expected: ProxyHeader) -> None:
    assert header_length(header + CLIENT_HELLO) == len(header)
    assert parse(header) == expected


def test_crc32c_is_checked() -> None:
    assert crc32c(b"123456789") == 0xE3069283  # the standard check value of CRC-32C
    good = with_crc(v2())
    assert parse(good).source == ("192.0.2.7", 40000)
    with pytest.raises(ProxyHeaderError, match="CRC32C checksum"):
        parse(with_crc(v2(), corrupt=True))
    short = v2(tlvs=tlv(0x03, b"abc"))
    with pytest.raises(ProxyHeaderError, match="4 bytes"):
        parse(short)


@pytest.mark.parametrize("header", [V1_TCP4, v2(), with_crc(v2(tlvs=tlv(0x05, b"id")))])
def test_every_prefix_asks_for_more(header: bytes) -> None:
    """A header cut anywhere is "need more bytes" (or, once v2's fixed part is in, its
    length), never a verdict on a partial read; and a cut header does not parse."""
    for n in range(len(header)):
        assert header_length(header[:n]) in (None, len(header)), n
        with pytest.raises(ProxyHeaderError):
            parse(header[:n])


@pytest.mark.parametrize("start", [CLIENT_HELLO, b"GET / HTTP/1.1\r\n", b"\x00", b"PROXZ", b"\r\n\r\nX"])
def test_other_streams_are_not_headers(start: bytes) -> None:
    assert header_length(start) == 0


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"PROXY " + b"A" * 110, "without CRLF"),
        (b"PROXY TCP4 1.2.3.4\n", "not printable"),
        (b"PROXY TCP4 1.2.3.4\rX", "CR not followed by LF"),
        (b"PROXY TCP4 1.2.3.4 \xc3\xa9", "not printable"),
        (b"PROXY TCP4 1.2.3.4\x00", "not printable"),
        (V2_SIGNATURE + b"\x21\x11\xff\xff", "at most"),
    ],
)
def test_refused_as_soon_as_it_cannot_be_a_header(data: bytes, why: str) -> None:
    with pytest.raises(ProxyHeaderError, match=why):
        header_length(data)


@pytest.mark.parametrize(
    ("header", "why"),
    [
        (b"PROXY TCP5 192.0.2.7 198.51.100.1 40000 443\r\n", "TCP4, TCP6 or UNKNOWN"),
        (b"PROXY TCP4 2001:db8::7 198.51.100.1 40000 443\r\n", "not IPv4"),
        (b"PROXY TCP6 192.0.2.7 2001:db8::1 40000 443\r\n", "not IPv6"),
        (b"PROXY TCP4 192.0.2.07 198.51.100.1 40000 443\r\n", "not IPv4"),
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 040000 443\r\n", "leading zeros"),
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 443\r\n", "0..65535"),
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 -1 443\r\n", "0..65535"),
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 +1 443\r\n", "0..65535"),
        (b"PROXY TCP4  192.0.2.7 198.51.100.1 40000 443\r\n", "must be"),
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 443 \r\n", "must be"),
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 40000\r\n", "must be"),
        (b"PROXY \r\n", "must be"),
        (b"PROXY TCP6 fe80::1%eth0 fe80::2 1 2\r\n", "scope id"),
        (v2(version=1), "version 1"),
        (v2(version=3), "version 3"),
        (v2(command=2), "command 2"),
        (v2(command=0xF), "command 15"),
        (v2(fam=0x13), "family/transport 0x13"),
        (v2(fam=0x41), "family/transport 0x41"),
        (v2(fam=0x12), "UDP or UNIX"),
        (v2(fam=0x31, addresses=bytes(216)), "UDP or UNIX"),
        (v2(addresses=bytes(11)), "need 12 bytes"),
        (v2(fam=0x21), "need 36 bytes"),  # IPv4-sized addresses under an IPv6 family
        (v2(tlvs=b"\x02\x00"), "TLV cut short"),
        (v2(tlvs=b"\x02\x00\x05abc"), "TLV longer than the header"),
        (v2(tlvs=tlv(0x02, b"x") + b"\x04"), "TLV cut short"),
    ],
)
def test_malformed_headers_are_refused(header: bytes, why: str) -> None:
    with pytest.raises(ProxyHeaderError, match=why):
        parse(header)


def test_parse_wants_exactly_one_header() -> None:
    with pytest.raises(ProxyHeaderError, match="incomplete or trailing"):
        parse(V1_TCP4 + b"x")
    with pytest.raises(ProxyHeaderError, match="incomplete or trailing"):
        parse(v2()[:-1])


def test_no_reason_quotes_the_clients_bytes() -> None:
    secret = b"SECRET-\xff-BYTES"
    for data in (b"PROXY TCP4 " + secret + b" 1.2.3.4 1 2\r\n", v2(tlvs=secret)):
        with pytest.raises(ProxyHeaderError) as e:
            parse(data)
        assert "SECRET" not in str(e.value)


# -- reading it off a socket: never a byte past the header ----------------------------------------
@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


@pytest.mark.parametrize("header", [V1_TCP4, v2(), with_crc(v2(tlvs=tlv(0x02, b"h" * 1000))), b""])
def test_read_header_leaves_the_tls_bytes(pair: tuple[socket.socket, socket.socket], header: bytes) -> None:
    client, server = pair
    client.sendall(header + CLIENT_HELLO)
    assert asyncio.run(read_header(server)) == header
    assert server.recv(100) == CLIENT_HELLO  # the TLS layer gets the whole ClientHello


@pytest.mark.parametrize("header", [V1_TCP4, v2()])
def test_read_header_byte_by_byte(pair: tuple[socket.socket, socket.socket], header: bytes) -> None:
    """A header that arrives in pieces (a slow or adversarial proxy) is still read exactly."""
    client, server = pair

    async def main() -> bytes:
        reading = asyncio.ensure_future(read_header(server))
        for i in range(len(header)):
            client.send(header[i : i + 1])
            await asyncio.sleep(0)  # let the reader see each piece on its own
            assert not reading.done() or i == len(header) - 1
        client.sendall(CLIENT_HELLO)
        return await reading

    assert asyncio.run(main()) == header
    assert server.recv(100) == CLIENT_HELLO


def test_read_header_refuses_a_diverging_signature(pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = pair
    client.sendall(b"PROXY TCP4 1.2.3.4\x16\x03")
    with pytest.raises(ProxyHeaderError):
        asyncio.run(read_header(server))


def test_read_header_bounds_what_it_holds(pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = pair
    client.sendall(V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", 60000) + bytes(4096))
    with pytest.raises(ProxyHeaderError, match=f"at most {MAX_HEADER}"):
        asyncio.run(read_header(server))


def test_read_header_on_a_closed_connection(pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = pair
    client.sendall(b"PROXY TCP4")
    client.close()
    with pytest.raises(ConnectionResetError):
        asyncio.run(read_header(server))


# -- a real server --------------------------------------------------------------------------------
def _request(
    sp: ServerProcess, path: str = "/__heartbeat__", header: bytes = b"", source: str = "127.0.0.1"
) -> int:
    """GET ``path`` over TLS after ``header``, from ``source``; the HTTP status."""
    raw = socket.create_connection(("127.0.0.1", sp.port), timeout=30, source_address=(source, 0))
    raw.sendall(header)
    ctx = ssl.create_default_context(cafile=str(sp.deployment.ca))
    with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        response = http.client.HTTPResponse(tls)
        response.begin()
        response.read()
        return response.status


def _refused(sp: ServerProcess, header: bytes, source: str = "127.0.0.1") -> None:
    """The connection is closed before TLS: the client's handshake fails."""
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _request(sp, header=header, source=source)


def _events(lines: list[dict[str, object]], name: str) -> list[dict[str, object]]:
    return [e for e in lines if e.get("event") == name]


def _deployment(root: Path, trusted: list[str] | None = None) -> Deployment:
    d = Deployment.create(root / "dep", "dep", ["gpg"])
    if trusted is not None:
        cfg = tomllib.loads(d.config.read_text())
        cfg["server"]["trusted_proxies"] = trusted
        d.config.write_text(tomli_w.dumps(cfg))
    return d


def test_no_trusted_proxy_refuses_every_header(tmp_path: Path) -> None:
    sp = start_server(_deployment(tmp_path))
    try:
        _refused(sp, v2())
        _refused(sp, V1_TCP4)
        refusals = _events(
            sp.wait_log(lambda lines: len(_events(lines, "proxy_refused")) == 2), "proxy_refused"
        )
        assert {e["peer"] for e in refusals} == {"127.0.0.1"}
        assert all("not in server.trusted_proxies" in str(e["reason"]) for e in refusals)
        assert _request(sp) == 200  # plain clients: unchanged
    finally:
        sp.stop()


def test_trusted_proxy_names_the_client(tmp_path: Path) -> None:
    """From a trusted address the header's client is the peer: in ``allowed_ips`` (403 for
    one outside it) and in the request log; a LOCAL header or none leaves the real peer."""
    sp = start_server(_deployment(tmp_path, ["127.0.0.1/32"]))
    try:
        assert _request(sp, header=b"PROXY TCP4 127.0.0.9 127.0.0.1 5555 443\r\n") == 200
        outside = v2(addresses=ipaddress.IPv4Address("10.1.2.3").packed + bytes(8))
        assert _request(sp, header=outside) == 403
        assert _request(sp, header=V1_TCP6) == 403  # 2001:db8::7 is not in allowed_ips either
        assert _request(sp, header=v2(command=0, fam=0, addresses=b"")) == 200
        assert _request(sp) == 200
        # Another address is not a trusted proxy: its header is refused, its plain TLS is not.
        _refused(sp, v2(), source="127.0.0.2")
        assert _request(sp, source="127.0.0.2") == 200
        _refused(sp, b"PROXY TCP4 127.0.0.9 127.0.0.1 05555 443\r\n")  # malformed, even when trusted

        lines = sp.wait_log(
            lambda lines: len(_events(lines, "request")) == 6 and len(_events(lines, "proxy_refused")) == 2
        )
        assert [(e["status"], e["peer"]) for e in _events(lines, "request")] == [
            (200, "127.0.0.9"),
            (403, "10.1.2.3"),
            (403, "2001:db8::7"),
            (200, "127.0.0.1"),  # LOCAL: the proxy itself (its health checks)
            (200, "127.0.0.1"),
            (200, "127.0.0.2"),
        ]
        refusals = _events(lines, "proxy_refused")
        assert [e["peer"] for e in refusals] == ["127.0.0.2", "127.0.0.1"]
        assert "trusted_proxies" in str(refusals[0]["reason"])
        assert "leading zeros" in str(refusals[1]["reason"])
    finally:
        sp.stop()
