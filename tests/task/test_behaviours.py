"""Unit tests of the packaging behaviours, the chain-of-trust module and the small CLIs."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from sealbox.cli.cot import cot as cot_cli
from sealbox.deploy.taskdev import elf_sample, run_demo, verify_release_outputs
from sealbox.samples.pe import write_dll, write_pe
from sealbox.task import behaviours as bh
from sealbox.task import cot
from sealbox.task.scopes import try_or_pull_request
from tests.servers import BIN, Deployment, ServerProcess, start_server

from .helpers import run

LIMITS = bh.Limits(64 << 20, 1000)


def test_widevine_sig_names() -> None:
    assert (
        bh.widevine_sig_name("Firefox.app/Contents/MacOS/XUL", "tar")
        == "Firefox.app/Contents/Resources/XUL.sig"
    )
    assert (
        bh.widevine_sig_name("a/Contents/MacOS/b.app/Contents/MacOS/firefox", "tar")
        == "a/Contents/MacOS/b.app/Contents/Resources/firefox.sig"
    )
    assert (
        bh.widevine_sig_name("Firefox.app/Contents/MacOS/XUL", "zip") == "Firefox.app/Contents/MacOS/XUL.sig"
    )
    assert bh.widevine_sig_name("firefox/libxul.so", "tar") == "firefox/libxul.so.sig"
    assert bh.widevine_format_for("firefox/plugin-container") == "widevine_blessed"
    assert bh.widevine_format_for("firefox/plugin-container.exe") == "widevine_blessed"
    assert bh.widevine_format_for("x/XUL") == "widevine"
    assert bh.widevine_format_for("x/libxul.so.sig") is None


def test_precomplete_in_a_mac_bundle(tmp_path: Path) -> None:
    app = tmp_path / "Firefox.app" / "Contents"
    (app / "MacOS").mkdir(parents=True)
    (app / "Resources" / "distribution").mkdir(parents=True)
    (app / "MacOS" / "firefox").write_bytes(b"x")
    (app / "Resources" / "channel-prefs.js").write_text("x")
    (app / "Resources" / "distribution" / "a.ini").write_text("x")
    (app / "Resources" / "precomplete").write_text('remove "old"\n')
    _, old, new = bh.regenerate_precomplete(tmp_path, "Firefox.app/Contents/Resources/precomplete")
    assert old == 'remove "old"\n'
    assert new.splitlines() == [
        'remove "Contents/Resources/precomplete"',
        'remove "Contents/MacOS/firefox"',
        'rmdir "Contents/Resources/"',
        'rmdir "Contents/MacOS/"',
        'rmdir "Contents/"',
    ]
    assert (app / "Resources" / "precomplete").read_text() == new


def _fake_sign(calls: list[tuple[str, str]]) -> bh.SignOne:
    def sign_one(src: Path, fmt: str, dest: Path) -> None:
        calls.append((src.name, fmt))
        data = src.read_bytes()
        dest.write_bytes(b"SIG" + data[:8] if dest != src else data + b"signed")

    return sign_one


def test_widevine_tar_xz_keeps_compression_and_skips_existing_sigs(tmp_path: Path) -> None:
    src = tmp_path / "target.tar.xz"
    with tarfile.open(src, "w:xz") as tf:
        for name, data in {
            "firefox/firefox": elf_sample("ff"),
            "firefox/libxul.so": elf_sample("xul"),
            "firefox/libxul.so.sig": b"already there",
            "firefox/precomplete": b"",
        }.items():
            info = tarfile.TarInfo(name)
            info.size, info.uid, info.uname = len(data), 1000, "me"
            tf.addfile(info, io.BytesIO(data))
    calls: list[tuple[str, str]] = []
    signed, diff = bh.sign_widevine_archive(
        src, "target.tar.xz", tmp_path / "s", LIMITS, _fake_sign(calls), 2
    )
    assert signed == ["firefox/firefox"] and calls == [("firefox", "widevine")]
    assert src.read_bytes()[:6] == b"\xfd7zXZ\x00"
    with tarfile.open(src) as tf:
        names = tf.getnames()
        assert all(m.uid == 0 and m.uname == "root" for m in tf.getmembers())
        sig = tf.extractfile("firefox/libxul.so.sig")
        assert sig is not None and sig.read() == b"already there"
    assert "firefox/firefox.sig" in names
    assert '+remove "firefox.sig"' in diff


def test_widevine_nothing_to_sign_leaves_the_archive(tmp_path: Path) -> None:
    src = tmp_path / "t.zip"
    with zipfile.ZipFile(src, "w") as zf:
        zf.writestr("readme.txt", "hi")
    before = src.read_bytes()
    assert bh.sign_widevine_archive(src, "t.zip", tmp_path / "s", LIMITS, _fake_sign([]), 1) == ([], "")
    assert src.read_bytes() == before


def test_zip_authenticode_signs_by_the_windows_rules(tmp_path: Path) -> None:
    pe = write_pe(tmp_path, "a.exe").read_bytes()
    dll = write_dll(tmp_path, "b.dll").read_bytes()
    src = tmp_path / "build.zip"
    names = [
        "app/",
        "app/setup.exe",
        "app/msvcp140.dll",
        "app/D3DCompiler_43.dll",
        "app/xul.dll",
        "app/x.ini",
    ]
    with zipfile.ZipFile(src, "w") as zf:
        for n in names:
            zf.writestr(
                n,
                b""
                if n.endswith("/")
                else (dll if n.endswith(".dll") else pe if n.endswith(".exe") else b"x"),
            )
    calls: list[tuple[str, str]] = []
    signed = bh.sign_zip_authenticode(
        src, "build.zip", "sha2signcode", tmp_path / "s", LIMITS, _fake_sign(calls), 2
    )
    assert sorted(signed) == ["app/setup.exe", "app/xul.dll"]
    assert sorted(c[0] for c in calls) == ["setup.exe", "xul.dll"]
    with zipfile.ZipFile(src) as zf:
        assert zf.namelist() == names
        assert zf.read("app/setup.exe").endswith(b"signed") and zf.read("app/msvcp140.dll") == dll


def test_zip_member_with_windows_name_but_not_pe(tmp_path: Path) -> None:
    src = tmp_path / "b.zip"
    with zipfile.ZipFile(src, "w") as zf:
        zf.writestr("fake.exe", b"not a PE")
    with pytest.raises(bh.InputRejected, match=r"fake\.exe"):
        bh.inspect_zip_authenticode(src, "b.zip", tmp_path / "s", LIMITS)


def test_zip_symlink_member_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "l.zip"
    with zipfile.ZipFile(src, "w") as zf:
        info = zipfile.ZipInfo("link.exe")
        info.create_system = 3
        info.external_attr = 0o120777 << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(bh.InputRejected, match=r"link\.exe"):
        bh.inspect_zip_authenticode(src, "l.zip", tmp_path / "s", LIMITS)


@pytest.mark.parametrize(
    ("source", "tasks_for", "bad"),
    [
        ("https://hg.mozilla.org/try/rev/abc", "hg-push", True),
        ("https://hg.mozilla.org/try-comm-central/rev/abc", "hg-push", True),
        ("https://github.com/o/r/pull/5/commits", "", True),
        ("https://hg.mozilla.org/mozilla-central/rev/abc", "github-pull-request-untrusted", True),
        ("https://hg.mozilla.org/mozilla-central/rev/abc", "hg-push", False),
        ("https://hg.mozilla.org/releases/mozilla-release/file/tryout", "hg-push", False),
    ],
)
def test_try_and_pull_request_detection(source: str, tasks_for: str, bad: bool) -> None:
    assert (try_or_pull_request(source, tasks_for) is not None) is bad


# -- chain of trust -------------------------------------------------------------------------------


def test_cot_keys_and_records(tmp_path: Path) -> None:
    key = cot.generate_key()
    path = tmp_path / "k"
    cot.write_private_key(path, key)
    assert os.stat(path).st_mode & 0o777 == 0o600
    loaded = cot.load_private_key(path)
    assert cot.public_key_text(loaded) == cot.public_key_text(key)
    os.chmod(path, 0o640)
    with pytest.raises(cot.CotError, match="readable by others"):
        cot.load_private_key(path)
    art = tmp_path / "a"
    (art / "public/build").mkdir(parents=True)
    (art / "public/build/x.bin").write_bytes(b"x")
    rec, sig = cot.write_record(art, {"scopes": []}, "T1", "build", "w", "g", key)
    data = rec.read_bytes()
    assert json.loads(data)["artifacts"] == {
        "public/build/x.bin": {"sha256": cot.sha256_file(art / "public/build/x.bin")}
    }
    assert data == json.dumps(json.loads(data), indent=2, sort_keys=True).encode()
    assert sig.read_bytes() == key.sign(data)  # Ed25519 is deterministic
    trusted = {"build": [cot.parse_public_key(cot.public_key_text(key))]}
    assert cot.verify_signature(data, sig.read_bytes(), trusted) == "build"
    assert cot.verify_signature(data + b" ", sig.read_bytes(), trusted) is None
    assert cot.verify_signature(data, sig.read_bytes(), {"other": [cot.generate_key().public_key()]}) is None
    with pytest.raises(cot.CotError, match="chainOfTrustVersion"):
        cot.parse_record(b'{"taskId": "x", "artifacts": {}}')
    for version in (b"true", b"1.0", b'"1"'):  # equal to 1 in Python, or a string of it: not version 1
        with pytest.raises(cot.CotError, match="chainOfTrustVersion"):
            cot.parse_record(b'{"chainOfTrustVersion": %s, "taskId": "x", "artifacts": {}}' % version)
    assert cot.parse_record(b'{"chainOfTrustVersion": 1, "taskId": "x", "artifacts": {}}') is not None


def test_cot_cli_keygen_sign_verify(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(cot_cli, ["keygen", str(tmp_path / "k"), "--public", str(tmp_path / "k.pub")])
    assert res.exit_code == 0, res.output
    pub = res.output.strip()
    assert (tmp_path / "k.pub").read_text().strip() == pub
    assert runner.invoke(cot_cli, ["keygen", str(tmp_path / "k")]).exit_code == 2  # never overwrites
    art = tmp_path / "art"
    (art / "public").mkdir(parents=True)
    (art / "public/a.txt").write_text("a")
    (tmp_path / "task.json").write_text('{"scopes": []}')
    res = runner.invoke(
        cot_cli,
        [
            "sign",
            "--key",
            str(tmp_path / "k"),
            "--artifact-dir",
            str(art),
            "--task-id",
            "B1",
            "--task",
            str(tmp_path / "task.json"),
        ],
    )
    assert res.exit_code == 0, res.output
    ok = runner.invoke(cot_cli, ["verify", str(art), "--pubkey", pub, "--task-id", "B1"])
    assert ok.exit_code == 0 and "ok: task B1" in ok.output
    assert runner.invoke(cot_cli, ["verify", str(art), "--pubkey", pub, "--task-id", "B2"]).exit_code == 3
    other = cot.public_key_text(cot.generate_key())
    assert runner.invoke(cot_cli, ["verify", str(art), "--pubkey", other]).exit_code == 3
    (art / "public/b.txt").write_text("unlisted")
    res = runner.invoke(cot_cli, ["verify", str(art), "--pubkey", pub])
    assert res.exit_code == 3 and "not listed" in res.output


# -- the two-command dev flow and the make-demo step ----------------------------------------------


def test_task_init_dev_then_run(tmp_path: Path) -> None:
    """`sealbox task init --dev DIR --servers DEP` then `sealbox task run` of the sample."""
    dep = Deployment.create(tmp_path / "dep", "dep", ["gpg", "sha2signcode"])
    sp = start_server(dep)  # on a port it binds itself: no other process can hold it
    # `task init --dev` reads the server's address from its config: the port it got.
    dep.config.write_text(
        re.sub(r'listen = "[^"]*"', f'listen = "{sp.hostspec}"', dep.config.read_text(), count=1)
    )
    try:
        worker_dir = tmp_path / "worker"
        init = subprocess.run(
            [str(BIN / "sealbox"), "task", "init", "--dev", str(worker_dir), "--servers", str(dep.root)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert init.returncode == 0, init.stderr
        assert os.stat(worker_dir / "keys/worker.key").st_mode & 0o777 == 0o600
        command = next(ln for ln in init.stdout.splitlines() if "sealbox task run" in ln).split(": ", 1)[1]
        argv = command.split()
        proc = subprocess.run([str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        out = worker_dir / "out-dep"
        pub = json.loads(json.dumps(__import__("tomllib").loads((worker_dir / "worker.toml").read_text())))
        key = pub["trusted"]["signing"]["keys"][0]
        rows = dict(verify_release_outputs(out, dep.public, key, ["sha2signcode", "gpg"]))
        assert "public/build/setup.exe" in rows and "public/build/SHA512SUMS.asc" in rows
        # formats the dep servers lack were left out: the APK is published unsigned, as it came
        assert (out / "public/build/app.apk").is_file()
    finally:
        sp.stop()


def test_run_demo_step(tmp_path: Path, servers: dict[str, ServerProcess]) -> None:
    lines: list[str] = []

    class Console:
        def print(self, text: str, **kw: object) -> None:
            lines.append(text)

    ok = run_demo(
        tmp_path / "task",
        {lv: sp.deployment.root for lv, sp in servers.items()},
        {lv: [sp.hostspec] for lv, sp in servers.items()},
        Console(),
    )
    assert ok, "\n".join(lines)
    assert any("public/build/target.zip!firefox/xul.dll" in ln for ln in lines)


def test_helpers_run_reports_missing_config(tmp_path: Path) -> None:
    res = run(tmp_path / "nope.toml", tmp_path, tmp_path / "out")
    assert res.code == 5 and "cannot read worker config" in res.first
