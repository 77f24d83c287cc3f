"""Per-format figures: signing a typical input through the server vs the raw tool, and throughput.

For each format: the median wall time of ``SigningClient.sign`` (one warm client, a fresh input
each time: the server keeps results by input hash), the median time of the underlying library
or tool run directly on the same inputs with an unencrypted copy of the same key, their ratio,
and files/s with 8 concurrent clients (threads, each its own ``SigningClient``) signing fresh
inputs. The first output of each format is checked with the format's independent verifier.
"""

from __future__ import annotations

import os
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.serialization import pkcs12

from bench import _formats_inputs as inputs
from bench._util import local_gpg, table
from sealbox.client import SigningClient
from sealbox.deploy.local import Deployment, start_server
from sealbox.formats import signer_class
from sealbox.keys import FileKey, PassphraseSource, load_key
from sealbox.server.config import load_config

CLIENTS = 8
#: throughput runs stop after this many seconds even if files are left (keeps the total short)
THROUGHPUT_MAX_S = 12.0
JAR_STOREPASS = "bench-only"  # the bench's own throwaway keystore, never a deployment secret
Direct = Callable[[Path, Path], object]


@dataclass
class Case:
    label: str  # table row
    fmt: str  # wire name sent to the server
    what: str  # the typical input, in words
    make: inputs.Maker
    direct: Direct | None  # (input, output path): the raw library/tool; None: nothing comparable
    direct_name: str
    n: int  # latency samples (server and direct)
    m: int  # files for the throughput run


