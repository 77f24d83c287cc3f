"""The HTTP surface under hostile input: malformed tokens and names get a clean 4xx whose
headers are printable ASCII, every request (aiohttp's own refusals and crashes included)
gives exactly one JSON request line, and nothing but JSON reaches the server's log."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import random
import resource
import socket
import sqlite3
import ssl
import time
import urllib.parse
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sealbox.errors import TokenError
from sealbox.server import tokens
from sealbox.server.answers import MAX_REASON
from sealbox.server.config import load_config
from tests.servers import Deployment, ServerProcess, start_server

CAP = 30.0  # bound of every wait
SHA1 = "ab" * 20
SECRET = b"0123456789abcdef0123456789abcdef"
SMALL_LIMIT = 100_000


# -- raw HTTP over TLS ---------------------------------------------------------------------------
@dataclass
class Answer:
    status: int
    head: bytes  # status line and header lines, as sent
    body: bytes
    complete: bool  # the whole body that Content-Length announced arrived

    def header(self, name: str) -> str | None:
        for line in self.head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == name.lower().encode():
                return value.strip().decode("ascii")
        return None


def exchange(sp: ServerProcess, request: bytes) -> Answer:
    """Send ``request`` as is (bytes an HTTP library would refuse to send) on a fresh TLS
    connection and read one answer."""
    ctx = ssl.create_default_context(cafile=str(sp.deployment.ca))
    with (
        socket.create_connection(("127.0.0.1", sp.port), timeout=CAP) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(request)
        buf = b""

        def more() -> bool:
            nonlocal buf
            try:
                chunk = tls.recv(65536)
            except (ssl.SSLError, ConnectionError):
                return False  # the server cut the connection: what came is the answer
            buf += chunk
            return bool(chunk)

        while b"\r\n\r\n" not in buf and more():
            pass
        head, sep, body = buf.partition(b"\r\n\r\n")
        assert sep, f"no answer to {request[:120]!r}: got {buf!r}"
        status_line = head.split(b"\r\n")[0]
        assert status_line.startswith((b"HTTP/1.0 ", b"HTTP/1.1 ")), status_line
        answer = Answer(int(status_line.split()[1]), head, body, False)
        length = int(answer.header("Content-Length") or 0)
        while len(buf) - len(head) - 4 < length and more():
            pass
        answer.body = buf[len(head) + 4 :]
        answer.complete = len(answer.body) >= length
        return answer


def assert_clean_headers(answer: Answer) -> None:
    for line in answer.head.split(b"\r\n"):
        assert all(0x20 <= b < 0x7F for b in line), line


def form(fields: dict[str, bytes], data: bytes = b"signed by the http surface test " * 4) -> bytes:
    """A multipart body: the fields, then ``filedata`` (as signtool sends them)."""
    out = b""
    for name, value in fields.items():
        out += b'--xx\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n' % (name.encode(), value)
    out += b'--xx\r\nContent-Disposition: form-data; name="filedata"; filename="t.bin"\r\n\r\n'
    return out + data + b"\r\n--xx--\r\n"


def post(path: bytes, body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        b"Content-Type: multipart/form-data; boundary=xx\r\nContent-Length: %d\r\n%s\r\n"
        % (path, len(body), extra)
    ) + body


def get(path: bytes) -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n" % path


def upload(sp: ServerProcess, token: bytes, fmt: bytes = b"gpg") -> bytes:
    data = f"http surface {uuid.uuid4()}".encode() * 8
    sha1 = hashlib.sha1(data, usedforsecurity=False).hexdigest().encode()
    fields = {"sha1": sha1, "filename": b"t.bin", "token": token, "nonce": b""}
    return post(b"/sign/" + fmt, form(fields, data))


# -- the server's log ----------------------------------------------------------------------------
def marker(sp: ServerProcess) -> str:
    """Send a request of its own and wait until its line is in the log. A request answered
    before it was logged before it too: aiohttp logs right after writing the answer."""
    path = f"/mark/{uuid.uuid4().hex}"
    assert exchange(sp, get(path.encode())).status == 400
    deadline = time.monotonic() + CAP
    while f'"path":"{path}"' not in sp.log.read_text("utf-8", "replace"):
        assert time.monotonic() < deadline, f"marker {path} never logged"
        time.sleep(0.02)
    return path


def logged_since(sp: ServerProcess, start: str) -> list[dict[str, Any]]:
    """What the server logged between marker ``start`` and a new marker; each line must be JSON."""
    end = marker(sp)
    lines = sp.log.read_text("utf-8").splitlines()
    first = next(i for i, line in enumerate(lines) if f'"path":"{start}"' in line)
    last = next(i for i, line in enumerate(lines) if f'"path":"{end}"' in line)
    entries = []
    for line in lines[first + 1 : last]:
        try:
            entries.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not JSON in the server's log: {line!r}") from None
    return entries


def requests_in(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in entries if e.get("event") == "request"]


# -- tokens ---------------------------------------------------------------------------------------
VALID_SIG = tokens._mac(SECRET, "127.0.0.1:1:2:x")
MALFORMED = {  # token -> why it is refused
    "non-ASCII": ("127.0.0.1:1:2:é!" + VALID_SIG, "not ASCII"),
    "non-ASCII signature": ("127.0.0.1:1:2:x!" + "é" * 43, "not ASCII"),
    "NUL": ("127.0.0.1:1:2:x\x00!" + VALID_SIG, "control characters"),
    "DEL": ("127.0.0.1:1:2:x!" + VALID_SIG[:-1] + "\x7f", "control characters"),
    "inner space": ("127.0.0.1:1:2:x !" + VALID_SIG, "spaces"),
    "two signature parts": ("127.0.0.1:1:2:x!" + VALID_SIG + "!" + VALID_SIG, "base64"),
    "signature not base64": ("127.0.0.1:1:2:x!" + "#" * 43, "base64"),
    "signature too short": ("127.0.0.1:1:2:x!" + VALID_SIG[:20], "base64"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_tokens_are_token_errors(case: str) -> None:
    token, why = MALFORMED[case]
    with pytest.raises(TokenError, match=why):
        tokens.verify(token, [SECRET], "127.0.0.1")


@pytest.mark.parametrize(
    "token, why",
    [
        (b"127.0.0.1:1:2:\xc3\xa9!" + VALID_SIG.encode(), "not ASCII"),
        (b"127.0.0.1:1:2:x!" + "é".encode() * 43, "not ASCII"),
        (b"\xff\xfe not UTF-8", "not ASCII"),
        (b"abc\x00def!" + VALID_SIG.encode(), "control characters"),
        (b"a:b:c!d!e", "base64"),
        (b"1.2.3.4:1:2:x!" + b"%" * 43, "base64"),
        (b"a" * 100 * 1024, "field token is too long"),
    ],
    ids=["non-ASCII", "non-ASCII signature", "not UTF-8", "NUL", "three parts", "bad base64", "100 KiB"],
)
def test_server_refuses_malformed_tokens(gpg_server: ServerProcess, token: bytes, why: str) -> None:
    start = marker(gpg_server)
    answer = exchange(gpg_server, upload(gpg_server, token))
    reason = answer.header("X-Sealbox-Error") or ""
    assert answer.status == 400 and answer.complete and why in reason, answer
    assert reason.startswith(("Invalid token: ", "field token")), reason
    assert_clean_headers(answer)
    [line] = requests_in(logged_since(gpg_server, start))
    assert line["status"] == 400 and line["reason"] == reason


def mint_request(sp: ServerProcess, content_type: bytes, body: bytes) -> bytes:
    user, password = sp.deployment.auth
    auth = base64.b64encode(f"{user}:{password}".encode())
    return (
        b"POST /token HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nAuthorization: Basic %s\r\n"
        b"Content-Type: %s\r\nContent-Length: %d\r\n\r\n" % (auth, content_type, len(body))
    ) + body


@pytest.mark.parametrize(
    "content_type, body",
    [
        (b"multipart/form-data", b"--xx\r\n"),
        (b"application/x-www-form-urlencoded; charset=no-such-charset", b"slave_ip=127.0.0.1&duration=60"),
        (
            b"multipart/form-data; boundary=xx",
            b'--xx\r\nContent-Disposition: form-data; name="slave_ip"\r\n\r\n\xff\xfe\r\n--xx--\r\n',
        ),
    ],
    ids=["no boundary", "unknown charset", "not UTF-8"],
)
def test_issuer_with_a_malformed_form(gpg_server: ServerProcess, content_type: bytes, body: bytes) -> None:
    start = marker(gpg_server)
    answer = exchange(gpg_server, mint_request(gpg_server, content_type, body))
    assert answer.status == 400 and "malformed form" in (answer.header("X-Sealbox-Error") or ""), answer
    [line] = logged_since(gpg_server, start)
    assert line["status"] == 400


# -- client bytes never reach a header ------------------------------------------------------------
NAMES = [b"gp%0Dg", b"gp%0Ag", b"gp%00g", b"gp%7fg", b"gp%C3%A9g", b"gp%FFg", b"x" * 5000]


@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize("name", NAMES, ids=[n[:10].decode() for n in NAMES])
def test_format_name_is_never_echoed_raw(gpg_server: ServerProcess, method: str, name: bytes) -> None:
    if method == "GET":
        request = get(b"/sign/%s/%s" % (name, SHA1.encode()))
    else:
        request = upload(gpg_server, gpg_server.token().encode(), name)
    start = marker(gpg_server)
    answer = exchange(gpg_server, request)
    assert 400 <= answer.status < 500 and answer.complete, answer
    assert_clean_headers(answer)
    reason = answer.header("X-Sealbox-Error") or ""
    assert reason.startswith("unknown format") and len(reason) <= MAX_REASON, reason
    assert answer.body.decode("ascii") == reason + "\n"  # the body carries the same safe text
    [line] = requests_in(logged_since(gpg_server, start))
    assert line["status"] == answer.status and line["method"] == method


# -- what aiohttp refuses itself ------------------------------------------------------------------
BAD_HTTP = {
    "garbage request line": b"GARBAGE\r\n\r\n",
    "binary request line": b"\x00\x01\x02 \xff\xfe HTTP/1.1\r\n\r\n",
    "bad HTTP version": b"GET / HTTX/1.1\r\nHost: x\r\n\r\n",
    "invalid header": b"GET /__heartbeat__ HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    "NUL in a header": b"GET /__heartbeat__ HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    "bad Content-Length": b"POST /sign/gpg HTTP/1.1\r\nHost: x\r\nContent-Length: 1x\r\n\r\n",
    "oversize header": b"GET /__heartbeat__ HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
    "bad chunked body": (
        b"POST /sign/gpg HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: multipart/form-data; boundary=xx\r\n\r\nZZ\r\nabc\r\n0\r\n\r\n"
    ),
    "bad gzip body": post(b"/sign/gpg", b"\x1f\x8b\x08\x00 not gzip at all", b"Content-Encoding: gzip\r\n"),
}


@pytest.mark.parametrize("case", list(BAD_HTTP))
def test_malformed_http_is_one_json_line(gpg_server: ServerProcess, case: str) -> None:
    start = marker(gpg_server)
    answer = exchange(gpg_server, BAD_HTTP[case])
    assert 400 <= answer.status < 500, answer
    entries = logged_since(gpg_server, start)  # every line JSON
    [line] = requests_in(entries)
    assert line["status"] == answer.status and line["reason"]
    assert not [e for e in entries if e.get("event") != "request"], entries  # no traceback, no noise


def test_client_leaving_mid_upload_is_one_line(gpg_server: ServerProcess) -> None:
    body = form({"token": gpg_server.token().encode()})
    start = marker(gpg_server)
    ctx = ssl.create_default_context(cafile=str(gpg_server.deployment.ca))
    with (
        socket.create_connection(("127.0.0.1", gpg_server.port), timeout=CAP) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(post(b"/sign/gpg", body)[: -len(body) // 2])  # half the body, then gone
    deadline = time.monotonic() + CAP
    while '"status":499' not in gpg_server.log.read_text("utf-8").partition(start)[2]:
        assert time.monotonic() < deadline, "the abandoned upload was never logged"
        time.sleep(0.02)
    [line] = logged_since(gpg_server, start)  # no traceback, no second line
    assert line["status"] == 499 and line["path"] == "/sign/gpg"


# -- a real crash ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def own_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server of its own: these tests damage its content store."""
    d = Deployment.create(tmp_path_factory.mktemp("surface") / "dep", "dep", ["gpg"])
    sp = start_server(d)
    yield sp
    sp.stop()


