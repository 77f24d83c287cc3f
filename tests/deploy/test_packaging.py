"""What can be checked here of ``packaging/``: the Kubernetes manifests against the
Kubernetes schemas (offline), the systemd unit with ``systemd-analyze``, the Containerfile's
commands on this machine (no container engine runs here, so the image is not built)."""

from __future__ import annotations

import re
import shlex
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import click
import kubernetes_validate
import pytest
import yaml

from sealbox.cli.serve import serve
from sealbox.server.config import load_config
from tests.servers import BIN

ROOT = Path(__file__).resolve().parents[2]
PACKAGING = ROOT / "packaging"
LEVELS = ("dep", "nightly", "release")
SECRET_NAME = re.compile(r"PASS|PIN|SECRET|TOKEN|KEY|CRED", re.IGNORECASE)


def serve_args(args: list[str]) -> dict[str, Any]:
    """``args`` as the real ``sealbox serve`` parses them (an unknown option fails)."""
    try:
        return serve.make_context("serve", list(args)).params
    except click.UsageError as e:
        raise AssertionError(f"sealbox serve {shlex.join(args)}: {e}") from None


# -- Kubernetes -----------------------------------------------------------------------------------
def _manifests(level: str) -> dict[str, dict[str, Any]]:
    docs = list(yaml.safe_load_all((PACKAGING / "kubernetes" / f"sealbox-{level}.yaml").read_text()))
    return {d["kind"]: d for d in docs}


@pytest.mark.parametrize("level", LEVELS)
def test_kubernetes_manifests_validate_offline(level: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object) -> None:
        raise AssertionError("kubernetes-validate tried the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    docs = _manifests(level)
    assert set(docs) == {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget"}
    for doc in docs.values():
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    # The schemas do refuse: a misspelt field (strict), a wrong type.
    for spec in ({"sessionAfinity": "ClientIP"}, {"ports": "https"}):
        broken = {**docs["Service"], "spec": {**docs["Service"]["spec"], **spec}}
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, kubernetes_validate.latest_version(), strict=True)


def test_kubernetes_levels_differ_only_by_name() -> None:
    dep = (PACKAGING / "kubernetes" / "sealbox-dep.yaml").read_text()
    for level in LEVELS:
        assert (PACKAGING / "kubernetes" / f"sealbox-{level}.yaml").read_text() == dep.replace("dep", level)


@pytest.mark.parametrize("level", LEVELS)
def test_kubernetes_deployment(level: str, tmp_path: Path) -> None:
    docs = _manifests(level)
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/__heartbeat__"
    assert container["livenessProbe"]["httpGet"]["path"] == "/__lbheartbeat__"
    assert docs["Service"]["spec"]["sessionAffinity"] == "ClientIP"
    selector = docs["Deployment"]["spec"]["selector"]["matchLabels"]
    assert docs["Service"]["spec"]["selector"] == selector
    assert docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == selector
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    # Passphrases: a file from a Secret volume, never an environment variable.
    assert "env" not in container and "envFrom" not in container
    params = serve_args(container["args"])
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    secret = volumes[mounts[str(params["passphrase_file"].parent)]]["secret"]
    assert secret["secretName"] == f"sealbox-{level}-passphrases"
    # The ConfigMap's sealbox.toml is a valid config for this level, at the path --config names.
    config = tmp_path / "sealbox.toml"
    config.write_text(docs["ConfigMap"]["data"]["sealbox.toml"])
    cfg = load_config(config)
    assert cfg.server.level == level
    assert volumes[mounts[str(params["config_path"].parent)]]["configMap"]["name"] == f"sealbox-{level}"
    assert str(params["data_dir"]) == "/var/lib/sealbox" and mounts["/var/lib/sealbox"] == "data"


# -- systemd --------------------------------------------------------------------------------------
UNIT = PACKAGING / "systemd" / "sealbox@.service"


def _unit() -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def test_systemd_unit_is_hardened_and_takes_a_credential() -> None:
    unit = _unit()
    for key, value in {
        "ProtectSystem": "strict",
        "NoNewPrivileges": "true",
        "PrivateTmp": "true",
        "ProtectHome": "true",
        "CapabilityBoundingSet": "",
    }.items():
        assert unit.get(key) == [value], key
    assert unit["LoadCredential"] == ["passphrases:/etc/sealbox/%i/passphrases"]
    assert not any(SECRET_NAME.search(v) for v in unit.get("Environment", []))
    args = shlex.split(unit["ExecStart"][0])
    assert args[:2] == ["/opt/sealbox/bin/sealbox", "serve"]
    params = serve_args(args[2:])
    assert str(params["passphrase_file"]) == "${CREDENTIALS_DIRECTORY}/passphrases"
    assert str(params["data_dir"]) == "${STATE_DIRECTORY}"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze(tmp_path: Path) -> None:
    """``systemd-analyze verify`` finds nothing to say (unknown keys, bad values, a missing
    binary: it checks ExecStart, so the copy points at this checkout's sealbox), and the
    offline security review rates the unit's exposure low."""
    sealbox = BIN / "sealbox"
    unit = tmp_path / "sealbox@.service"
    unit.write_text(UNIT.read_text().replace("/opt/sealbox/bin/sealbox", str(sealbox)))
    instance = str(tmp_path / "sealbox@dep.service")
    verify = subprocess.run(
        ["systemd-analyze", "verify", instance], capture_output=True, text=True, check=False
    )
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", instance],
        capture_output=True,
        text=True,
        check=False,
    )
    found = re.search(r"Overall exposure level for sealbox@dep\.service: ([0-9.]+)", security.stdout)
    assert found, security.stdout + security.stderr
    assert float(found[1]) <= 2.0, security.stdout


