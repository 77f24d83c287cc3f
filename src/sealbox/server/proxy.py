"""The PROXY protocol (v1 text, v2 binary; haproxy.org's proxy-protocol.txt) before TLS.

A TCP load balancer that passes TLS through (HAProxy ``mode tcp`` with ``send-proxy-v2``)
writes one header naming the real client, then relays the client's TLS ClientHello. The
listener here reads that header off the raw socket, never a byte past it, believes it only
from ``[server] trusted_proxies``, and hands the socket to TLS and aiohttp with the reported
client as its peer: ``request.remote`` (so ``peer_ip``, ``allowed_ips``, token IP binding and
the logs) is the client, not the proxy. A header is optional from a trusted proxy (a plain
client on the same port keeps working) and refused from any other address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
import ssl
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ..wire import https_url
from .config import Network
from .tokens import normalize_ip

log = logging.getLogger("sealbox.proxy")

V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest v1 line, CRLF included ("PROXY TCP6 <39> <39> 65535 65535\r\n")
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16  # signature, version/command, family/transport, length
#: Room for the TLVs a balancer sends (authority, unique id, SSL details); far below v2's
#: 64 KiB, which no proxy needs and no one should make a server buffer per connection.
V2_MAX_PAYLOAD = 2048
MAX_HEADER = V2_FIXED + V2_MAX_PAYLOAD
#: Seconds a new connection has to show its first bytes (a PROXY header or a ClientHello).
HEADER_TIMEOUT = 10.0

_V2_ADDRESS_SIZE = {0x00: 0, 0x11: 12, 0x12: 12, 0x21: 36, 0x22: 36, 0x31: 216, 0x32: 216}
_TLV_CRC32C = 0x03
_PORT = re.compile(r"0|[1-9][0-9]{0,4}")


class ProxyHeaderError(ValueError):
    """Not a valid PROXY header. The message never quotes the client's bytes."""


@dataclass(frozen=True)
class ProxyHeader:
    """A parsed header. ``source`` is None when the header carries no client address
    (v2 LOCAL, a proxy's own health check; v1 UNKNOWN; v2 UNSPEC): the connection's stands."""

    version: int
    source: tuple[str, int] | None
    destination: tuple[str, int] | None = None
    tlvs: tuple[tuple[int, bytes], ...] = ()


def header_length(data: bytes) -> int | None:
    """The length of the PROXY header ``data`` starts with: 0 if it does not start like one,
    None if more bytes are needed to tell. Raises ProxyHeaderError as soon as it cannot be one."""
    n = min(len(data), len(V2_SIGNATURE))
    if data[:n] == V2_SIGNATURE[:n]:
        if len(data) < V2_FIXED:
            return None
        length = int.from_bytes(data[14:16], "big")
        if length > V2_MAX_PAYLOAD:
            raise ProxyHeaderError(f"v2 header of {V2_FIXED + length} bytes (at most {MAX_HEADER})")
        return V2_FIXED + length
    n = min(len(data), len(V1_PREFIX))
    if data[:n] != V1_PREFIX[:n]:
        return 0
    end = data.find(b"\r", 0, V1_MAX)
    line = data[: end if end >= 0 else V1_MAX]
    if any(b < 0x20 or b > 0x7E for b in line):
        raise ProxyHeaderError("v1 header with a byte that is not printable ASCII")
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyHeaderError(f"v1 header without CRLF in its first {V1_MAX} bytes")
        return None
    if end + 1 == len(data):
        return None
    if data[end + 1] != ord("\n"):
        raise ProxyHeaderError("v1 header with CR not followed by LF")
    return end + 2


def parse(data: bytes) -> ProxyHeader:
    """Parse one complete header (``data`` is exactly ``header_length(data)`` bytes)."""
    if header_length(data) != len(data):
        raise ProxyHeaderError("incomplete or trailing bytes")
    return _parse_v2(data) if data.startswith(V2_SIGNATURE) else _parse_v1(data)


def _parse_v1(data: bytes) -> ProxyHeader:
    parts = data[:-2].decode("ascii").split(" ")
    if parts[1:2] == ["UNKNOWN"]:
        return ProxyHeader(1, None)  # the rest of the line is to be ignored
    if len(parts) != 6:
        raise ProxyHeaderError("v1 header must be 'PROXY TCP4|TCP6 SRC DST SPORT DPORT'")
    _, proto, src, dst, sport, dport = parts
    if proto not in ("TCP4", "TCP6"):
        raise ProxyHeaderError("v1 protocol must be TCP4, TCP6 or UNKNOWN")
    family = ipaddress.IPv4Address if proto == "TCP4" else ipaddress.IPv6Address
    return ProxyHeader(
        1, (_v1_address(src, family), _v1_port(sport)), (_v1_address(dst, family), _v1_port(dport))
    )