def data_dir(sp: ServerProcess) -> Path:
    cfg = load_config(sp.deployment.config)
    return cfg.resolve(cfg.server.data_dir)


def crash_lines(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in entries if e.get("event") == "crash"]


def test_a_row_store_that_fails_under_the_server_is_a_miss(own_server: ServerProcess) -> None:
    # The small store's table vanishes under the running server (a damaged data folder): the
    # lookup it cannot answer is a miss, logged once as a warning, never a crash or a 500.
    path = f"/sign/gpg/{SHA1}".encode()
    assert exchange(own_server, get(path)).status == 404  # the server has its database open
    db = sqlite3.connect(data_dir(own_server) / "small.sqlite3", isolation_level=None)
    schema = db.execute("SELECT sql FROM sqlite_master WHERE name = 'results'").fetchone()[0]
    db.execute("DROP TABLE results")
    try:
        start = marker(own_server)
        answer = exchange(own_server, get(path))
        entries = logged_since(own_server, start)
    finally:
        db.execute(schema)
        db.close()
    assert answer.status == 404 and answer.complete and b"sqlite" not in answer.head + answer.body.lower()
    assert not crash_lines(entries)
    [failed] = [e for e in entries if e.get("event") == "store_rows_failed"]
    assert failed["level"] == "warning" and "no such table" in failed["error"], failed
    [line] = requests_in(entries)
    assert line["status"] == 404 and line["path"] == path.decode()
    assert exchange(own_server, get(path)).status == 404  # repaired: serving again