def _run(argv: list[str]) -> None:
    res = subprocess.run(argv, capture_output=True, check=False, stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        err = (res.stderr or res.stdout).decode(errors="replace").strip().splitlines()
        raise RuntimeError(f"{argv[0]} failed ({res.returncode}): {err[-1] if err else ''}")


# -- unencrypted copies of the deployment's keys (bench only, in the bench's temp dir) --------
class PlainKeys:
    def __init__(self, dep: Deployment, out: Path) -> None:
        out.mkdir(mode=0o700)
        self.dir = out
        cfg = load_config(dep.config)
        pw = PassphraseSource.from_file(dep.root / "passphrases")
        self.keys: dict[str, FileKey] = {}
        for name in cfg.keys:
            key = load_key(cfg.key_spec(name), pw.get(name))
            assert isinstance(key, FileKey)  # a dev deployment keeps its keys in files
            self.keys[name] = key
        self.stub_cert = (
            cfg.format_settings("sha2signcodestub").path("extra_cert")
            if "sha2signcodestub" in cfg.formats
            else None
        )

    def rsa(self, name: str) -> rsa.RSAPrivateKey:
        key = self.keys[name]._key  # the file backend's in-memory key: the bench runs tools directly
        assert isinstance(key, rsa.RSAPrivateKey)
        return key

    def _write(self, name: str, data: bytes) -> Path:
        path = self.dir / name
        path.write_bytes(data)
        path.chmod(0o600)
        return path

    def key_pem(self, name: str) -> Path:
        pem = self.keys[name]._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return self._write(f"{name}.key.pem", pem)

    def pk8(self, name: str) -> Path:
        der = self.keys[name]._key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return self._write(f"{name}.pk8", der)

    def certs(self, name: str, start: int = 0, stop: int | None = None) -> Path:
        chain = self.keys[name].chain[start:stop]
        pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
        return self._write(f"{name}.certs{start}-{stop}.pem", pem)

    def p12(self, name: str) -> Path:
        k = self.keys[name]
        enc = (
            serialization.PrivateFormat.PKCS12.encryption_builder()
            .kdf_rounds(2048)
            .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
            .hmac_hash(hashes.SHA256())
            .build(JAR_STOREPASS.encode())
        )
        blob = pkcs12.serialize_key_and_certificates(
            b"signer",
            k._key,
            k.chain[0],
            list(k.chain[1:]) or None,
            enc,
        )
        return self._write(f"{name}.p12", blob)


# -- the raw tools ------------------------------------------------------------------------------
def osslsigncode(keys: PlainKeys, stub: bool) -> Direct:
    chain, key = keys.certs("authenticode"), keys.key_pem("authenticode")
    extra = ["-ac", str(keys.stub_cert)] if stub else []
    opts = ["-n", "sealbox dep", "-i", "https://example.invalid/sealbox", *extra]

    def run(src: Path, out: Path) -> None:
        _run(
            ["osslsigncode", "sign", "-certs", str(chain), "-key", str(key), "-h", "sha256",
             *opts, "-in", str(src), "-out", str(out)]
        )  # fmt: skip

    return run


def mardor(keys: PlainKeys, name: str) -> Direct:
    """formats-and-tools.md section 3: dummy signature block, hash, sign, final signature block."""
    from mardor.reader import MarReader
    from mardor.writer import add_signature_block

    key = keys.rsa(name)
    # MAR's algorithm 1 is SHA-1 with RSA-2048 (what Firefox checks), not our choice
    algo, digest_alg = ("sha1", hashes.SHA1()) if name == "mar" else ("sha384", hashes.SHA384())  # noqa: S303

    def run(src: Path, out: Path) -> None:
        with src.open("rb") as f, tempfile.TemporaryFile(dir=out.parent) as tmp:
            add_signature_block(f, tmp, algo)
            tmp.seek(0)
            ((_, digest),) = MarReader(tmp).calculate_hashes()
            signature = key.sign(digest, padding.PKCS1v15(), Prehashed(digest_alg))
            f.seek(0)
            with out.open("w+b") as o:
                add_signature_block(f, o, algo, signature)

    return run


def apksigner(keys: PlainKeys, name: str) -> Direct:
    pk8, cert = keys.pk8(name), keys.certs(name, 0, 1)

    def run(src: Path, out: Path) -> None:
        aligned = out.with_name(out.name + ".aligned.apk")
        _run(["zipalign", "-p", "-f", "4", str(src), str(aligned)])
        _run(
            ["apksigner", "sign", "--key", str(pk8), "--cert", str(cert),
             "--v1-signing-enabled", "true", "--v2-signing-enabled", "true",
             "--v3-signing-enabled", "true", "--v4-signing-enabled", "false",
             "--out", str(out), str(aligned)]
        )  # fmt: skip

    return run


def jarsigner(keys: PlainKeys, name: str) -> Direct:
    ks = keys.p12(name)

    def run(src: Path, out: Path) -> None:
        _run(
            ["jarsigner", "-keystore", str(ks), "-storetype", "PKCS12", "-storepass", JAR_STOREPASS,
             "-digestalg", "SHA-256", "-sigalg", "SHA256withRSA", "-signedjar", str(out), str(src), "signer"]
        )  # fmt: skip

    return run


def openssl_cms(keys: PlainKeys) -> Direct:
    key, leaf, rest = keys.key_pem("emevoucher"), keys.certs("emevoucher", 0, 1), keys.certs("emevoucher", 1)

    def run(src: Path, out: Path) -> None:
        _run(
            ["openssl", "cms", "-sign", "-binary", "-nodetach", "-outform", "DER", "-md", "sha256",
             "-signer", str(leaf), "-inkey", str(key), "-certfile", str(rest),
             "-in", str(src), "-out", str(out)]
        )  # fmt: skip

    return run


def openssl_pss(keys: PlainKeys) -> Direct:
    key = keys.key_pem("widevine")

    def run(src: Path, out: Path) -> None:
        _run(
            ["openssl", "dgst", "-sha256", "-sigopt", "rsa_padding_mode:pss", "-sigopt", "rsa_pss_saltlen:32",
             "-sign", str(key), "-out", str(out), str(src)]
        )  # fmt: skip

    return run


def openssl_ecdsa(keys: PlainKeys) -> Direct:
    key = keys.key_pem("sigstore")

    def run(src: Path, out: Path) -> None:
        _run(["openssl", "dgst", "-sha256", "-sign", str(key), "-out", str(out), str(src)])

    return run


def gpg_tool(home: str, tool: str) -> Direct:
    """The raw tools with the bench's throwaway gpg key (``GNUPGHOME``): rpmsign (its default
    gpg hook), debsigs, gpg --clearsign / -abs (what signs an APT Release by hand)."""
    env = {**os.environ, "GNUPGHOME": home}
    uid = "Bench <bench@example.invalid>"

    def run(src: Path, out: Path) -> None:
        if tool in ("rpmsign", "debsigs"):
            shutil.copyfile(src, out)
        gpg = ["gpg", "--batch", "--yes", "--digest-algo", "SHA256"]
        rpmsign = ["rpmsign", "--addsign", "--define", "__gpg /usr/bin/gpg"]
        argv = {
            "rpmsign": [*rpmsign, "--define", f"_gpg_name {uid}"],
            "debsigs": ["debsigs", "--sign=origin", "-k", uid],
            "clearsign": [*gpg, "--clearsign", "-o", str(out)],
            "detach": [*gpg, "-abs", "-o", str(out)],
        }[tool] + [str(out if tool in ("rpmsign", "debsigs") else src)]
        res = subprocess.run(argv, env=env, capture_output=True, check=False, stdin=subprocess.DEVNULL)
        if res.returncode != 0:
            raise RuntimeError(f"{tool} failed: {res.stderr.decode(errors='replace').strip()[-300:]}")

    return run


def apple_codesign(keys: PlainKeys, tarball: bool) -> Direct:
    """apple-platform-py (rcodesign) as a caller would use it on the same input, with what sealbox
    asks for (hardened runtime on every Mach-O, SHA-256, no timestamp): for a tar.gz, unpack it,
    sign each top-level bundle in place and pack it again (gzip level 6: gzip's and ``tar czf``'s
    default; sealbox packs with ISA-L's faster deflate, see archives.repack_tar)."""
    import tarfile

    import apple_platform as ap

    from sealbox.formats._macho import is_macho_head

    signer = ap.Signer(pem=ap.PemKey(files=[str(keys.key_pem("macos")), str(keys.certs("macos"))]))
    opts: dict[str, Any] = {"signer": signer, "timestamp_url": "none"}

    def one(src: Path, out: Path) -> None:
        ap.sign(
            src, out, binary_identifier="ninja", code_signature_flags=["runtime"], digests=["sha256"], **opts
        )

    def tree(src: Path, out: Path) -> None:
        work = out.with_name(out.name + ".d")
        with tarfile.open(src) as tf:
            tf.extractall(work, filter="tar")
        for app in sorted(work.glob("*.app")):
            scopes = {
                p.relative_to(app).as_posix(): ap.PathSettings(
                    code_signature_flags=["runtime"], digests=["sha256"]
                )
                for p in app.rglob("*")
                if p.is_file() and not p.is_symlink() and is_macho_head(p.read_bytes()[:8])
            }
            scopes["@main"] = ap.PathSettings(code_signature_flags=["runtime"], digests=["sha256"])
            ap.sign(app, paths=scopes, **opts)
        with tarfile.open(out, "w:gz", compresslevel=6) as tf:
            for p in sorted(work.rglob("*")):
                tf.add(p, p.relative_to(work).as_posix(), recursive=False)
        shutil.rmtree(work)

    return tree if tarball else one


def _cases(keys: PlainKeys, gpg_sign: Callable[[Path], None], gpg_home: str = "") -> list[Case]:
    mib = inputs.MIB
    pe = "PE32+, pip t64.exe"
    return [
        Case("gpg", "gpg", "random file", inputs.blob(mib, ".bin"),
             lambda src, out: gpg_sign(src), "gpg --detach-sign --armor (own RSA-3072 key)", 20, 200),
        Case("sha2signcode", "sha2signcode", pe, inputs.pe,
             osslsigncode(keys, False), "osslsigncode sign -certs -key", 15, 160),
        Case("sha2signcodestub", "sha2signcodestub", pe, inputs.pe,
             osslsigncode(keys, True), "osslsigncode sign ... -ac", 15, 160),
        Case("sha2signcode (cab)", "sha2signcode", "gcab cabinet, 256 KiB", inputs.cab,
             osslsigncode(keys, False), "osslsigncode sign -certs -key", 15, 160),
        Case("sha2signcode (cat)", "sha2signcode", "catalog, 200 members", inputs.cat,
             osslsigncode(keys, False), "osslsigncode sign -certs -key", 15, 160),
        Case("sha2signcode (msix)", "sha2signcode", "minimal MSIX package", inputs.appx,
             osslsigncode(keys, False), "osslsigncode sign -certs -key", 15, 160),
        Case("sha2signcode (ps1)", "sha2signcode", "PowerShell script, 100 bytes", inputs.ps1,
             osslsigncode(keys, False), "osslsigncode sign -certs -key", 15, 160),
        Case("mar", "mar", "complete MAR, 1 MiB payload", inputs.mar(),
             mardor(keys, "mar"), "mardor add_signature_block x2 + cryptography", 15, 160),
        Case("mar_sha384", "mar_sha384", "complete MAR, 1 MiB payload", inputs.mar(),
             mardor(keys, "mar_sha384"), "mardor add_signature_block x2 + cryptography", 15, 160),
        # the APK names (v1+v2+v3) share the keys of the classic names
        Case("apk (.apk)", "apk", "APK, 1 MiB stored resource", inputs.apk(),
             apksigner(keys, "jar"), "zipalign -p -f 4 + apksigner sign", 5, 16),
        Case("jar (.jar)", "jar", "JAR, 1 MiB member", inputs.jar(),
             jarsigner(keys, "jar"), "jarsigner (PKCS#12)", 5, 16),
        Case("focus-apk (.apk)", "focus-apk", "APK, 1 MiB stored resource", inputs.apk(),
             apksigner(keys, "focus-jar"), "zipalign -p -f 4 + apksigner sign", 5, 16),
        Case("emevoucher", "emevoucher", "random voucher", inputs.blob(4096, ".bin"),
             openssl_cms(keys), "openssl cms -sign -nodetach", 20, 300),
        Case("widevine", "widevine", pe, inputs.pe,
             openssl_pss(keys), "openssl dgst -sha256 (PSS, salt 32)", 20, 300),
        Case("widevine_blessed", "widevine_blessed", pe, inputs.pe,
             openssl_pss(keys), "openssl dgst -sha256 (PSS, salt 32)", 20, 300),
        Case("macapp", "macapp", ".app (universal exe, framework, plug-in) tar.gz", inputs.app_tarball,
             apple_codesign(keys, True), "apple-platform-py: untar + sign + tar.gz", 9, 32),
        Case("macho", "macho", "universal executable (ninja)", inputs.macho,
             apple_codesign(keys, False), "apple-platform-py sign", 15, 120),
        Case("sigstore", "sigstore", "container image simple-signing payload", inputs.sigstore_payload,
             openssl_ecdsa(keys), "openssl dgst -sha256 -sign (EC P-256)", 20, 300),
        Case("rpm", "rpm", "small noarch RPM (rpmbuild)", inputs.rpm,
             gpg_tool(gpg_home, "rpmsign"), "rpmsign --addsign (gpg, own RSA-3072 key)", 10, 60),
        Case("deb", "deb", "small .deb (dpkg-deb)", inputs.deb,
             gpg_tool(gpg_home, "debsigs"), "debsigs --sign=origin (gpg, own RSA-3072 key)", 10, 120),
        Case("apt-inrelease", "apt-inrelease", "APT Release, 100 indexes", inputs.release,
             gpg_tool(gpg_home, "clearsign"), "gpg --clearsign (own RSA-3072 key)", 20, 200),
        Case("apt-release-gpg", "apt-release-gpg", "APT Release, 100 indexes", inputs.release,
             gpg_tool(gpg_home, "detach"), "gpg -abs (own RSA-3072 key)", 20, 200),
    ]  # fmt: skip


# -- measuring ------------------------------------------------------------------------------------
def _size(n: int) -> str:
    return f"{n / inputs.MIB:.1f} MiB" if n >= inputs.MIB else f"{n / 1024:.0f} KiB"


def _sign(client: SigningClient, src: Path, fmt: str, out: Path) -> Path:
    outcome = client.sign(src, [fmt], out)
    if not outcome.ok:
        raise RuntimeError(f"{fmt}: {outcome.error}")
    return outcome.outputs[0]


def _throughput(clients: list[SigningClient], fmt: str, files: list[Path], out: Path) -> tuple[int, float]:
    """8 threads, each with its own client, take fresh files from a queue until it is empty
    (or THROUGHPUT_MAX_S has passed: no new file starts then); returns (files signed, seconds)."""
    todo: queue.SimpleQueue[Path] = queue.SimpleQueue()
    for f in files:
        todo.put(f)
    done = [0] * len(clients)
    errors: list[str] = []
    deadline = time.perf_counter() + THROUGHPUT_MAX_S

    def worker(k: int) -> None:
        while time.perf_counter() < deadline and not errors:
            try:
                src = todo.get_nowait()
            except queue.Empty:
                return
            try:
                _sign(clients[k], src, fmt, out / src.name)
            except RuntimeError as e:
                errors.append(str(e))
                return
            done[k] += 1

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(clients))]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    elapsed = time.perf_counter() - t
    if errors:
        raise RuntimeError(errors[0])
    return sum(done), elapsed


