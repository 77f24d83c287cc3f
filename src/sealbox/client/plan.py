"""Which formats run in which order, and where each result goes."""

from __future__ import annotations

from collections.abc import Sequence

from ..wire import ALIASES

# Detached signatures of the final bytes go last, in this order (as signtool does).
LAST = ("widevine", "widevine_blessed", "macapp", "dmg", "gpg")
DETACHED = {"gpg": ".asc", "widevine": ".sig", "widevine_blessed": ".sig"}


def wire_name(fmt: str) -> str:
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