def test_crash_after_the_answer_started_cuts_it_short(own_server: ServerProcess) -> None:
    # A directory posing as a stored result: the headers are out when reading it fails.
    signed = data_dir(own_server) / "signed" / "gpg"
    sha1 = "cd" * 20
    (signed / sha1).mkdir(parents=True)
    (signed / f"{sha1}.sha1").write_text(f"{'ef' * 20} {(signed / sha1).stat().st_size}")
    try:
        start = marker(own_server)
        answer = exchange(own_server, get(f"/sign/gpg/{sha1}".encode()))
        entries = logged_since(own_server, start)
    finally:
        (signed / f"{sha1}.sha1").unlink()
        (signed / sha1).rmdir()
    assert answer.status == 200 and not answer.complete  # the client sees it is cut short
    [crash] = crash_lines(entries)
    assert "IsADirectoryError" in crash["error"] and "Traceback" in crash["traceback"]
    [line] = requests_in(entries)
    assert line["status"] == 500


# -- a bounded fuzz -------------------------------------------------------------------------------
def _noise(rng: random.Random, n: int) -> bytes:
    return bytes(rng.randrange(256) for _ in range(n))


def _pct(data: bytes) -> bytes:
    return b"".join(b"%%%02X" % b for b in data)


def fuzz_request(rng: random.Random, token: bytes, sp: ServerProcess) -> bytes:
    """One malformed but complete request: the server never needs more bytes to answer it."""
    kind = rng.randrange(11)
    if kind == 10:  # an issuer's junk form
        content_type = rng.choice(
            [
                b"multipart/form-data",
                b"multipart/form-data; boundary=xx",
                b"application/x-www-form-urlencoded",
            ]
        )
        charset = rng.choice([b"", b"; charset=latin-1", b"; charset=junk", b"; charset=utf-16"])
        return mint_request(sp, content_type + charset, _noise(rng, rng.randrange(0, 100)))
    if kind == 0:  # percent-encoded junk in the format name
        name = b"gp" + _pct(_noise(rng, rng.randrange(1, 8)))
        return (
            get(b"/sign/%s/%s" % (name, SHA1.encode())) if rng.random() < 0.5 else upload_to(rng, token, name)
        )
    if kind == 1:  # raw junk in the request target
        return (
            b"GET /sign/"
            + _noise(rng, rng.randrange(1, 12)).replace(b"\r\n", b"")
            + b" HTTP/1.1\r\nHost: x\r\n\r\n"
        )
    if kind == 2:  # junk method
        return _noise(rng, rng.randrange(1, 10)).replace(b"\r\n", b"") + b" / HTTP/1.1\r\nHost: x\r\n\r\n"
    if kind == 3:  # junk header line
        junk = _noise(rng, rng.randrange(1, 30)).replace(b"\r\n", b"").replace(b"\n", b"")
        return b"GET /__heartbeat__ HTTP/1.1\r\nHost: x\r\n" + junk + b"\r\n\r\n"
    if kind == 4:  # bad Content-Length
        value = rng.choice([b"-1", b"abc", b"1 2", b"0x10", b"", b"99999999999999999999999"])
        return b"POST /sign/gpg HTTP/1.1\r\nHost: x\r\nContent-Length: " + value + b"\r\n\r\n"
    if kind == 5:  # a chunked body with a junk chunk, sent whole
        return (
            b"POST /sign/gpg HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: multipart/form-data; boundary=xx\r\n\r\n"
            + _noise(rng, 4).hex().encode()
            + b"\r\n"
            + _noise(rng, 8)
            + b"\r\n0\r\n\r\n"
        )
    if kind == 6:  # a junk token
        return upload_to(rng, _noise(rng, rng.randrange(0, 600)).replace(b"\r\n", b"x"), b"gpg")
    if kind == 7:  # a junk multipart body
        return post(b"/sign/gpg", b"--xx\r\n" + _noise(rng, rng.randrange(0, 400)) + b"\r\n--xx--\r\n")
    if kind == 8:  # a body that does not decode
        encoding = rng.choice([b"gzip", b"deflate", b"br", b"zstd", b"gzip, deflate", b"x-junk"])
        return post(
            b"/sign/gpg", _noise(rng, rng.randrange(1, 200)), b"Content-Encoding: " + encoding + b"\r\n"
        )
    # a junk X-Sealbox-Wait
    extra = b"X-Sealbox-Wait: " + rng.choice([b"nan", b"inf", b"-1", b"1e999", b"\xff"]) + b"\r\n"
    body = form({"sha1": SHA1.encode(), "token": token})
    return post(b"/sign/gpg", body, extra)


