from __future__ import annotations

from pathlib import Path

import click

from ..errors import SealboxError
from ._common import fail


@click.command()
@click.option(
    "--dev",
    "dev_dir",
    type=click.Path(path_type=Path),
    required=True,
    help="Create a complete dev deployment in this folder.",
)
@click.option("--level", type=click.Choice(["dep", "nightly", "release"]), default="dep", show_default=True)
@click.option("--listen", default=None, help="HOST:PORT (default 127.0.0.1:9110/9111/9112 by level).")
@click.option("--format", "formats", multiple=True, help="Only these formats (default: every one available).")
@click.option(
    "--hsm",
    is_flag=True,
    help="Generate the formats' keys inside a SoftHSM token (DIR/hsm), non-extractable; "
    "macOS signing, whose library has no PKCS#11, keeps a key file.",
)
def init(dev_dir: Path, level: str, listen: str | None, formats: tuple[str, ...], hsm: bool) -> None:
    """Create a dev deployment: config, TLS CA, token credentials, encrypted keys (or an HSM token)."""
    from ..deploy.dev import init_dev

    try:
        config = init_dev(dev_dir, level, listen, list(formats) or None, hsm)
    except SealboxError as e:
        fail(str(e), 2)
    click.echo(f"created {config}")
    click.echo(f"  start:   sealbox serve --config {config} --passphrase-file {dev_dir / 'passphrases'}")
    click.echo(f"  CA:      {dev_dir / 'tls/ca.pem'}   token issuer: {dev_dir / 'token-auth'}")
    audit = f"sealbox log verify {dev_dir / 'data/log'} --public {dev_dir / 'public/signlog.pub'}"
    click.echo(f"  log:     {audit}")
    if hsm:
        click.echo(f"  HSM:     SOFTHSM2_CONF={(dev_dir / 'hsm/softhsm2.conf').resolve()}")
