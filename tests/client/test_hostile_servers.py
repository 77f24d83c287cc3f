"""Our client against servers that answer wrongly (stand-ins with the deployment's certificate,
beside a real server): a hostile header, an answer without end, a proof that is not one. Each
is a clean per-file outcome, the client goes on to the real server where there is one, and no
unproven or partial result is left where the caller asked for it."""

from __future__ import annotations

import base64
import hashlib
import json
import ssl
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from aiohttp import web

from sealbox.client import Server, SigningClient, SigningRefused
from sealbox.client._aio import ANSWER_LIMIT
from sealbox.signlog.log import Checkpoint
from tests.servers import ServerProcess, ThreadedApp

SIGNATURE = b"-----BEGIN PGP SIGNATURE-----\nnot really\n-----END PGP SIGNATURE-----\n"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
def stand_in(gpg_server: ServerProcess) -> Iterator[Callable[[Handler], Server]]:
    """``start(handler)``: a stand-in answering every request with ``handler``, over TLS with
    the real server's certificate (the client trusts it); its address."""
    tls = gpg_server.deployment.root / "tls"
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tls / "server.pem", tls / "server.key")
    running: list[ThreadedApp] = []

    def start(handler: Handler) -> Server:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", handler)
        running.append(ThreadedApp(app, ctx).__enter__())
        return Server("127.0.0.1", running[-1].port)

    yield start
    for app in running:
        app.__exit__()


def _payload(tmp: Path, name: str = "p.txt") -> Path:
    p = tmp / name
    p.write_bytes(b"signed through a stand-in\n" * 8)
    return p


def _signed(headers: dict[str, str] | None = None) -> web.Response:
    digest = hashlib.sha1(SIGNATURE, usedforsecurity=False).hexdigest()
    return web.Response(body=SIGNATURE, headers={"X-SHA1-Digest": digest, **(headers or {})})


@pytest.mark.parametrize("index", ["\u00b2", "9" * 5000, "-1", "0x10"])
def test_a_hostile_log_index_is_ignored(
    gpg_server: ServerProcess, stand_in: Callable[[Handler], Server], tmp_path: Path, index: str
) -> None:
    """(A Unicode digit and 5000 digits crashed the whole batch with a ValueError.)"""

    async def answer(request: web.Request) -> web.StreamResponse:
        await request.read()
        return _signed({"X-Sealbox-Log-Index": index})

    fake = stand_in(answer)
    with SigningClient([fake], gpg_server.deployment.ca, gpg_server.token()) as client:
        outcome = client.sign(_payload(tmp_path), ["gpg"])
    assert outcome.ok, outcome.error


def _proof(entry: object) -> dict[str, object]:
    """A /log/proof answer for ``entry`` in a tree of one, its checkpoint well formed."""
    data = json.dumps(entry).encode()
    root = hashlib.sha256(b"\x00" + data).digest()
    checkpoint = Checkpoint("stand-in", 1, root, 0, bytes(64))
    return {
        "entry": base64.b64encode(data).decode(),
        "hashes": [],
        "tree_size": 1,
        "checkpoint": checkpoint.to_json(),
    }


@pytest.mark.parametrize("how", ["input not an object", "another file", "not JSON"])
def test_a_proof_that_fails_leaves_nothing_behind(
    gpg_server: ServerProcess, stand_in: Callable[[Handler], Server], tmp_path: Path, how: str
) -> None:
    """With --log-proof a result whose proof fails is not written, not even over the input
    (signing in place), and not cached; a later run with the cache is not served from it."""
    entry: object = {"index": 0, "format": "gpg", "input": "x", "output": {}}
    if how == "another file":
        entry = {"index": 0, "format": "gpg", "input": {"sha1": "0" * 40}, "output": {"sha1": "1" * 40}}

    async def answer(request: web.Request) -> web.StreamResponse:
        await request.read()
        if request.path.startswith("/log/proof/"):
            if how == "not JSON":
                return web.Response(text="[" * 100_000)
            return web.json_response(_proof(entry))
        return _signed({"X-Sealbox-Log-Index": "0"})

    fake = stand_in(answer)
    cache = tmp_path / "cache"
    payload = _payload(tmp_path)
    before = payload.read_bytes()
    for dest in (tmp_path / "out.asc", payload):  # beside it, and in place
        with SigningClient(
            [fake], gpg_server.deployment.ca, gpg_server.token(), cache_dir=cache, log_proof=True
        ) as c:
            outcome = c.sign(payload, ["gpg"], dest)
        assert isinstance(outcome.exception, SigningRefused), outcome.error
        assert "signing log proof failed" in (outcome.error or ""), outcome.error
        assert "Traceback" not in (outcome.error or "")
    assert not (tmp_path / "out.asc").exists() and payload.read_bytes() == before
    assert not cache.exists() or not any(cache.rglob("*"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.txt"]  # no scratch file left


@pytest.mark.parametrize("status", [200, 503])
def test_an_answer_without_end_is_a_bad_answer(
    gpg_server: ServerProcess, stand_in: Callable[[Handler], Server], tmp_path: Path, status: int
) -> None:
    """A result (or a refusal) that never ends fills neither the disk nor the memory: past
    what it could be, the client drops it and goes on to the next server."""
    sent = [0]

    async def endless(request: web.Request) -> web.StreamResponse:
        await request.read()
        headers = {"X-SHA1-Digest": "0" * 40} if status == 200 else {}
        response = web.StreamResponse(status=status, headers=headers)
        await response.prepare(request)
        chunk = b"x" * 65536
        try:
            while sent[0] < 4 * 1024 * 1024 * 1024:  # stops only when the client goes
                await response.write(chunk)
                sent[0] += len(chunk)
        except (ConnectionError, RuntimeError):
            pass
        return response

    fake = stand_in(endless)
    with SigningClient(
        [fake, gpg_server.server], gpg_server.deployment.ca, gpg_server.token(), shuffle=False
    ) as c:
        outcome = c.sign(_payload(tmp_path), ["gpg"])
    assert outcome.ok and outcome.server == gpg_server.server.url, outcome.error
    most = 2 * len(_payload(tmp_path).read_bytes()) + 64 * 1024 * 1024 if status == 200 else ANSWER_LIMIT
    assert sent[0] < most + 64 * 1024 * 1024  # what the socket buffers hold beyond what was read


def test_a_waited_upload_whose_input_left_is_sent_again(
    gpg_server: ServerProcess, stand_in: Callable[[Handler], Server], tmp_path: Path
) -> None:
    """A plain 404 to a waited upload (the job found its input gone: nothing is remembered)
    means "upload it": sent again, not taken as a refusal."""
    posts: list[int] = []

    async def answer(request: web.Request) -> web.StreamResponse:
        await request.read()
        posts.append(1)
        return web.Response(status=404) if len(posts) == 1 else _signed()

    fake = stand_in(answer)
    with SigningClient([fake], gpg_server.deployment.ca, gpg_server.token()) as client:
        outcome = client.sign(_payload(tmp_path), ["gpg"])
    assert outcome.ok and len(posts) == 2, outcome.error
