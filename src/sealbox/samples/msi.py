"""Unsigned MSI containers (demo, bench, tests): the writer the Authenticode signer also uses
for its start-up probe, :func:`sealbox.formats._msi.write_msi`."""

from ..formats._msi import write_msi

__all__ = ["write_msi"]