def upload_to(rng: random.Random, token: bytes, fmt: bytes) -> bytes:
    fields = {
        "sha1": rng.choice([SHA1.encode(), b"xyz", _noise(rng, 5)]),
        "filename": b"t.bin",
        "token": token,
    }
    return post(b"/sign/" + fmt, form(fields))


FUZZ_REQUESTS = 300


def test_fuzz(gpg_server: ServerProcess, tmp_path: Path) -> None:
    rng = random.Random(20240611)
    token = gpg_server.token().encode()
    start = marker(gpg_server)
    statuses = []
    for _ in range(FUZZ_REQUESTS):
        request = fuzz_request(rng, token, gpg_server)
        answer = exchange(gpg_server, request)  # asserts a status line came back
        assert answer.status < 500, (request[:300], answer)
        assert_clean_headers(answer)
        statuses.append(answer.status)
    entries = logged_since(gpg_server, start)  # asserts every line is JSON
    assert not crash_lines(entries) and not [e for e in entries if "traceback" in e]
    assert sorted(e["status"] for e in requests_in(entries)) == sorted(statuses)
    # Still serving: a real signing round trip.
    p = tmp_path / "after-fuzz.txt"
    p.write_bytes(b"still signing after the fuzz " * 8)
    with gpg_server.client() as c:
        assert c.sign(p, ["gpg"]).ok


