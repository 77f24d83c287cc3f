"""Our client (`sealbox sign` and the library) against real servers over HTTPS."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sealbox.client import Server, SigningClient
from tests.servers import BIN, ServerProcess, gpg_verify, refusing_port


def sign_cli(
    server: ServerProcess,
    tmp: Path,
    *args: str,
    hosts: list[str] | None = None,
    timeout: float = 120,
    ca: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    token = tmp / "token"
    if not token.exists():
        token.write_text(server.token())
    host_args = [a for h in (hosts or [server.hostspec]) for a in ("-H", h)]
    ca = ca or server.deployment.ca
    return subprocess.run(
        [str(BIN / "sealbox"), "sign", *host_args, "-c", str(ca), "-t", str(token), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def verified(server: ServerProcess, data: Path) -> bool:
    res = gpg_verify(data.with_name(data.name + ".asc"), data, server.deployment.public / "gpg.asc")
    return res.returncode == 0 and b"VALIDSIG" in res.stdout


def test_single_file(gpg_server: ServerProcess, tmp_path: Path, payload: Path) -> None:
    res = sign_cli(gpg_server, tmp_path, "-f", "gpg", "--json", str(payload))
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["ok"] and summary["files"][0]["outputs"] == [str(payload) + ".asc"]
    assert verified(gpg_server, payload)


def test_many_files_in_parallel(gpg_server: ServerProcess, tmp_path: Path) -> None:
    files = []
    for i in range(40):
        f = tmp_path / f"f{i:02d}.txt"
        f.write_bytes(f"file {i} ".encode() * 50)
        files.append(f)
    res = sign_cli(gpg_server, tmp_path, "-j", "8", "-f", "gpg", "--json", *map(str, files))
    assert res.returncode == 0, res.stderr
    assert len(json.loads(res.stdout)["files"]) == 40
    assert all(verified(gpg_server, f) for f in files[:5] + files[-5:])


def test_directory_with_include_exclude(gpg_server: ServerProcess, tmp_path: Path) -> None:
    d = tmp_path / "tree"
    (d / "sub").mkdir(parents=True)
    for name in ("a.exe", "b.txt", "sub/c.exe", "sub/skip.exe"):
        (d / name).write_bytes(name.encode() * 20)
    out = tmp_path / "out"
    res = sign_cli(gpg_server, tmp_path, "-f", "gpg", "-i", "*.exe", "-x", "skip*", "-d", str(out), str(d))
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["a.exe", "a.exe.asc", "c.exe", "c.exe.asc"]
    assert verified(gpg_server, out / "c.exe")


def test_failover_when_one_server_is_down(gpg_server: ServerProcess, tmp_path: Path, payload: Path) -> None:
    with refusing_port() as port:  # held: nothing else can take it meanwhile
        dead = f"127.0.0.1:{port}"
        for _ in range(3):  # the host order is shuffled: make sure the dead one comes first at least once
            res = sign_cli(
                gpg_server, tmp_path, "-f", "gpg", "--json", str(payload), hosts=[dead, gpg_server.hostspec]
            )
            assert res.returncode == 0, res.stderr
            assert json.loads(res.stdout)["files"][0]["server"] == gpg_server.server.url
        with SigningClient(
            [Server("127.0.0.1", int(dead.split(":")[1])), gpg_server.server],
            gpg_server.deployment.ca,
            gpg_server.token(),
            shuffle=False,
        ) as c:
            out = c.sign(payload, ["gpg"], tmp_path / "fo.bin")
        assert out.ok and out.server == gpg_server.server.url
        assert verified(gpg_server, tmp_path / "fo.bin")


def test_cache_hit_needs_no_network(gpg_server: ServerProcess, tmp_path: Path, payload: Path) -> None:
    cache = tmp_path / "cache"
    res = sign_cli(gpg_server, tmp_path, "-f", "gpg", "--cachedir", str(cache), str(payload))
    assert res.returncode == 0, res.stderr
    first = (payload.with_name(payload.name + ".asc")).read_bytes()
    payload.with_name(payload.name + ".asc").unlink()
    with refusing_port() as port:  # nothing listens there
        res = sign_cli(
            gpg_server,
            tmp_path,
            "-f",
            "gpg",
            "--cachedir",
            str(cache),
            "--json",
            str(payload),
            hosts=[f"127.0.0.1:{port}"],
        )
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["files"][0]["cached"] == ["gpg"]
    assert payload.with_name(payload.name + ".asc").read_bytes() == first


def test_a_summary_that_cannot_be_written_fails_the_command(
    gpg_server: ServerProcess, tmp_path: Path, payload: Path
) -> None:
    """``sealbox sign`` ends without the interpreter's teardown, but only once its output is
    out: a summary whose reader is gone (a closed pipe) makes the exit code 1, quietly. The
    signatures themselves are written."""
    token = tmp_path / "token"
    token.write_text(gpg_server.token())
    read_end, write_end = os.pipe()
    os.close(read_end)  # no reader at all: every write to the pipe fails
    # buffered standard output, as by default: the summary only reaches the pipe when flushed
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    try:
        res = subprocess.run(
            [str(BIN / "sealbox"), "sign", "-H", gpg_server.hostspec, "-c", str(gpg_server.deployment.ca),
             "-t", str(token), "-f", "gpg", "--json", str(payload)],
            stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120, check=False, env=env,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr and "Exception ignored" not in res.stderr, res.stderr
    assert verified(gpg_server, payload)


def test_an_empty_token_file_or_an_empty_folder_is_said(
    gpg_server: ServerProcess, tmp_path: Path, payload: Path
) -> None:
    """An empty token file (a failed mint in the pipeline) stops the command before any
    request, naming the file; a folder with nothing to sign succeeds, as signtool does, but
    says so (a wrong folder does not pass unnoticed)."""
    (tmp_path / "token").write_text("\n")
    res = sign_cli(gpg_server, tmp_path, "-f", "gpg", str(payload))
    assert res.returncode == 2 and f"the token file {tmp_path / 'token'} is empty" in res.stderr
    assert not payload.with_name(payload.name + ".asc").exists()
    (tmp_path / "token").write_text(gpg_server.token())
    empty = tmp_path / "nothing here"
    empty.mkdir()
    (empty / "README").write_text("not a match")
    res = sign_cli(gpg_server, tmp_path, "-f", "gpg", "-i", "*.bin", str(empty))
    assert res.returncode == 0 and "warning: no files to sign" in res.stderr, res.stderr
    res = sign_cli(gpg_server, tmp_path, "-q", "-f", "gpg", "-i", "*.bin", str(empty))
    assert res.returncode == 0 and res.stderr == ""


def test_an_unusable_ca_bundle_or_input_is_one_line(
    gpg_server: ServerProcess, tmp_path: Path, payload: Path
) -> None:
    """A CA bundle that is not one, a named pipe: one error line and exit 2, no traceback."""
    bundle = tmp_path / "bundle.pem"
    bundle.write_text("not a certificate\n")
    res = sign_cli(gpg_server, tmp_path, "-f", "gpg", str(payload), ca=bundle)
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith(f"sealbox: error: CA bundle {bundle} cannot be loaded")
    assert "Traceback" not in res.stderr
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    res = sign_cli(gpg_server, tmp_path, "-f", "gpg", str(fifo))
    assert res.returncode == 2 and f"not a regular file: {fifo}" in res.stderr, res.stderr


@pytest.mark.parametrize("what", ["token", "log key"])
def test_a_small_file_that_is_not_text_is_one_line(
    gpg_server: ServerProcess, tmp_path: Path, payload: Path, what: str
) -> None:
    """A token or log key file that is not UTF-8, or a device that never ends: exit 2 naming
    the file, before any request (it was a traceback, or a read without end)."""
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe not text")
    for bad, why in ((binary, "is not UTF-8 text"), (Path("/dev/zero"), "holds more than 65536 bytes")):
        if what == "token":
            (tmp_path / "token").unlink(missing_ok=True)
            (tmp_path / "token").symlink_to(bad)
            res = sign_cli(gpg_server, tmp_path, "-f", "gpg", str(payload), timeout=60)
        else:
            res = sign_cli(gpg_server, tmp_path, "-f", "gpg", "--log-key", str(bad), str(payload), timeout=60)
        assert res.returncode == 2 and why in res.stderr, res.stderr
        assert "Traceback" not in res.stderr and len(res.stderr.splitlines()) == 1, res.stderr
    assert not payload.with_name(payload.name + ".asc").exists()


def test_a_nonce_file_that_is_not_text_is_not_sent(
    gpg_server: ServerProcess, tmp_path: Path, payload: Path
) -> None:
    nonce = tmp_path / "nonce"
    nonce.write_bytes(b"\xff\xfe")
    res = sign_cli(gpg_server, tmp_path, "-f", "gpg", "-n", str(nonce), str(payload))
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    assert verified(gpg_server, payload)


def test_two_files_signed_to_one_place_are_refused(gpg_server: ServerProcess, tmp_path: Path) -> None:
    """-d with two files of one name: one output would silently replace the other."""
    for d in ("d1", "d2"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "x.txt").write_text(f"from {d}\n" * 8)
    out = tmp_path / "out"
    res = sign_cli(
        gpg_server, tmp_path, "-f", "gpg", "-d", str(out), str(tmp_path / "d1"), str(tmp_path / "d2")
    )
    assert res.returncode == 2, res.stderr
    assert (
        f"{tmp_path / 'd1/x.txt'} and {tmp_path / 'd2/x.txt'} would both be signed to {out / 'x.txt'}"
        in res.stderr
    )
    assert not out.exists()
    # the same file named twice (a folder and a file in it) is signed once
    res = sign_cli(
        gpg_server, tmp_path, "-f", "gpg", "-d", str(out), str(tmp_path / "d1"), str(tmp_path / "d1/x.txt")
    )
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["x.txt", "x.txt.asc"]


def test_an_output_that_cannot_be_written_fails_at_once(
    gpg_server: ServerProcess, tmp_path: Path, payload: Path
) -> None:
    """A local write error is ours, not a server's: no server is asked again (it was retried
    until the timeout, 600 s by default, signing the file again each time)."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be\n")
    res = sign_cli(gpg_server, tmp_path, "-f", "gpg", "-d", str(blocker / "out"), str(payload))
    assert res.returncode == 1, res.stderr
    assert f"cannot write {blocker / 'out'}" in res.stderr and "Not a directory" in res.stderr, res.stderr
    assert "gave up" not in res.stderr and "retrying" not in res.stderr
    long_name = tmp_path / ("n" * 240)  # its .asc has a name a folder holds: its scratch name too
    long_name.write_bytes(b"a long name " * 8)
    res = sign_cli(gpg_server, tmp_path, "-f", "gpg", str(long_name))
    assert res.returncode == 0 and verified(gpg_server, long_name), res.stderr
    wide = tmp_path / ("\u6f22" * 80 + ".txt")  # 244 bytes, 84 characters: its .asc is 248 bytes
    wide.write_bytes(b"a wide name " * 8)
    res = sign_cli(gpg_server, tmp_path, "-f", "gpg", str(wide))
    assert res.returncode == 0 and verified(gpg_server, wide), res.stderr
    longer = tmp_path / ("n" * 254)  # its .asc cannot exist
    longer.write_bytes(b"a longer name " * 8)
    res = sign_cli(gpg_server, tmp_path, "-f", "gpg", str(longer))
    assert res.returncode == 1 and "File name too long" in res.stderr, res.stderr
    assert "gave up" not in res.stderr


