"""rpmsign's ``%__gpg_sign_cmd`` during an ``rpm`` job: ``python -I -S _rpmhelper.py FD SIGFILE``.

rpmsign pipes the data to sign (the package header) to its stdin and expects a binary OpenPGP
signature in SIGFILE. This script holds no key: it sends the data over the socket FD, inherited
from the signing server's job, whose thread signs it through the key interface
(:mod:`sealbox.formats.rpm`), and writes the answer. Run as a script (stdlib only, nothing of
sealbox imported), so it starts in milliseconds.

Wire: request = 8-byte big-endian length, data; answer = 1 status byte (0 = signature,
1 = refusal reason), 4-byte big-endian length, body.
"""

from __future__ import annotations

import socket
import struct
import sys


def _read_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 16))
        if not chunk:
            raise EOFError("the signing server closed the connection")
        buf += chunk
    return bytes(buf)


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        sys.stderr.write("usage: _rpmhelper.py FD SIGFILE\n")
        return 2
    data = sys.stdin.buffer.read()
    with socket.socket(fileno=int(argv[1])) as sock:
        sock.sendall(struct.pack(">Q", len(data)) + data)
        status, length = struct.unpack(">BI", _read_exact(sock, 5))
        body = _read_exact(sock, length)
    if status != 0:
        sys.stderr.write(f"sealbox: {body.decode('utf-8', 'replace')}\n")
        return 1
    with open(argv[2], "wb") as f:
        f.write(body)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
