"""The signer registry: wire format name -> signer class, imported on demand."""

from __future__ import annotations

import importlib

from ..errors import ConfigError
from ..wire import ALIASES
from .base import FormatSettings, KeyResolver, Signer, SignRequest

__all__ = ["FormatSettings", "KeyResolver", "SignRequest", "Signer", "all_formats", "signer_class"]

# wire name -> "module:Class". Aliases map to the same class.
_REGISTRY: dict[str, str] = {
    "gpg": "gpg:GpgSigner",
    "sha2signcode": "authenticode:AuthenticodeSigner",
    "sha2signcodestub": "authenticode:AuthenticodeSigner",
    "sha2signcode-v2": "authenticode:AuthenticodeSigner",
    "sha2signcodestub-v2": "authenticode:AuthenticodeSigner",
    "signcode": "authenticode:AuthenticodeSigner",
    "osslsigncode": "authenticode:AuthenticodeSigner",
    "mar": "mar:MarSigner",
    "mar_sha384": "mar:MarSigner",
    "jar": "android:AndroidSigner",
    "focus-jar": "android:AndroidSigner",
    "emevoucher": "emevoucher:EmeVoucherSigner",
    "widevine": "widevine:WidevineSigner",
    "widevine_blessed": "widevine:WidevineSigner",
    "dmg": "macos:MacAppSigner",
}


def all_formats() -> list[str]:
    """Every wire name whose module is installed, in registry order."""
    out = []
    for name in _REGISTRY:
        try:
            signer_class(name)
        except ConfigError:
            continue
        out.append(name)
    return out


def signer_class(fmt: str) -> type[Signer]:
    target = _REGISTRY.get(ALIASES.get(fmt, fmt))
    if target is None:
        raise ConfigError(f"unknown format '{fmt}'")
    module_name, _, cls_name = target.partition(":")
    try:
        module = importlib.import_module(f"{__name__}.{module_name}")
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith(__name__):
            raise ConfigError(f"format '{fmt}' is not implemented in this build") from None
        raise
    cls: type[Signer] = getattr(module, cls_name)
    return cls


def signer_families(formats: list[str] | None = None) -> list[type[Signer]]:
    """Each implemented signer class once, in registry order (used by dev set-up)."""
    seen: list[type[Signer]] = []
    for name in formats if formats is not None else all_formats():
        cls = signer_class(name)
        if cls not in seen:
            seen.append(cls)
    return seen