def _v1_address(text: str, family: type[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> str:
    if "%" in text:  # a scope id: not an address a remote client has
        raise ProxyHeaderError("v1 address with a scope id")
    try:
        return str(family(text))
    except ValueError:
        raise ProxyHeaderError(
            f"v1 address is not {'IPv4' if family is ipaddress.IPv4Address else 'IPv6'}"
        ) from None


def _v1_port(text: str) -> int:
    if not _PORT.fullmatch(text) or int(text) > 65535:
        raise ProxyHeaderError("v1 port must be 0..65535 without leading zeros")
    return int(text)


def _parse_v2(data: bytes) -> ProxyHeader:
    version, command = data[12] >> 4, data[12] & 0x0F
    if version != 2:
        raise ProxyHeaderError(f"v2 signature with version {version}")
    if command not in (0, 1):
        raise ProxyHeaderError(f"v2 command {command} (0 LOCAL, 1 PROXY)")
    fam = data[13]
    if fam not in _V2_ADDRESS_SIZE:
        raise ProxyHeaderError(f"v2 address family/transport 0x{fam:02x}")
    size = _V2_ADDRESS_SIZE[fam]
    payload = data[V2_FIXED:]
    if len(payload) < size:
        raise ProxyHeaderError(f"v2 addresses need {size} bytes, the header has {len(payload)}")
    tlvs = []
    at = V2_FIXED + size
    while at < len(data):
        if len(data) - at < 3:
            raise ProxyHeaderError("v2 TLV cut short")
        kind, end = data[at], at + 3 + int.from_bytes(data[at + 1 : at + 3], "big")
        if end > len(data):
            raise ProxyHeaderError("v2 TLV longer than the header")
        value = data[at + 3 : end]
        if kind == _TLV_CRC32C:
            _check_crc32c(data, at + 3, value)
        tlvs.append((kind, value))
        at = end
    if command == 0 or fam == 0x00:
        return ProxyHeader(2, None, None, tuple(tlvs))  # LOCAL (a health check), or no address known
    if fam not in (0x11, 0x21):
        raise ProxyHeaderError("v2 header for a UDP or UNIX connection: this server speaks TCP")
    n = 4 if fam == 0x11 else 16
    src, dst = ipaddress.ip_address(payload[:n]), ipaddress.ip_address(payload[n : 2 * n])
    sport, dport = (
        int.from_bytes(payload[2 * n : 2 * n + 2], "big"),
        int.from_bytes(payload[2 * n + 2 : size], "big"),
    )
    return ProxyHeader(2, (str(src), sport), (str(dst), dport), tuple(tlvs))


def _check_crc32c(data: bytes, at: int, value: bytes) -> None:
    """The checksum TLV's ``value`` (at offset ``at``) is the CRC-32C of the whole header
    with those 4 bytes zeroed."""
    if len(value) != 4:
        raise ProxyHeaderError("v2 CRC32C TLV must hold 4 bytes")
    if crc32c(data[:at] + bytes(4) + data[at + 4 :]) != int.from_bytes(value, "big"):
        raise ProxyHeaderError("v2 CRC32C checksum does not match")


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        for _ in range(8):
            n = (n >> 1) ^ 0x82F63B78 if n & 1 else n >> 1
        table.append(n)
    return table


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum of v2's PP2_TYPE_CRC32C."""
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC32C[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# -- reading it off a socket ----------------------------------------------------------------------
async def read_header(sock: socket.socket) -> bytes:
    """Consume the PROXY header at the start of the stream on ``sock`` (non-blocking) and
    return it, b"" if there is none; never a byte past it (those are the TLS layer's)."""
    loop = asyncio.get_running_loop()
    got = b""
    while True:
        try:
            peeked = sock.recv(MAX_HEADER - len(got), socket.MSG_PEEK)
        except BlockingIOError:
            await _readable(loop, sock)
            continue
        if not peeked:
            raise ConnectionResetError("closed before a PROXY header or TLS ClientHello")
        length = header_length(got + peeked)
        if length == 0:
            if got:
                raise ProxyHeaderError("starts like a PROXY header but is not one")
            return b""
        take = len(peeked) if length is None else min(len(peeked), length - len(got))
        got += sock.recv(take)  # bytes already peeked: recv returns them all at once
        if length is not None and len(got) == length:
            return got


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    ready: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()

    def wake() -> None:
        if not ready.done():  # the reader may fire again before this task runs
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


class _Proxied(socket.socket):
    """An accepted connection whose peer is the client the proxy reported: asyncio records
    ``getpeername()`` as the transport's "peername", which ``request.remote`` reads."""

    def __init__(self, conn: socket.socket, peer: tuple[Any, ...]) -> None:
        super().__init__(conn.family, conn.type, conn.proto, conn.detach())
        self._peer = peer

    def getpeername(self) -> tuple[Any, ...]:
        return self._peer


def _trusted(ip: str, networks: Sequence[Network]) -> bool:
    addr = ipaddress.ip_address(ip)
    return any(addr in net for net in networks)


class _Listener(asyncio.AbstractServer):
    """The listening sockets and their accept loops (what ``BaseSite`` stops with ``close()``)."""

    def __init__(self, sockets: list[socket.socket]) -> None:
        self.sockets = sockets
        self.tasks: set[asyncio.Task[None]] = set()
        self.closed = asyncio.Event()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def close(self) -> None:
        # New connections are refused from now on; those still showing their header or in
        # their TLS handshake go too (aiohttp's shutdown only knows connections it was given).
        loop = asyncio.get_running_loop()
        for sock in self.sockets:
            if sock.fileno() >= 0:
                loop.remove_reader(sock.fileno())  # before the fd is closed (and reused)
                sock.close()
        for task in list(self.tasks):
            task.cancel()
        self.closed.set()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    def is_serving(self) -> bool:
        return not self.closed.is_set()

    async def start_serving(self) -> None:
        pass

    async def serve_forever(self) -> None:
        await self.closed.wait()

    async def wait_closed(self) -> None:
        await self.closed.wait()


class ProxySite(web.BaseSite):
    """aiohttp's TCPSite with TLS, plus the PROXY protocol from ``trusted`` addresses."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext,
        trusted: Sequence[Network] = (),
        backlog: int = 128,
        header_timeout: float = 20.0,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._host, self._port, self._trusted = host, port, list(trusted)
        #: seconds from accepting a connection to its first request's headers, read whole
        self._header_timeout = header_timeout

    @property
    def name(self) -> str:
        return https_url(self._host, self._port)

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(
            self._host, self._port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        sockets: list[socket.socket] = []
        try:
            for family, kind, proto, _, address in dict.fromkeys((i[0], i[1], i[2], "", i[4]) for i in infos):
                sock = socket.socket(family, kind, proto)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
                sock.listen(self._backlog)
                sock.setblocking(False)
        except OSError as e:
            for sock in sockets:
                sock.close()
            raise OSError(e.errno, f"cannot listen on {self.name}: {e.strerror}") from None
        listener = _Listener(sockets)
        self._server = listener
        for sock in sockets:
            listener.spawn(self._accept(listener, sock))

    async def _accept(self, listener: _Listener, lsock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, address = await loop.sock_accept(lsock)
            except (ConnectionAbortedError, InterruptedError):
                continue  # the client went away before it was accepted
            except OSError as e:  # out of descriptors or memory: as asyncio's own listener does
                log.warning("accept failed", extra={"fields": {"event": "accept_failed", "error": str(e)}})
                await asyncio.sleep(1.0)
                continue
            listener.spawn(self._connection(conn, address))

    async def _connection(self, conn: socket.socket, address: tuple[Any, ...]) -> None:
        """Read the PROXY header, if any, then start TLS and HTTP on the connection, which must
        have sent its first request's headers ``header_timeout`` seconds after it was accepted
        (an idle or slowly talking connection must not hold a socket for ever)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._header_timeout
        peer_ip = normalize_ip(str(address[0]))
        sock: socket.socket = conn
        try:
            conn.setblocking(False)
            async with asyncio.timeout(min(HEADER_TIMEOUT, self._header_timeout)):
                raw = await read_header(conn)
            if raw:
                if not _trusted(peer_ip, self._trusted):
                    raise ProxyHeaderError("PROXY header from an address not in server.trusted_proxies")
                source = parse(raw).source
                if source is not None:
                    ip = normalize_ip(source[0])
                    sock = _Proxied(conn, (ip, source[1]) if ":" not in ip else (ip, source[1], 0, 0))
        except (ProxyHeaderError, TimeoutError) as e:
            quiet = min(HEADER_TIMEOUT, self._header_timeout)
            reason = str(e) if isinstance(e, ProxyHeaderError) else f"nothing within {quiet:g} s"
            fields = {"event": "proxy_refused", "peer": peer_ip, "reason": reason}
            log.warning("connection refused", extra={"fields": fields})
            conn.close()
            return
        except OSError:  # reset or closed before its first bytes: nothing to answer
            conn.close()
            return
        except asyncio.CancelledError:
            conn.close()
            raise
        server = self._runner.server
        assert server is not None
        try:
            _, protocol = await loop.connect_accepted_socket(
                server, sock, ssl=self._ssl_context, ssl_handshake_timeout=max(deadline - loop.time(), 0.1)
            )
        except (OSError, TimeoutError):
            # A failed handshake, as asyncio's own listener treats one: the client's problem.
            sock.close()
            return
        loop.call_at(deadline, _unless_it_asked, protocol, peer_ip, self._header_timeout)


def _unless_it_asked(protocol: Any, peer_ip: str, seconds: float) -> None:
    """Close a connection whose first request's headers have not all arrived by now. (aiohttp
    counts the requests it has parsed on a connection: ``RequestHandler._request_count``.)"""
    if getattr(protocol, "_request_count", 1) == 0 and protocol.transport is not None:
        fields = {"event": "no_request", "peer": peer_ip, "reason": f"no request within {seconds:g} s"}
        log.warning("connection closed", extra={"fields": fields})
        protocol.force_close()
