"""Server lists in signtool's HOSTSPEC syntax: ``[fmt:[fmt:...]]host:port``."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ..errors import SealboxError
from ..wire import https_url


@dataclass(frozen=True)
class Server:
    """One signing server; ``formats`` empty means it serves every format asked of it."""

    host: str
    port: int
    formats: frozenset[str] = frozenset()

    @property
    def url(self) -> str:
        """The server's base URL (HTTPS)."""
        return https_url(self.host, self.port)

    def serves(self, fmt: str) -> bool:
        """Whether this server may be asked for ``fmt``."""
        return not self.formats or fmt in self.formats


def parse_host(spec: str) -> Server:
    """Parse a HOSTSPEC (an IPv6 address in brackets: ``gpg:[::1]:9110``); unlike signtool,
    formats without a port are an error, not a bad URL."""
    spec = spec.strip()
    bad = SealboxError(f"bad host '{spec}': expected [fmt:...]host:port (an IPv6 address in brackets)")
    if "[" in spec:
        before, _, rest = spec.partition("[")
        host, _, after = rest.partition("]")
        if (before and not before.endswith(":")) or not after.startswith(":"):
            raise bad
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise bad from None
        formats, port = before.removesuffix(":").split(":"), after[1:]
    else:
        parts = spec.split(":")
        if len(parts) == 1:
            host, port, formats = parts[0], "443", []
        else:
            host, port, formats = parts[-2], parts[-1], parts[:-2]
    formats = formats if formats != [""] else []
    # an empty format name: most likely an IPv6 address without its brackets
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or "" in formats:
        raise bad
    return Server(host, int(port), frozenset(formats))