# -- a body that stops coming ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def impatient_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server that gives up on a silent upload body after 2 s, and takes gpg uploads up to
    SMALL_LIMIT bytes."""
    d = Deployment.create(tmp_path_factory.mktemp("impatient") / "dep", "dep", ["gpg"])
    text = d.config.read_text().replace("[server]\n", "[server]\nbody_timeout = 2.0\n", 1)
    d.config.write_text(text.replace("[formats.gpg]\n", f"[formats.gpg]\nmax_filesize = {SMALL_LIMIT}\n", 1))
    sp = start_server(d)
    yield sp
    sp.stop()


def _stalled(sp: ServerProcess, first: bytes, later: bytes) -> Answer:
    """Send ``first``, then (in a packet of its own, once the server has read the first)
    ``later``, then nothing more; read the answer."""
    ctx = ssl.create_default_context(cafile=str(sp.deployment.ca))
    with (
        socket.create_connection(("127.0.0.1", sp.port), timeout=CAP) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(first)
        if later:
            tls.sendall(later)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = tls.recv(65536)
            assert chunk, f"connection closed without an answer: {buf!r}"
            buf += chunk
    head = buf.partition(b"\r\n\r\n")[0]
    return Answer(int(head.split()[1]), head, b"", True)


def test_a_silent_upload_body_is_answered_408(impatient_server: ServerProcess) -> None:
    body = form({"token": impatient_server.token().encode()})
    answer = _stalled(impatient_server, post(b"/sign/gpg", body)[: -len(body) // 2], b"")
    assert answer.status == 408 and "stalled" in (answer.header("X-Sealbox-Error") or "")


def test_a_bad_chunk_after_the_headers_is_answered(impatient_server: ServerProcess) -> None:
    # aiohttp drops a body whose framing breaks in a later packet without telling the handler;
    # the idle bound is what answers it.
    head = (
        b"POST /sign/gpg HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: multipart/form-data; boundary=xx\r\n\r\n4\r\n--xx\r\n"
    )
    answer = _stalled(impatient_server, head, b"ZZ\r\nabc\r\n0\r\n\r\n")
    assert 400 <= answer.status < 500


def _closed_by_server(sp: ServerProcess, first: bytes) -> bool:
    """Send ``first`` (maybe nothing) on a new connection, then nothing: True if the server
    closes it (well within CAP), False if it is still open at CAP."""
    ctx = ssl.create_default_context(cafile=str(sp.deployment.ca))
    with (
        socket.create_connection(("127.0.0.1", sp.port), timeout=CAP) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(first)
        try:
            while tls.recv(65536):
                pass
        except TimeoutError:
            return False
        except (ssl.SSLError, ConnectionError):
            pass
    return True


@pytest.fixture(scope="module")
def hasty_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server that closes a connection with no request head 2 s after accepting it (a server
    of its own: every connection to it must ask at once)."""
    d = Deployment.create(tmp_path_factory.mktemp("hasty") / "dep", "dep", ["gpg"])
    d.config.write_text(d.config.read_text().replace("[server]\n", "[server]\nheader_timeout = 2.0\n", 1))
    sp = start_server(d)
    yield sp
    sp.stop()


