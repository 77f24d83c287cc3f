"""``sealbox sign-image``: sign container images in their registry (format ``sigstore``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ._common import fail, server_options, small_text


@click.command("sign-image")
@server_options
@click.option(
    "--identity",
    default=None,
    help="The docker-reference to sign (default: the image's name, with its tag if one is given).",
)
@click.option(
    "--insecure-registry",
    is_flag=True,
    help="Talk to the registry over plain HTTP (a test registry on loopback only).",
)
@click.option(
    "--registry-ca",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help="CA bundle for the registry's TLS (default: the system's).",
)
@click.option(
    "--registry-auth-file",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help="Registry logins (or the credential helpers to ask), as `skopeo login`/`podman login`/"
    "`docker login` write them (default: "
    "$REGISTRY_AUTH_FILE, $XDG_RUNTIME_DIR/containers/auth.json, ~/.config/containers/auth.json, "
    "~/.docker/config.json, the first that exists).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=600.0,
    show_default=True,
    help="Seconds allowed for the signing; each registry request gets at most 60.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
@click.argument("images", nargs=-1, required=True)
def sign_image(
    hosts: tuple[str, ...],
    ca: Path,
    token_file: Path,
    identity: str | None,
    insecure_registry: bool,
    registry_ca: Path | None,
    registry_auth_file: Path | None,
    timeout: float,
    as_json: bool,
    images: tuple[str, ...],
) -> None:
    """Sign IMAGES (REGISTRY/REPO:TAG or REGISTRY/REPO@sha256:...; Docker Hub is docker.io) by
    manifest digest and push each signature to the registry as a cosign attachment (verify with
    skopeo/podman and a sigstoreSigned policy; see docs/formats/container.md)."""
    from ..client import ClientError, ImageRef, RegistryAuth, SigningClient, parse_host
    from ..errors import SealboxError

    if identity is not None and len(images) != 1:
        fail("--identity can only be used when signing a single image", 2)
    token = small_text(token_file).strip()
    try:
        servers = [parse_host(h) for h in hosts]
        refs = [ImageRef.parse(i) for i in images]
        auth_file = registry_auth_file or RegistryAuth.default_file()
        auth = RegistryAuth.load(auth_file) if auth_file is not None else None
    except OSError as e:
        fail(f"cannot read {e.filename or token_file}: {e.strerror}", 2)
    except SealboxError as e:
        fail(str(e), 2)
    if not ca.is_file():
        fail(f"certificate not found: {ca}", 2)
    from ..client import sign_image as sign

    results: list[dict[str, object]] = []
    try:
        client = SigningClient(servers, ca, token, timeout=timeout)
    except SealboxError as e:  # a CA bundle that is not one
        fail(str(e), 2)
    with client:
        for ref in refs:
            try:
                s = sign(
                    client,
                    ref,
                    identity=identity,
                    insecure_registry=insecure_registry,
                    registry_ca=registry_ca,
                    registry_auth=auth,
                )
            except ClientError as e:
                results.append({"image": str(ref), "error": str(e)})
                click.echo(f"sealbox: error: failed to sign {ref}: {e}", err=True)
                continue
            results.append(
                {"image": str(ref), "digest": s.digest, "identity": s.identity, "attachment": s.attachment,
                 "added": s.added, "server": s.server}
            )  # fmt: skip
            if not as_json:
                what = "signed" if s.added else "already signed"
                click.echo(f"{what} {s.image.name}@{s.digest} as {s.identity} -> {s.attachment}", err=True)
    ok = all("error" not in r for r in results)
    if as_json:
        json.dump({"ok": ok, "images": results}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    sys.exit(0 if ok else 1)
