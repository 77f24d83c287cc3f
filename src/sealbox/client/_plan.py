"""Which formats run in which order, and where each result goes (from :data:`sealbox.wire.TABLE`)."""

from __future__ import annotations

from collections.abc import Sequence

from ..wire import ALIASES, TABLE

#: detached signatures of the final bytes go last, in this order (as signtool does)
LAST = tuple(f.name for f in sorted((f for f in TABLE if f.last), key=lambda f: f.last))
#: name -> suffix of the detached signature a client writes next to the file
DETACHED = {f.name: f.detached_suffix for f in TABLE if f.detached_suffix}


def wire_name(fmt: str) -> str:
    """The name a server knows ``fmt`` by (an alias becomes its wire name)."""
    return ALIASES.get(fmt, fmt)


def detached_suffix(fmt: str) -> str:
    """``.asc``/``.sig`` for formats whose result is a detached signature, else ''."""
    return DETACHED.get(fmt, "")


def order_formats(formats: Sequence[str]) -> list[str]:
    """Keep the given order, de-duplicated, with detached/final formats moved last."""
    seen: list[str] = []
    for f in formats:
        if f not in seen:
            seen.append(f)
    head = [f for f in seen if f not in LAST]
    tail = [f for f in LAST if f in seen]
    return head + tail
