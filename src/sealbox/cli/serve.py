from __future__ import annotations

from pathlib import Path

import click

from ..errors import SealboxError
from ._common import fail


@click.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path, dir_okay=False), required=True)
@click.option(
    "--passphrase-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="key-name:passphrase lines (else asked on the terminal).",
)
@click.option("--passphrase-fd", type=int, help="Read key-name:passphrase lines from this inherited fd.")
@click.option("--listen", default=None, help="HOST:PORT, overrides server.listen.")
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Overrides server.data_dir: replicas of one deployment each keep their own.",
)
@click.option("--log-file", type=click.Path(path_type=Path, dir_okay=False), default=None)
def serve(
    config_path: Path,
    passphrase_file: Path | None,
    passphrase_fd: int | None,
    listen: str | None,
    data_dir: Path | None,
    log_file: Path | None,
) -> None:
    """Run a signing server for one cert level (HTTPS only)."""
    from ..keys import PassphraseSource
    from ..server.config import load_config, parse_listen
    from ..server.run import load_signers, run, setup_logging

    setup_logging(log_file)
    try:
        if listen:
            parse_listen(listen)
        cfg = load_config(config_path)
        if data_dir is not None:  # relative to the working folder, as a command-line path is
            server = cfg.server.model_copy(update={"data_dir": data_dir.absolute()})
            cfg = cfg.model_copy(update={"server": server})
        if passphrase_file is not None:
            source = PassphraseSource.from_file(passphrase_file)
        elif passphrase_fd is not None:
            source = PassphraseSource.from_fd(passphrase_fd)
        else:
            source = PassphraseSource.interactive()
        signers = load_signers(cfg, source)
        run(cfg, signers, listen)
    except (SealboxError, ValueError) as e:
        fail(f"not starting: {e}", 2)
    except OSError as e:  # the path it is about, which strerror alone does not say
        where = f": {e.filename}" if e.filename is not None else ""
        fail(f"not starting: {e.strerror or e}{where}", 2)