@pytest.mark.parametrize(
    "first", [b"", b"GET /__lbheartbeat__ HTTP/1.1\r\nHost: x\r\n"], ids=["silent", "slow head"]
)
def test_a_connection_that_sends_no_request_is_closed(hasty_server: ServerProcess, first: bytes) -> None:
    start = marker(hasty_server)
    assert _closed_by_server(hasty_server, first)
    closed = [e for e in logged_since(hasty_server, start) if e.get("event") == "no_request"]
    assert len(closed) == 1 and closed[0]["reason"] == "no request within 2 s", closed


def _padded_form(token: bytes, padding: int) -> bytes:
    """A valid gpg upload preceded by a part of an unknown name, ``padding`` bytes long."""
    data = f"padded {uuid.uuid4()}".encode() * 4
    sha1 = hashlib.sha1(data, usedforsecurity=False).hexdigest().encode()
    pad = b'--xx\r\nContent-Disposition: form-data; name="padding"\r\n\r\n' + b"p" * padding + b"\r\n"
    return pad + form({"sha1": sha1, "filename": b"t.bin", "token": token, "nonce": b""}, data)


@pytest.mark.parametrize("framing", ["chunked", "deflate"])
def test_a_body_without_a_length_is_bounded_too(impatient_server: ServerProcess, framing: str) -> None:
    body = _padded_form(impatient_server.token().encode(), 2 * SMALL_LIMIT)
    head = b"POST /sign/gpg HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=xx\r\n"
    if framing == "chunked":
        chunks = [body[i : i + 8192] for i in range(0, len(body), 8192)]
        request = head + b"Transfer-Encoding: chunked\r\n\r\n"
        request += b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    else:  # a small body on the wire that inflates past the limit
        packed = zlib.compress(body, 9)
        assert len(packed) < SMALL_LIMIT
        request = head + b"Content-Encoding: deflate\r\nContent-Length: %d\r\n\r\n" % len(packed) + packed
    answer = exchange(impatient_server, request)
    assert answer.status == 413 and "File too large" in (answer.header("X-Sealbox-Error") or ""), answer
    # the same form, under the limit, is signed
    assert (
        exchange(
            impatient_server, post(b"/sign/gpg", _padded_form(impatient_server.token().encode(), 10))
        ).status
        == 202
    )


@pytest.mark.parametrize("field", [b"filename", b"token", b"sha1", b"nonce"])
def test_no_field_may_follow_filedata(gpg_server: ServerProcess, field: bytes) -> None:
    """What was checked when filedata began is what is used: a later part may not replace a
    name that allowed_filenames would refuse, or the token the signing log names the issuer by."""
    token = gpg_server.token().encode()
    data = f"late field {uuid.uuid4()}".encode() * 4
    sha1 = hashlib.sha1(data, usedforsecurity=False).hexdigest().encode()
    late = {b"filename": b"../evil\r\nX: y", b"token": b"garbage", b"sha1": sha1, b"nonce": b""}[field]
    body = form({"sha1": sha1, "filename": b"t.bin", "token": token, "nonce": b""}, data)
    body = body[: -len(b"--xx--\r\n")]
    body += b'--xx\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n--xx--\r\n' % (field, late)
    answer = exchange(gpg_server, post(b"/sign/gpg", body))
    assert answer.status == 400, answer
    assert answer.header("X-Sealbox-Error") == f"field {field.decode()} after filedata"
    assert answer.header("X-Sealbox-Refusal") == "malformed"


