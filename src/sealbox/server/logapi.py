"""The signing log over HTTP: the latest signed checkpoint, inclusion and consistency proofs.

``GET /log/checkpoint``
    the latest checkpoint: ``origin``, ``size``, ``root`` (hex), ``time`` (ms), ``signature``
    (base64 Ed25519 over the C2SP checkpoint body), ``public_key`` and the signed ``note``.
``GET /log/proof/<index>``
    entry ``index`` (``entry``: base64 of its exact bytes, the leaf) and its inclusion proof
    (``hashes``, hex) against ``checkpoint``, the latest one, made at once if it does not cover
    the entry yet.
``GET /log/consistency/<old>/<new>``
    the consistency proof from the tree of ``old`` entries to that of ``new`` (at most the
    latest checkpoint's size), as hex ``hashes``.

Every answer is JSON; a server without a signing log answers 404.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any

from aiohttp import web

from ..signlog import Checkpoint, LogUnavailable, Recorder, SignLog
from ..wire import log_index
from .answers import refuse

RECORDER = web.AppKey("recorder", Recorder)


def add_routes(app: web.Application, recorder: Recorder | None) -> None:
    """Serve the signing log's checkpoint and proofs (404 when the server keeps no log)."""
    if recorder is not None:
        app[RECORDER] = recorder
    app.router.add_get("/log/checkpoint", checkpoint)
    app.router.add_get("/log/proof/{index}", proof)
    app.router.add_get("/log/consistency/{old}/{new}", consistency)


def _log(request: web.Request) -> SignLog | None:
    recorder = request.app.get(RECORDER)
    return recorder.log if recorder is not None else None


def checkpoint_json(signlog: SignLog, cp: Checkpoint) -> dict[str, Any]:
    return {**cp.to_json(), "public_key": _public(signlog), "note": cp.note(signlog.public)}


def _public(signlog: SignLog) -> str:
    from ..signlog import public_key_text

    return public_key_text(signlog.public)


async def checkpoint(request: web.Request) -> web.Response:
    signlog = _log(request)
    if signlog is None:
        return refuse(404, "this server keeps no signing log")
    cp = signlog.checkpoint
    if cp is None:
        try:
            cp = await asyncio.wrap_future(signlog.covering(0))
        except LogUnavailable as e:
            return refuse(503, str(e))
    return web.json_response(checkpoint_json(signlog, cp))


async def proof(request: web.Request) -> web.Response:
    signlog = _log(request)
    if signlog is None:
        return refuse(404, "this server keeps no signing log")
    index = log_index(request.match_info["index"])
    if index is None:
        return refuse(400, "the index must be a decimal number")
    if index >= signlog.size:
        return refuse(404, f"no entry {index}: the log holds {signlog.size}")
    try:
        cp = await asyncio.wrap_future(signlog.covering(index + 1))
    except LogUnavailable as e:
        return refuse(503, str(e))

    def build() -> dict[str, Any]:
        return {
            "index": index,
            "entry": base64.b64encode(signlog.entry(index)).decode(),
            "tree_size": cp.size,
            "hashes": [h.hex() for h in signlog.tree.inclusion_proof(index, cp.size)],
            "checkpoint": checkpoint_json(signlog, cp),
        }

    return web.json_response(await asyncio.get_running_loop().run_in_executor(None, build))


async def consistency(request: web.Request) -> web.Response:
    signlog = _log(request)
    if signlog is None:
        return refuse(404, "this server keeps no signing log")
    old, new = log_index(request.match_info["old"]), log_index(request.match_info["new"])
    cp = signlog.checkpoint
    if old is None or new is None or not 0 < old <= new:
        return refuse(400, "sizes must be decimal numbers, 0 < old <= new")
    if cp is None or new > cp.size:
        return refuse(404, f"no checkpoint covers {new} entries yet")
    hashes = [h.hex() for h in signlog.tree.consistency_proof(old, new)]
    return web.json_response(
        {"old": old, "new": new, "hashes": hashes, "checkpoint": checkpoint_json(signlog, cp)}
    )
