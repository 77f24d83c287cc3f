"""``sealbox task init --dev DIR --servers DEP [NIGHTLY RELEASE]``: a worker for dev deployments.

Reads each deployment made by ``sealbox init --dev`` (``sealbox.toml`` for the level, listen
address and formats, ``tls/ca.pem``, ``token-auth``, ``public/gpg.asc``) and writes::

    DIR/worker.toml        the worker config (production worker, artifact store under DIR/store)
    DIR/keys/worker.key    this worker's Ed25519 key (base64 seed, 0600)
    DIR/keys/build.key     the key of the demo ``build`` worker class that signs upstream records
    DIR/sample-<level>/    a sample "small release" task per level (see sealbox.task.demo)
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tomli_w

from ..errors import ConfigError
from . import cot

SCOPE_PREFIX = "project:releng:signing:"
TREE_BASE = "https://hg.example.invalid"
CENTRAL = f"{TREE_BASE}/mozilla-central"
BETA = f"{TREE_BASE}/releases/mozilla-beta"
RELEASE = f"{TREE_BASE}/releases/mozilla-release"
#: allow-listed source trees of the restricted levels in the dev config
DEV_TREES = {"nightly": [CENTRAL, BETA, RELEASE], "release": [BETA, RELEASE]}
#: a ``metadata.source`` that the dev config lets use each level
DEV_SOURCES = {
    "dep": f"{CENTRAL}/file/tip/taskcluster/ci/build",
    "nightly": f"{CENTRAL}/file/tip/taskcluster/ci/build",
    "release": f"{RELEASE}/file/tip/taskcluster/ci/build",
}


def read_deployment(root: Path) -> dict[str, Any]:
    """Level, listen address, formats and file paths of a ``sealbox init --dev`` folder."""
    config = root / "sealbox.toml"
    try:
        data = tomllib.loads(config.read_text(encoding="utf-8"))
        level = data["server"]["level"]
        listen = data["server"]["listen"]
        formats = sorted(data.get("formats", {}))
    except OSError as e:
        raise ConfigError(f"{config}: cannot read: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"{config}: not a sealbox deployment config ({e})") from None
    for rel in ("tls/ca.pem", "token-auth"):
        if not (root / rel).is_file():
            raise ConfigError(f"{root}: {rel} is missing (made by 'sealbox init --dev')")
    if "dmg" in formats:
        formats.append("macapp")
    out: dict[str, Any] = {
        "hosts": [listen],
        "ca": str((root / "tls/ca.pem").resolve()),
        "credentials": str((root / "token-auth").resolve()),
        "formats": formats,
    }
    if (root / "public/gpg.asc").is_file():
        out["gpg_pubkey"] = str((root / "public/gpg.asc").resolve())
    if (root / "public/signlog.pub").is_file():  # check every signature is in the server's log
        out["log_pubkey"] = str((root / "public/signlog.pub").resolve())
    if level in DEV_TREES:
        out["trees"] = DEV_TREES[level]
    return {"level": level, "section": out}


def init_worker_dev(
    root: Path,
    deployments: Sequence[Path],
    production: bool = True,
    samples: bool = True,
    hosts: Mapping[str, Sequence[str]] | None = None,
) -> Path:
    """Write a worker config for the given dev deployments; returns ``root/worker.toml``.

    ``hosts`` overrides the server list per level (default: the deployment's listen address)."""
    if not deployments:
        raise ConfigError("at least one deployment folder is needed (--servers)")
    if (root / "worker.toml").exists():
        raise ConfigError(f"{root / 'worker.toml'} exists; refusing to overwrite a worker config")
    levels: dict[str, Any] = {}
    for dep in deployments:
        info = read_deployment(dep)
        if info["level"] in levels:
            raise ConfigError(f"two deployments for level '{info['level']}' ({dep})")
        if hosts and info["level"] in hosts:
            info["section"]["hosts"] = list(hosts[info["level"]])
        levels[info["level"]] = info["section"]
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    worker_key, build_key = cot.generate_key(), cot.generate_key()
    worker: dict[str, Any] = {
        "id": "dev-signing-1",
        "group": "sealbox-dev",
        "class": "signing",
        "production": production,
        "ip": "127.0.0.1",
        "artifact_store": (root / "store").resolve().as_uri() + "/{taskId}/{path}",
    }
    if production:
        cot.write_private_key(root / "keys" / "worker.key", worker_key)
        worker["private_key"] = "keys/worker.key"
    cot.write_private_key(root / "keys" / "build.key", build_key)
    config = {
        "worker": worker,
        "scopes": {"prefixes": [SCOPE_PREFIX]},
        "levels": levels,
        "trusted": {
            "build": {"keys": [cot.public_key_text(build_key)], "task_types": ["build", "repackage"]},
            "signing": {"keys": [cot.public_key_text(worker_key)]},
        },
    }
    path = root / "worker.toml"
    path.write_bytes(tomli_w.dumps(config).encode())
    (root / "store").mkdir(exist_ok=True)
    if samples:
        from .demo import write_sample_task

        for level in levels:
            write_sample_task(root / f"sample-{level}", root, level)
    return path