def test_a_late_sha1_may_follow_filedata_once(gpg_server: ServerProcess) -> None:
    token = gpg_server.token().encode()
    data = f"late sha1 {uuid.uuid4()}".encode() * 4
    sha1 = hashlib.sha1(data, usedforsecurity=False).hexdigest().encode()
    body = form({"filename": b"t.bin", "token": token, "nonce": b""}, data)[: -len(b"--xx--\r\n")]
    late = b'--xx\r\nContent-Disposition: form-data; name="sha1"\r\n\r\n%s\r\n' % sha1
    assert exchange(gpg_server, post(b"/sign/gpg", body + late + b"--xx--\r\n")).status == 202
    twice = exchange(gpg_server, post(b"/sign/gpg", body + late + late + b"--xx--\r\n"))
    assert twice.status == 400 and twice.header("X-Sealbox-Error") == "field sha1 after filedata"


@pytest.mark.parametrize("name", [b"evil.bin\n", b"evil\r\n.bin", b"tab\t.bin", b"bell\x07.bin"])
def test_control_characters_in_a_filename_are_refused(gpg_server: ServerProcess, name: bytes) -> None:
    token = gpg_server.token().encode()
    data = f"named {uuid.uuid4()}".encode() * 4
    sha1 = hashlib.sha1(data, usedforsecurity=False).hexdigest().encode()
    answer = exchange(
        gpg_server, post(b"/sign/gpg", form({"sha1": sha1, "filename": name, "token": token}, data))
    )
    assert answer.status == 403 and answer.header("X-Sealbox-Refusal") == "filename", answer
    assert_clean_headers(answer)


def test_the_same_upload_twice_at_once_is_signed_once(gpg_server: ServerProcess) -> None:
    """Uploads of the same content whose forms were read side by side: the first is signed,
    the others (finished once its result is there) are not signed again: the check made
    before filedata is made again once it is read (a result is a function of the content)."""
    token = gpg_server.token().encode()
    data = f"twice at once {uuid.uuid4()}".encode() * 64
    sha1 = hashlib.sha1(data, usedforsecurity=False).hexdigest()
    fields = {"sha1": sha1.encode(), "filename": b"t.bin", "token": token}
    # each answered once its job is done, with the result (a job of its own would be logged first)
    request = post(b"/sign/gpg", form(fields, data), b"X-Sealbox-Wait: 20\r\n")

    def jobs() -> list[dict[str, Any]]:
        return [e for e in gpg_server.log_lines() if e.get("event") == "job" and e.get("sha1") == sha1]

    ctx = ssl.create_default_context(cafile=str(gpg_server.deployment.ca))
    with contextlib.ExitStack() as stack:
        conns = []
        for _ in range(3):
            raw = stack.enter_context(socket.create_connection(("127.0.0.1", gpg_server.port), timeout=CAP))
            conns.append(stack.enter_context(ctx.wrap_socket(raw, server_hostname="127.0.0.1")))
        for tls in conns:  # every form but its last bytes: filedata has begun on each
            tls.sendall(request[:-20])
        for tls in conns:  # one after the other: the first's result is there when the next ends
            tls.sendall(request[-20:])
            assert tls.recv(65536).split(b" ", 2)[1] == b"200"
    marker(gpg_server)
    assert len(jobs()) == 1, jobs()


def test_non_ascii_credentials_are_401(gpg_server: ServerProcess) -> None:
    body = b"slave_ip=127.0.0.1&duration=60"
    request = (
        b"POST /token HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        b"Authorization: Basic \xc3\xa9\xc3\xa9\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: %d\r\n\r\n" % len(body)
    ) + body
    assert exchange(gpg_server, request).status == 401


@pytest.mark.parametrize("ip", ["fe80::1%a!b", "fe80::1%a b", "fe80::1%a:b"])
def test_a_token_is_never_minted_for_an_unusable_zone(gpg_server: ServerProcess, ip: str) -> None:
    body = b"slave_ip=" + urllib.parse.quote(ip).encode() + b"&duration=60"
    answer = exchange(gpg_server, mint_request(gpg_server, b"application/x-www-form-urlencoded", body))
    assert answer.status == 400 and "slave_ip" in (answer.header("X-Sealbox-Error") or ""), answer