class _Inputs:
    """Fresh variants of one case's typical input (never the same bytes twice in a run)."""

    def __init__(self, case: Case, work: Path) -> None:
        self.case, self.dir, self.out = case, work / "in", work / "out"
        self.dir.mkdir(parents=True)
        self.out.mkdir()
        self._next = 0

    def fresh(self, k: int) -> list[Path]:
        made = [self.case.make(self.dir, self._next + j) for j in range(k)]
        self._next += k
        return made


def _latency(case: Case, files: _Inputs, client: SigningClient, public: Path) -> dict[str, Any]:
    """Warm up, check the first output with the independent verifier, then time the server and
    the raw tool on the same fresh inputs, alternating (so load changes hit both alike)."""
    res: dict[str, Any] = {"format": case.fmt, "input": case.what, "direct_tool": case.direct_name}
    (first,) = files.fresh(1)
    res["input_bytes"] = first.stat().st_size
    signed = _sign(client, first, case.fmt, files.out / f"v-{first.name}")
    res["verified_by"] = signer_class(case.fmt).verify(case.fmt, signed, first, public)
    direct_out = files.out / "direct"
    direct_out.mkdir()
    if case.direct is not None:
        case.direct(first, direct_out / f"warm-{first.name}")
    server_t: list[float] = []
    direct_t: list[float] = []
    for src in files.fresh(case.n):
        t = time.perf_counter()
        _sign(client, src, case.fmt, files.out / src.name)
        server_t.append(time.perf_counter() - t)
        if case.direct is not None:
            t = time.perf_counter()
            case.direct(src, direct_out / src.name)
            direct_t.append(time.perf_counter() - t)
    res["server_s"] = statistics.median(server_t)
    if direct_t:
        res["direct_s"] = statistics.median(direct_t)
        res["ratio"] = res["server_s"] / res["direct_s"]
    return res