def test_ctrl_c_is_one_line(gpg_server: ServerProcess, tmp_path: Path, payload: Path) -> None:
    """SIGINT while the client waits on a host: no traceback, no "Task was destroyed"."""
    (tmp_path / "token").write_text(gpg_server.token())
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # accepts TCP connections in the kernel, never speaks TLS
        host = f"127.0.0.1:{silent.getsockname()[1]}"
        # SIGINT's default restored first: a test run started in the background (as CI may
        # start it) hands its children SIGINT ignored, and Python then never handles it
        argv = [sys.executable, "-c", _DEFAULT_SIGINT, str(BIN / "sealbox"), "sign", "-H", host]
        argv += ["-c", str(gpg_server.deployment.ca)]
        proc = subprocess.Popen(
            [*argv, "-t", str(tmp_path / "token"), "-f", "gpg", "-d", str(tmp_path / "out"), str(payload)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 60
            while not _connected_to(proc.pid, silent.getsockname()[1]):  # it waits on the host now
                assert time.monotonic() < deadline and proc.poll() is None, "never connected"
                time.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
    assert proc.returncode in (1, 130) and err.strip() == "Aborted!", err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


_DEFAULT_SIGINT = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


def _connected_to(pid: int, port: int) -> bool:
    """Whether process ``pid`` has a TCP connection to ``port`` on loopback (from /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[2].split(":")[1], 16) == port and fields[9] in inodes:
            return True
    return False


def test_server_that_never_answers_times_out(
    gpg_server: ServerProcess, tmp_path: Path, payload: Path
) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # accepts TCP connections in the kernel, never speaks TLS
        started = time.monotonic()
        res = sign_cli(
            gpg_server,
            tmp_path,
            "-f",
            "gpg",
            "--timeout",
            "3",
            str(payload),
            hosts=[f"127.0.0.1:{silent.getsockname()[1]}"],
        )
        elapsed = time.monotonic() - started
    assert res.returncode == 1
    assert "timed out" in res.stderr and "gave up" in res.stderr
    assert elapsed < 60  # gave up by itself, far below the 600 s default (no tight timing)


def test_chained_output_with_o(gpg_server: ServerProcess, tmp_path: Path, payload: Path) -> None:
    dest = tmp_path / "out" / "signed.bin"
    res = sign_cli(gpg_server, tmp_path, "-f", "gpg", "-o", str(dest), str(payload))
    assert res.returncode == 0, res.stderr
    assert dest.read_bytes() == payload.read_bytes()
    assert verified(gpg_server, dest)


def test_usage_errors(gpg_server: ServerProcess, tmp_path: Path, payload: Path) -> None:
    res = sign_cli(gpg_server, tmp_path, "-f", "nosuch", str(payload))
    assert res.returncode == 2 and "invalid format: nosuch" in res.stderr
    res = sign_cli(gpg_server, tmp_path, "-f", "gpg", "-o", "x", str(payload), str(payload))
    assert res.returncode == 2


@pytest.mark.parametrize("n", [1])
def test_library_reports_progress(gpg_server: ServerProcess, tmp_path: Path, payload: Path, n: int) -> None:
    seen: list[int] = []
    with gpg_server.client() as c:
        out = c.sign(payload, ["gpg"], progress=seen.append)
    assert out.ok and seen == [n]


def test_small_form_round_trips_through_the_servers_parser() -> None:
    import multipart

    from sealbox.client._aio import _small_form

    fields = {"sha1": "a" * 40, "filename": 'se"tup ü.exe', "token": "t!" * 40, "nonce": ""}
    data = b"\r\n--not-the-boundary\r\n" + bytes(range(256)) * 4
    content_type, body = _small_form(fields, 'se"tup ü.exe', data)
    kind, options = multipart.parse_options_header(content_type)
    assert kind == "multipart/form-data"
    parts: dict[str, bytes] = {}
    names: dict[str, str | None] = {}
    with multipart.PushMultipartParser(options["boundary"], strict=True) as parser:
        current = ""
        for event in [*parser.parse(body), *parser.parse(b"")]:
            if isinstance(event, multipart.MultipartSegment):
                current = event.name
                names[current] = event.filename
                parts[current] = b""
            elif event is not None:
                parts[current] += bytes(event)
    assert {k: v.decode() for k, v in parts.items() if k != "filedata"} == fields
    assert parts["filedata"] == data and names["filedata"] == 'se"tup ü.exe'


def test_image_signing_code_is_imported_when_first_asked_for() -> None:
    """`sealbox sign` starts cold on every call: the client library leaves what only image
    signing needs until it is asked for, and it is still there under its public names."""
    code = (
        "import sys, sealbox.client as c\n"
        "assert 'sealbox.client._images' not in sys.modules\n"
        "from sealbox.client import RegistryError, sign_image\n"
        "assert 'sealbox.client._images' in sys.modules and issubclass(RegistryError, c.ClientError)\n"
        "try:\n"
        "    c.no_such_name\n"
        "except AttributeError:\n"
        "    pass\n"
        "else:\n"
        "    raise SystemExit('no AttributeError')\n"
    )
    res = subprocess.run([str(BIN / "python"), "-c", code], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
