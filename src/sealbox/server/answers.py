"""How the server says no: one place turns a reason into a clean 4xx/5xx whose header and body
are printable ASCII (reasons quote what clients sent; a header must never carry it raw)."""

from __future__ import annotations

from aiohttp import web

from ..wire import REFUSAL_HEADER

__all__ = ["MAX_REASON", "REFUSAL", "refuse", "safe_text"]

#: why an upload was refused, for the metrics (one of :data:`.metrics.REFUSALS`), and in
#: :data:`~sealbox.wire.REFUSAL_HEADER` for clients (a refused token told from a refused input)
REFUSAL = web.ResponseKey("refusal", str)


MAX_REASON = 1000  # far below any client's header limit (aiohttp 8 KiB, h11 16 KiB)


def safe_text(text: str, limit: int = MAX_REASON) -> str:
    """``text`` as printable ASCII (anything else escaped: ``\\r``, ``\\x00``, ``\\xe9``),
    at most ``limit`` characters: reasons quote what a client sent, and a header must not."""
    out = text.encode("unicode_escape").decode("ascii")
    return out if len(out) <= limit else out[: limit - 3] + "..."


def refuse(
    status: int,
    reason: str,
    headers: dict[str, str] | None = None,
    refusal: str | None = None,
    close: bool = False,
) -> web.Response:
    """The one way a refusal is answered: the reason in ``X-Sealbox-Error`` and the body;
    ``refusal`` sorts a refused upload (one of a fixed set of words) for the metrics and, in
    :data:`~sealbox.wire.REFUSAL_HEADER`, for the client. ``close``: the connection ends with
    this answer (what is left of the request is not read)."""
    reason = safe_text(reason)
    h = {"X-Sealbox-Error": reason, **(headers or {})}
    if refusal is not None:
        h[REFUSAL_HEADER] = refusal
    response = web.Response(status=status, text=reason + "\n", headers=h)
    if refusal is not None:
        response[REFUSAL] = refusal
    if close:
        response.force_close()
    return response
