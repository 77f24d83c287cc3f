"""Per-format figures (filled in with the formats): see bench/formats.py."""

from __future__ import annotations

from typing import Any


def run() -> dict[str, Any]:
    return {}
