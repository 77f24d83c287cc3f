"""Server lists in signtool's HOSTSPEC syntax: ``[fmt:[fmt:...]]host:port``."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import SealboxError


@dataclass(frozen=True)
class Server:
    """One signing server; ``formats`` empty means it serves every format asked of it."""

    host: str
    port: int
    formats: frozenset[str] = frozenset()

    @property
    def url(self) -> str:
        """The server's base URL (HTTPS)."""
        return f"https://{self.host}:{self.port}"

    def serves(self, fmt: str) -> bool:
        """Whether this server may be asked for ``fmt``."""
        return not self.formats or fmt in self.formats


def parse_host(spec: str) -> Server:
    """Parse a HOSTSPEC; unlike signtool, formats without a port are an error, not a bad URL."""
    parts = spec.strip().split(":")
    if len(parts) == 1:
        host, port, formats = parts[0], "443", []
    else:
        host, port, formats = parts[-2], parts[-1], parts[:-2]
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SealboxError(f"bad host '{spec}': expected [fmt:...]host:port")
    return Server(host, int(port), frozenset(f for f in formats if f))