def _row(r: dict[str, Any], label: str) -> tuple[str, ...]:
    direct = f"{r['direct_s'] * 1000:.1f}" if "direct_s" in r else "n/a"
    ratio = f"{r['ratio']:.2f}" if "ratio" in r else "n/a"
    return (
        f"`{label}`" if label == r["format"] else label,
        f"{r['input']} ({_size(r['input_bytes'])})",
        f"{r['server_s'] * 1000:.1f}",
        direct,
        ratio,
        f"{r['throughput_files_per_s']:.1f}",
        r["direct_tool"],
    )


def run(only: Sequence[str] = ()) -> dict[str, Any]:
    """Every case, or those whose label or wire name is in ``only``."""
    load = os.getloadavg()
    print(f"\n## Per-format signing\n\nload average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
          f"({os.cpu_count()} CPUs)", flush=True)  # fmt: skip
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="sbf-"))
    res: dict[str, Any] = {"loadavg_start": list(load), "clients": CLIENTS, "formats": {}}
    try:
        dep = Deployment.create(tmp / "dep", "dep")
        keys = PlainKeys(dep, tmp / "plain-keys")
        with ExitStack() as stack:
            gpg_home, gpg_sign = stack.enter_context(local_gpg())
            cases = [c for c in _cases(keys, gpg_sign, gpg_home) if not only or {c.label, c.fmt} & set(only)]
            server = start_server(dep)
            stack.callback(server.stop)
            clients = [stack.enter_context(server.client(timeout=300)) for _ in range(CLIENTS)]
            files = [_Inputs(case, tmp / f"case{i}") for i, case in enumerate(cases)]
            # Latencies first, throughputs after: a throughput run's tail never lands in a latency.
            for case, f in zip(cases, files, strict=True):
                t = time.perf_counter()
                res["formats"][case.label] = _latency(case, f, clients[0], dep.public)
                print(f"  latency {case.label}: {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
            for case, f in zip(cases, files, strict=True):
                t = time.perf_counter()
                done, elapsed = _throughput(clients, case.fmt, f.fresh(case.m), f.out)
                res["formats"][case.label].update(
                    throughput_files=done, throughput_s=elapsed, throughput_files_per_s=done / elapsed
                )
                print(
                    f"  throughput {case.label}: {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True
                )
                shutil.rmtree(f.dir.parent, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res["loadavg_end"] = list(os.getloadavg())
    res["total_s"] = time.perf_counter() - started
    rows = [_row(r, label) for label, r in res["formats"].items()]
    print()
    header = ("format", "typical input (size)", "through server (ms)", "direct (ms)", "ratio")
    print(table(rows, (*header, f"throughput (files/s, {CLIENTS} clients)", "raw tool, as run")))
    print(
        "\nthrough server: median `SigningClient.sign` (warm client, fresh input each time, loopback TLS);"
        " direct: the raw tool on the same inputs with an unencrypted copy of the key, runs alternated"
        " (gpg: a throwaway RSA-3072 key, the size of the dev key); throughput: 8 threads, each its own"
        " client, fresh inputs. `signcode`, `osslsigncode` and the `-v2` formats (without a"
        " timestamp server) run the same code as `sha2signcode`."
        f"\nload average at end: {' '.join(f'{x:.2f}' for x in res['loadavg_end'])};"
        f" bench time {res['total_s']:.0f} s"
    )
    sys.stdout.flush()
    return res
