"""The signer registry: each format family's signer class, imported on demand.

Which names a family serves, and their properties, is :data:`sealbox.wire.TABLE`; here the
family gets its class, through real imports (checked by mypy, found by grep).
"""

from __future__ import annotations

from typing import assert_never

from ..errors import ConfigError
from ..wire import FORMATS, TABLE, Family, lookup
from .base import FormatSettings, KeyResolver, Signer, SignRequest

__all__ = ["FormatSettings", "KeyResolver", "SignRequest", "Signer", "all_formats", "signer_class"]

#: wire name -> family, in table order
_REGISTRY: dict[str, Family] = {f.name: f.family for f in TABLE if f.alias_of is None}


def _import(family: Family) -> type[Signer]:  # noqa: PLR0911 (one return per family)
    """The signer class of ``family``; its module is imported on first use (a server loads
    only the families it serves)."""
    match family:
        case "gpg":
            from .gpg import GpgSigner

            return GpgSigner
        case "authenticode":
            from .authenticode import AuthenticodeSigner

            return AuthenticodeSigner
        case "mar":
            from .mar import MarSigner

            return MarSigner
        case "android":
            from .android import AndroidSigner

            return AndroidSigner
        case "emevoucher":
            from .emevoucher import EmeVoucherSigner

            return EmeVoucherSigner
        case "widevine":
            from .widevine import WidevineSigner

            return WidevineSigner
        case "macos":
            from .macos import MacSigner

            return MacSigner
        case "sigstore":
            from .sigstore import SigstoreSigner

            return SigstoreSigner
        case "rpm":
            from .rpm import RpmSigner

            return RpmSigner
        case "deb":
            from .deb import DebSigner

            return DebSigner
        case "apt":
            from .apt import AptSigner

            return AptSigner
        case _:
            assert_never(family)


def all_formats() -> list[str]:
    """Every wire name whose module is installed, in table order."""
    out = []
    for name in FORMATS:
        try:
            signer_class(name)
        except ConfigError:
            continue
        out.append(name)
    return out


def signer_class(fmt: str) -> type[Signer]:
    """The signer class of ``fmt`` (a wire name or an alias)."""
    row = lookup(fmt)
    if row is None:
        raise ConfigError(f"unknown format '{fmt}'")
    try:
        return _import(row.family)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith(__name__):
            raise ConfigError(f"format '{fmt}' is not implemented in this build") from None
        raise


def signer_families(formats: list[str] | None = None) -> list[type[Signer]]:
    """Each implemented signer class once, in table order (used by dev set-up)."""
    seen: list[type[Signer]] = []
    for name in formats if formats is not None else all_formats():
        cls = signer_class(name)
        if cls not in seen:
            seen.append(cls)
    return seen
