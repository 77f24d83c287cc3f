from __future__ import annotations

from pathlib import Path

import click

from ._common import fail


@click.command()
@click.option("--format", "fmt", required=True, help="Wire format name of the output.")
@click.option(
    "--signature",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=None,
    help="Detached signature (gpg .asc, widevine .sig); FILE is then the signed data.",
)
@click.option(
    "--public",
    "public_dir",
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    required=True,
    help="A deployment's public/ folder.",
)
@click.argument("file", type=click.Path(path_type=Path, exists=True, dir_okay=False))
def verify(fmt: str, signature: Path | None, public_dir: Path, file: Path) -> None:
    """Verify a signed output with the format's independent verifier."""
    from ..client import detached_suffix, wire_name
    from ..errors import SealboxError
    from ..formats import signer_class

    wire = wire_name(fmt)
    for given in (file, signature):
        if given is not None and not given.is_file():  # a FIFO or a device: never read (it may not end)
            fail(f"not a regular file: {given}", 2)
    try:
        cls = signer_class(wire)
        if detached_suffix(wire):
            sig = signature or file.with_name(file.name + detached_suffix(wire))
            if not sig.is_file():
                fail(f"{fmt} signatures are detached: pass --signature (looked for {sig})", 2)
            how = cls.verify(wire, sig, file, public_dir)
        else:
            how = cls.verify(wire, file, None, public_dir)
    except SealboxError as e:
        fail(f"{file}: NOT verified ({fmt}): {e}")
    click.echo(f"{file}: verified ({fmt}) by {how}")