def test_a_zone_of_letters_and_digits_is_minted(gpg_server: ServerProcess) -> None:
    body = b"slave_ip=" + urllib.parse.quote("fe80::1%eth0").encode() + b"&duration=60"
    answer = exchange(gpg_server, mint_request(gpg_server, b"application/x-www-form-urlencoded", body))
    assert answer.status == 200 and answer.body.startswith(b"fe80::1%eth0:"), answer


def test_a_silent_token_request_is_answered_408(impatient_server: ServerProcess) -> None:
    body = b"slave_ip=127.0.0.1&duration=60"
    request = mint_request(impatient_server, b"application/x-www-form-urlencoded", body)
    answer = _stalled(impatient_server, request[:-10], b"")
    assert answer.status == 408 and "stalled" in (answer.header("X-Sealbox-Error") or "")


def test_a_small_result_the_disk_cannot_hold_fails_as_retryable(tmp_path: Path) -> None:
    """A small upload is kept in memory and written with its result in one SQLite commit at
    the job's end. When that write fails (RLIMIT_FSIZE stands in for a full disk, as above),
    the job fails as the server's trouble, retryable and named, not as an internal error
    with a traceback; once there is room, the same file signs."""
    d = Deployment.create(tmp_path / "dep", "dep", ["gpg"])
    sp = start_server(d)
    try:
        src = tmp_path / "small.bin"
        src.write_bytes(os.urandom(200_000))  # under SMALL_FILE: a row, not a file
        soft, hard = resource.prlimit(sp.proc.pid, resource.RLIMIT_FSIZE)
        resource.prlimit(sp.proc.pid, resource.RLIMIT_FSIZE, (150_000, hard))
        start = marker(sp)
        with sp.client(timeout=30) as client:
            outcome = client.sign(src, ["gpg"], tmp_path / "small.asc")
        assert not outcome.ok and "server storage error: small.sqlite3:" in str(outcome.error), outcome.error
        entries = logged_since(sp, start)
        assert not crash_lines(entries)
        jobs = [e for e in entries if e.get("event") == "job"]
        assert [e["outcome"] for e in jobs] == ["failed"] and "Errno" not in jobs[0]["reason"], jobs
        resource.prlimit(sp.proc.pid, resource.RLIMIT_FSIZE, (soft, hard))
        with sp.client(timeout=30) as client:
            assert client.sign(src, ["gpg"], tmp_path / "small.asc").ok
    finally:
        sp.stop()


def test_an_upload_the_disk_cannot_hold_is_a_5xx(tmp_path: Path) -> None:
    """A full disk is the server's trouble, not the input's: a clean 507 naming the cause (a
    client tries another server), never a crash, nothing left in tmp/, and the server goes on.
    The file size limit (RLIMIT_FSIZE, EFBIG) stands in for a full disk (ENOSPC): the same
    write fails the same way, and no test may fill a real disk."""
    d = Deployment.create(tmp_path / "dep", "dep", ["mar"])  # a format that keeps big uploads
    sp = start_server(d)
    try:
        soft, hard = resource.prlimit(sp.proc.pid, resource.RLIMIT_FSIZE)
        resource.prlimit(sp.proc.pid, resource.RLIMIT_FSIZE, (1 << 20, hard))
        big = os.urandom(2 << 20)  # spooled to a file past SMALL_FILE: fails at 1 MiB
        sha1 = hashlib.sha1(big, usedforsecurity=False).hexdigest().encode()
        fields = {"sha1": sha1, "filename": b"big.bin", "token": sp.token().encode()}
        start = marker(sp)
        answer = exchange(sp, post(b"/sign/mar", form(fields, big)))
        assert answer.status == 507, answer
        assert answer.header("X-Sealbox-Error") == "the server cannot store the upload now: File too large"
        entries = logged_since(sp, start)
        assert not crash_lines(entries) and [e["status"] for e in requests_in(entries)] == [507]
        assert not any((data_dir(sp) / "tmp").iterdir())
        resource.prlimit(sp.proc.pid, resource.RLIMIT_FSIZE, (soft, hard))
        assert exchange(sp, post(b"/sign/mar", form(fields, big))).status == 202  # (not a MAR: refused later)
    finally:
        sp.stop()
