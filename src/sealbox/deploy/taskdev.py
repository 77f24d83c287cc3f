"""Dev tooling for the signing task runner: a worker for dev deployments and a sample release task.

``sealbox task init --dev DIR --servers DEP [NIGHTLY RELEASE]``: a worker for dev deployments.

Reads each deployment made by ``sealbox init --dev`` (``sealbox.toml`` for the level, listen
address and formats, ``tls/ca.pem``, ``token-auth``, ``public/gpg.asc``) and writes::

    DIR/worker.toml        the worker config (production worker, artifact store under DIR/store)
    DIR/keys/worker.key    this worker's Ed25519 key (base64 seed, 0600)
    DIR/keys/build.key     the key of the demo ``build`` worker class that signs upstream records
    DIR/sample-<level>/    a sample "small release" task per level (see sealbox.deploy.taskdev)

A sample "small release" signing task with its upstream build artifacts and signed record.

:func:`write_sample_task` does what a build worker and the task graph would: it writes the
build's artifacts into ``W/cot/<buildTaskId>/public/build/``, signs the build's
chain-of-trust record with the dev ``build`` class key (``keys/build.key`` of a folder made by
``sealbox task init --dev``), and writes ``W/task.json`` asking for, per level:

* ``setup.exe``: ``sha2signcode``          * ``target.zip``: ``sha2signcode`` + ``widevine``
* ``app.apk``: ``jar`` (sent as ``apk``)     * ``update.mar``: ``mar``
* ``target.tar.gz``: ``widevine``            * ``SHA256SUMS``/``SHA512SUMS`` of them, gpg-signed

Formats the level's servers do not serve are left out (a file with none is published as is).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tomllib
import zipfile
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import tomli_w

from ..errors import ConfigError
from ..task import cot

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
        for level in levels:
            write_sample_task(root / f"sample-{level}", root, level)
    return path


BUILD_TASK_ID = "BuildTaskSample0000001"
_FIXED = (2024, 1, 1, 0, 0, 0)


def elf_sample(tag: str) -> bytes:
    """A real ELF executable (coreutils' ``true``) with ``tag`` appended so each file differs:
    widevine signs whole, well-formed binaries only."""
    return Path("/bin/true").read_bytes() + tag.encode()


def _pe(tag: str) -> bytes:
    """A real unsigned PE (pip's launcher) with a distinct overlay so each member differs."""
    from ..samples.pe import launcher_path

    return launcher_path().read_bytes() + f"sealbox sample {tag}\n".encode()


def write_release_zip(path: Path) -> Path:
    """A Windows build zip: two PE files to sign, a blocklisted DLL, widevine targets."""
    precomplete = 'remove "firefox.exe"\nremove "xul.dll"\nrmdir "defaults/"\n'
    members: list[tuple[str, bytes]] = [
        ("firefox/", b""),
        ("firefox/firefox.exe", _pe("firefox.exe")),
        ("firefox/xul.dll", _pe("xul.dll")),
        ("firefox/plugin-container.exe", _pe("plugin-container.exe")),
        ("firefox/msvcp140.dll", _pe("msvcp140.dll")),
        ("firefox/application.ini", b"[App]\nName=Firefox\nVersion=100.0\n"),
        ("firefox/defaults/pref/channel-prefs.js", b'pref("app.update.channel", "release");\n'),
        ("firefox/precomplete", precomplete.encode()),
    ]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:
            info = zipfile.ZipInfo(name, _FIXED)
            info.external_attr = (0o40755 if name.endswith("/") else 0o100644) << 16
            zf.writestr(info, data)
    return path


def write_release_tarball(path: Path) -> Path:
    """A Linux build tarball with widevine targets, a precomplete and skipped files."""
    members: list[tuple[str, bytes | None, int]] = [
        ("firefox", None, 0o755),
        ("firefox/firefox", elf_sample("firefox"), 0o755),
        ("firefox/libxul.so", elf_sample("libxul.so"), 0o755),
        ("firefox/plugin-container", elf_sample("plugin-container"), 0o755),
        ("firefox/application.ini", b"[App]\nName=Firefox\nVersion=100.0\n", 0o644),
        ("firefox/defaults", None, 0o755),
        ("firefox/defaults/pref", None, 0o755),
        ("firefox/defaults/pref/channel-prefs.js", b'pref("app.update.channel", "release");\n', 0o644),
        ("firefox/distribution", None, 0o755),
        ("firefox/distribution/policies.json", b"{}\n", 0o644),
        ("firefox/precomplete", b'remove "firefox"\nremove "libxul.so"\n', 0o644),
    ]
    with tarfile.open(path, "w:gz") as tf:
        for name, data, mode in members:
            info = tarfile.TarInfo(name)
            info.mode = mode
            info.mtime = 1704067200
            info.uid, info.gid, info.uname, info.gname = 1000, 1000, "builder", "builder"
            if data is None:
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def _level_formats(worker_dir: Path, level: str) -> tuple[str, set[str]]:
    config = tomllib.loads((worker_dir / "worker.toml").read_text(encoding="utf-8"))
    section = config["levels"][level]
    cert = section.get("cert") or f"{level}-signing"
    return cert, set(section["formats"])


def write_build_artifacts(folder: Path) -> dict[str, Path]:
    """The build's outputs under ``folder/public/build``; returns path -> file."""
    from ..samples.android import write_apk
    from ..samples.mar import write_mar
    from ..samples.pe import write_pe

    build = folder / "public" / "build"
    build.mkdir(parents=True, exist_ok=True)
    files = {
        "setup.exe": write_pe(build, "setup.exe"),
        "target.zip": write_release_zip(build / "target.zip"),
        "app.apk": write_apk(build, "app.apk"),
        "update.mar": write_mar(build, "update.mar", size=256 * 1024),
        "target.tar.gz": write_release_tarball(build / "target.tar.gz"),
    }
    return {f"public/build/{name}": p for name, p in files.items()}


def sign_upstream_record(
    folder: Path, task: dict[str, Any], task_id: str, key_file: Path, worker_type: str = "build"
) -> list[Path]:
    """Write and sign ``folder/public/chain-of-trust.json`` as the upstream worker would."""
    key = cot.load_private_key(key_file)
    return cot.write_record(folder, task, task_id, worker_type, f"{worker_type}-worker-1", "sealbox-dev", key)


def write_sample_task(
    work_dir: Path, worker_dir: Path, level: str = "dep", build_task_id: str = BUILD_TASK_ID
) -> Path:
    """Write ``work_dir/task.json`` and its upstream build artifacts + signed record; returns
    the task path. ``worker_dir`` is a folder made by ``sealbox task init --dev``."""
    from ..task.behaviours import wire_format

    cert, served = _level_formats(worker_dir, level)
    wanted: list[tuple[str, list[str]]] = [
        ("public/build/setup.exe", ["sha2signcode"]),
        ("public/build/target.zip", ["sha2signcode", "widevine"]),
        ("public/build/app.apk", ["jar"]),
        ("public/build/update.mar", ["mar"]),
        ("public/build/target.tar.gz", ["widevine"]),
    ]
    upstream_dir = work_dir / "cot" / build_task_id
    write_build_artifacts(upstream_dir)
    build_task = {
        "provisionerId": "sealbox-dev",
        "workerType": "build",
        "metadata": {"name": "sample build", "source": DEV_SOURCES.get(level, DEV_SOURCES["dep"])},
        "payload": {"command": ["./mach", "build"]},
        "scopes": [],
    }
    sign_upstream_record(upstream_dir, build_task, build_task_id, worker_dir / "keys" / "build.key")
    entries = []
    used: set[str] = set()
    for path, formats in wanted:
        # may be empty: published (and summed) as is
        fmts = [f for f in formats if f in served and wire_format(f, path) in served]
        used.update(fmts)
        entries.append({"taskId": build_task_id, "taskType": "build", "paths": [path], "formats": fmts})
    payload: dict[str, Any] = {"upstreamArtifacts": entries, "maxRunTime": 600}
    if "gpg" in served:
        payload["checksums"] = {"path": "public/build", "algorithms": ["sha256", "sha512"], "sign": True}
        used.add("gpg")
    task = {
        "provisionerId": "sealbox-dev",
        "workerType": "signing",
        "taskGroupId": build_task_id,
        "dependencies": [build_task_id],
        "scopes": [f"{SCOPE_PREFIX}cert:{cert}", *(f"{SCOPE_PREFIX}format:{f}" for f in sorted(used))],
        "payload": payload,
        "metadata": {
            "name": f"sample {level} signing of a small release",
            "description": "made by sealbox.deploy.taskdev.write_sample_task",
            "owner": "sealbox@example.invalid",
            "source": DEV_SOURCES.get(level, DEV_SOURCES["dep"]),
        },
        "extra": {"tasks_for": "hg-push"},
    }
    task_path = work_dir / "task.json"
    task_path.write_text(json.dumps(task, indent=2) + "\n", encoding="utf-8")
    return task_path


# -- verification of a sample task's outputs and the `make demo` step ---------------------------


def verify_release_outputs(
    artifact_dir: Path,
    public_dir: Path,
    worker_public_key: str | None = None,
    formats: Collection[str] | None = None,
) -> list[tuple[str, str]]:
    """Check every output of the sample task with the independent verifiers; returns
    ``(output, how it was verified)`` rows. ``formats``: those the level served (default: all).
    Raises VerificationFailed on the first failure."""
    import tempfile

    from ..task.checksums import verify_checksums

    v = _Verifier(public_dir, formats)
    build = artifact_dir / "public" / "build"
    if (build / "setup.exe").exists():
        v.check("sha2signcode", build / "setup.exe", None, "public/build/setup.exe")
    with tempfile.TemporaryDirectory(prefix="sbdemo") as tmp:
        if (build / "target.zip").exists():
            _verify_zip(v, build / "target.zip", Path(tmp) / "zip")
        if (build / "target.tar.gz").exists():
            _verify_tar(v, build / "target.tar.gz", Path(tmp) / "tar")
    if (build / "app.apk").exists():
        v.check("jar", build / "app.apk", None, "public/build/app.apk")
    if (build / "update.mar").exists():
        v.check("mar", build / "update.mar", None, "public/build/update.mar")
    for sums in ("SHA256SUMS", "SHA512SUMS"):
        if (build / sums).exists():
            verify_checksums(build / sums)
            v.check("gpg", build / f"{sums}.asc", build / sums, f"public/build/{sums}.asc")
    if worker_public_key is not None:
        _verify_record(artifact_dir, worker_public_key)
        v.rows.append((cot.RECORD, "Ed25519 verify with the worker's public key + sha256 of every file"))
    return v.rows


class _Verifier:
    """Runs the verifier of a format on one output and keeps the row saying how."""

    def __init__(self, public_dir: Path, formats: Collection[str] | None) -> None:
        self.public_dir = public_dir
        self.formats = formats
        self.rows: list[tuple[str, str]] = []

    def serves(self, fmt: str) -> bool:
        return self.formats is None or fmt in self.formats

    def check(self, fmt: str, signed: Path, original: Path | None, label: str) -> None:
        from ..formats import signer_class
        from ..task.behaviours import wire_format

        if not self.serves(fmt):
            return
        wire = wire_format(fmt, signed.name)  # verified as what it was signed as
        how = signer_class(wire).verify(wire, signed, original, self.public_dir)
        self.rows.append((label, how.split(" -in ")[0].split(" -pkeyopt")[0]))


def _verify_zip(v: _Verifier, archive: Path, tree: Path) -> None:
    from ..archives import safe_extract_zip
    from ..errors import VerificationFailed
    from ..task.behaviours import widevine_format_for, widevine_sig_name
    from ..winfiles import is_signed

    for n in safe_extract_zip(archive, tree):
        p = tree / n
        if n.endswith((".exe", ".dll")) and not n.endswith("msvcp140.dll"):
            v.check("sha2signcode", p, None, f"public/build/target.zip!{n}")
        fmt = widevine_format_for(n)
        if fmt is not None and p.is_file():
            v.check(fmt, tree / widevine_sig_name(n, "zip"), p, f"public/build/target.zip!{n}.sig")
    if v.serves("sha2signcode") and is_signed(tree / "firefox" / "msvcp140.dll"):
        raise VerificationFailed("target.zip: the blocklisted msvcp140.dll was signed")


def _verify_tar(v: _Verifier, archive: Path, tree: Path) -> None:
    from ..archives import safe_extract_tar
    from ..errors import VerificationFailed
    from ..task.behaviours import widevine_format_for, widevine_sig_name

    names = safe_extract_tar(archive, tree)
    with tarfile.open(archive) as tf:
        if v.serves("widevine") and any(m.uid or m.gid for m in tf.getmembers()):
            raise VerificationFailed("target.tar.gz: members are not root-owned")
    for n in names:
        fmt = widevine_format_for(n)
        if fmt is not None and (tree / n).is_file():
            v.check(fmt, tree / widevine_sig_name(n, "tar"), tree / n, f"public/build/target.tar.gz!{n}.sig")


def _verify_record(artifact_dir: Path, worker_public_key: str) -> None:
    from ..errors import VerificationFailed

    record = artifact_dir / cot.RECORD
    signature = (artifact_dir / cot.SIGNATURE).read_bytes()
    trusted = {"signing": [cot.parse_public_key(worker_public_key)]}
    if cot.verify_signature(record.read_bytes(), signature, trusted) is None:
        raise VerificationFailed("the task's chain-of-trust signature does not verify")
    cot.check_files(cot.parse_record(record.read_bytes()), cot.list_artifacts(artifact_dir))


def run_demo(
    root: Path, deployments: Mapping[str, Path], hosts: Mapping[str, Sequence[str]], console: Any = None
) -> bool:
    """The last step of ``make demo``: a worker for the demo deployments (``hosts``: the running
    servers per level), then the sample task over a small release at the highest level present,
    every output verified."""
    import time

    from ..errors import SealboxError
    from ..task.runner import run_task

    def say(text: str) -> None:
        if console is not None:
            console.print(text, markup=False, highlight=False)
        else:
            print(text)

    level = next((lv for lv in ("release", "nightly", "dep") if lv in deployments), None)
    if level is None:
        say("signing task: no deployment given")
        return False
    worker = root / "worker"
    config = init_worker_dev(worker, list(deployments.values()), samples=False, hosts=hosts)
    work, out = root / "work", root / "artifacts"
    write_sample_task(work, worker, level)
    say(f"signing task: sealbox task run --config {config} --work-dir {work} --artifact-dir {out}")
    started = time.monotonic()
    code = run_task(config, work, out, task_id="SigningTaskSample00001", echo=say, live_progress=False)
    seconds = time.monotonic() - started
    if code != 0:
        say(f"signing task FAILED (exit {code})")
        return False
    worker_cfg = tomllib.loads(config.read_text())
    try:
        rows = verify_release_outputs(
            out,
            deployments[level] / "public",
            worker_cfg["trusted"]["signing"]["keys"][0],
            worker_cfg["levels"][level]["formats"],
        )
    except (SealboxError, OSError) as e:
        say(f"signing task: output verification FAILED: {e}")
        return False
    say(f"signing task at level '{level}' done in {seconds:.1f} s; outputs checked by independent verifiers:")
    for label, how in rows:
        say(f"  ok  {label}: {how}")
    return True
