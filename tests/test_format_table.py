"""One table of formats (:data:`sealbox.wire.TABLE`): the signer registry, the signers' served
names, the client's plan, the task runner's packaging and a real dev server all agree with it."""

from __future__ import annotations

import ssl
import subprocess
import sys
import tomllib
import typing
from pathlib import Path

import httpx

from sealbox import wire
from sealbox.client import _plan as plan
from sealbox.client import detached_suffix, order_formats, wire_name
from sealbox.formats import all_formats, signer_class, signer_families
from sealbox.formats.android import APK_FORMATS as ANDROID_APK_NAMES
from sealbox.task import behaviours
from tests.servers import Deployment, start_server

ROWS = {f.name: f for f in wire.TABLE}


def test_the_table_is_consistent() -> None:
    assert len(ROWS) == len(wire.TABLE), "a name listed twice"
    assert set(ROWS) == wire.KNOWN
    assert tuple(n for n, f in ROWS.items() if f.alias_of is None) == wire.FORMATS
    for f in wire.TABLE:
        if f.alias_of is not None:  # an alias is signed exactly as its wire name
            target = ROWS[f.alias_of]
            assert target.alias_of is None
            assert (f.family, f.in_process, f.detached_suffix) == (
                target.family,
                target.in_process,
                target.detached_suffix,
            )
        if f.apk_as is not None:
            assert ROWS[f.apk_as].alias_of is None
            assert f.family == ROWS[f.apk_as].family == "android"
    ranks = [f.last for f in wire.TABLE if f.last]
    assert len(ranks) == len(set(ranks)), "two formats share a place at the end of a chain"
    for family in typing.get_args(wire.Family):  # a family runs all in process or all in threads
        assert len({f.in_process for f in wire.of_family(family)}) == 1, family


def test_every_name_resolves_to_a_signer_that_serves_it() -> None:
    for name, row in ROWS.items():
        cls = signer_class(name)
        assert cls.family == row.family, name
        assert wire_name(name) in cls.formats, name
        assert cls.detached_suffix.get(wire_name(name), "") == row.detached_suffix, name
        assert cls.in_process is row.in_process, name
    families = signer_families(list(wire.FORMATS))
    assert {c.family for c in families} == set(typing.get_args(wire.Family))
    served = [n for c in families for n in c.formats]
    assert sorted(served) == sorted(wire.FORMATS), "each wire name is served by exactly one signer"
    assert all_formats() == list(wire.FORMATS)


def test_the_client_plan_follows_the_table() -> None:
    for name, row in ROWS.items():
        assert wire_name(name) == (row.alias_of or name)
        assert detached_suffix(name) == row.detached_suffix
    # the values the client had before the table (signtool's)
    signtool_names = ("gpg", "widevine", "widevine_blessed")
    assert {n: plan.DETACHED[n] for n in signtool_names} == {
        "gpg": ".asc",
        "widevine": ".sig",
        "widevine_blessed": ".sig",
    }
    assert plan.DETACHED["sigstore"] == ".sig"  # a container image's payload signature
    assert plan.DETACHED["apt-release-gpg"] == ".gpg"  # an APT Release's Release.gpg
    assert plan.LAST == ("widevine", "widevine_blessed", "macapp", "dmg", "gpg", "apt-release-gpg")
    asked = ["gpg", "dmgv2", "macapp", "sha2signcode", "widevine", "gpg", "jar"]
    assert order_formats(asked) == ["dmgv2", "sha2signcode", "jar", "widevine", "macapp", "gpg"]


def test_the_task_packaging_follows_the_table() -> None:
    def names(family: str) -> set[str]:
        return {n for n, f in ROWS.items() if f.family == family}

    assert names("authenticode") == behaviours.AUTHENTICODE
    assert behaviours.WIDEVINE == names("widevine") == {"widevine", "widevine_blessed"}
    assert behaviours.MACAPP == {n for n in ROWS if wire_name(n) == "dmg"} == {"macapp", "dmg", "dmgv2"}
    assert behaviours.APK_FORMATS == names("android") == {"jar", "focus-jar", "apk", "focus-apk"}
    assert behaviours.APT == names("apt") == {"apt-inrelease", "apt-release-gpg"}
    assert behaviours.APK_WIRE_NAMES == {"jar": "apk", "focus-jar": "focus-apk"}
    # the Android signer gives each APK name the key of the classic name that travels as it
    assert {apk: classic for classic, apk in behaviours.APK_WIRE_NAMES.items()} == ANDROID_APK_NAMES
    for classic, apk in behaviours.APK_WIRE_NAMES.items():
        assert behaviours.wire_format(classic, "App.APK") == apk
        assert behaviours.wire_format(classic, "lib.jar") == classic
        assert signer_class(classic) is signer_class(apk)


def test_the_client_and_the_task_runner_read_the_table_without_signer_code() -> None:
    code = (
        "import sys, sealbox.client, sealbox.cli.sign, sealbox.task.behaviours, sealbox.task.runner\n"
        "assert 'sealbox.wire' in sys.modules\n"
        "print(sorted(m for m in sys.modules if m.startswith('sealbox.formats')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_dev_server_serves_every_available_wire_name_of_the_table(tmp_path: Path) -> None:
    available = [n for n in wire.FORMATS if signer_class(n).available() is None]
    d = Deployment.create(tmp_path / "dep", "dep")  # `sealbox init --dev`: every family's dev_setup
    assert sorted(tomllib.loads(d.config.read_text())["formats"]) == sorted(available)
    sp = start_server(d)
    try:
        with httpx.Client(verify=ssl.create_default_context(cafile=str(d.ca)), timeout=60) as c:
            heartbeat = c.get(f"{sp.server.url}/__heartbeat__").json()
    finally:
        sp.stop()
    assert heartbeat["formats"] == sorted(available)
