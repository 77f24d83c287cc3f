"""The wire names are listed once and match the signer registry."""

from __future__ import annotations


def test_wire_names_match_the_registry() -> None:
    from sealbox import wire
    from sealbox.formats import _REGISTRY

    assert tuple(_REGISTRY) == wire.FORMATS
    assert set(wire.ALIASES.values()) <= set(wire.FORMATS)