# -- Containerfile --------------------------------------------------------------------------------
def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (PACKAGING / "Containerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _json(args: str) -> list[str]:
    value = yaml.safe_load(args)  # the exec form is a JSON array
    assert isinstance(value, list)
    return [str(v) for v in value]


def test_containerfile_runs_unprivileged_without_secrets_in_the_environment() -> None:
    steps = _instructions()
    assert steps[0] == ("FROM", "debian:12-slim")
    users = [args for op, args in steps if op == "USER"]
    assert users and users[-1].partition(":")[0] not in ("0", "root")
    for op, args in steps:
        if op in ("ENV", "ARG"):
            assert not SECRET_NAME.search(args.split("=")[0]), args
    entry = next(_json(args) for op, args in steps if op == "ENTRYPOINT")
    cmd = next(_json(args) for op, args in steps if op == "CMD")
    assert entry == ["/opt/sealbox/bin/sealbox", "serve"]
    params = serve_args(cmd)
    assert params["passphrase_file"] is not None and params["passphrase_fd"] is None
    for op, args in steps:
        if op == "COPY":
            for source in args.split()[:-1]:
                assert (ROOT / source).exists(), source


def test_containerfile_installs_the_bootstrap_tools() -> None:
    """The recipe's own line that reads bootstrap.sh's package list, run here: the list the
    image installs is the one the tests ran with, and each of those is installed here."""
    run = next(args for op, args in _instructions() if op == "RUN" and "APT_PACKAGES" in args)
    read = next(part.strip() for part in run.split(";") if "grep" in part)
    script = read.replace("/tmp/bootstrap.sh", str(ROOT / "scripts" / "bootstrap.sh"))
    listed = subprocess.run(
        ["bash", "-c", f'set -eu; {script}; printf "%s\\n" "${{APT_PACKAGES[@]}}"'],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert "gnupg" in listed and "osslsigncode" in listed and "haproxy" not in listed
    status = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package} ${db:Status-Status}\\n", *listed],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    assert sorted(status.split("\n")[:-1]) == sorted(f"{p} installed" for p in listed)
