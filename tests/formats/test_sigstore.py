"""Container image signing (format ``sigstore``): a real sealbox server signs the simple-signing
payload of an image pushed to Debian's docker-registry on loopback, ``sealbox sign-image`` pushes
the cosign attachment, and skopeo checks it with a ``sigstoreSigned`` policy (independent of
sealbox); the wire format's signature is checked by ``openssl dgst -verify``."""

from __future__ import annotations

import base64
import hashlib
import json
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sealbox.client import ImageRef, RegistryError, sign_image
from sealbox.errors import VerificationFailed
from sealbox.formats.sigstore import SigstoreSigner
from sealbox.samples.sigstore import write_payload
from sealbox.simplesigning import PAYLOAD_MEDIA_TYPE, SIGNATURE_ANNOTATION, build, parse
from tests.formats._registry import Registry, run_registry, sign_image_argv, skopeo
from tests.servers import Deployment, ServerProcess, env_without_proxy, start_server

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with run_registry(tmp_path_factory.mktemp("registry")) as r:
        yield r


@pytest.fixture
def server(sigstore_server: ServerProcess) -> ServerProcess:
    return sigstore_server


SIGSTORE_JSON = b"\x00sigstore-json\n"  # how containers/image writes a sigstore signature to dir:


def skopeo_verify(registry: Registry, image: str, public_key: Path, tmp: Path) -> str | None:
    """Why ``image`` does not verify (None: it does), as a ``sigstoreSigned`` policy with
    ``matchRepository`` would decide, by tools independent of sealbox: skopeo (containers/image)
    pulls the image by reference and reads its cosign attachment (``use-sigstore-attachments``),
    checking every blob against its digest; openssl checks each signature over its payload with
    ``public_key``; the payload must name the pulled manifest's digest and the repository.

    Debian 12's skopeo 1.9.3 cannot judge a ``sigstoreSigned`` policy itself (a Debian patch
    answers "sigstore disabled"), hence openssl for the signature (docs/formats/container.md)."""
    regd = tmp / "registries.d"
    regd.mkdir(exist_ok=True)
    (regd / "sealbox-test.yaml").write_text(
        f"docker:\n  {registry.host}:\n    use-sigstore-attachments: true\n"
    )
    dest = tmp / f"pulled-{time.monotonic_ns()}"
    skopeo(
        "copy", "--registries.d", str(regd), "--src-tls-verify=false", f"docker://{image}", f"dir:{dest}",
        cwd=tmp, policy=None,
    )  # fmt: skip
    manifest_digest = "sha256:" + hashlib.sha256((dest / "manifest.json").read_bytes()).hexdigest()
    reasons = []
    for i, path in enumerate(sorted(dest.glob("signature-*"))):
        data = path.read_bytes()
        if not data.startswith(SIGSTORE_JSON):
            reasons.append(f"{path.name}: not a sigstore signature")
            continue
        doc = json.loads(data[len(SIGSTORE_JSON) :])
        payload, sig = tmp / f"payload-{i}", tmp / f"payload-{i}.sig"
        payload.write_bytes(base64.b64decode(doc["payload"]))
        sig.write_bytes(base64.b64decode(doc["annotations"][SIGNATURE_ANNOTATION]))
        check = subprocess.run(
            ["openssl", "dgst", "-sha256", "-verify", str(public_key), "-signature", str(sig), str(payload)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        claims = json.loads(payload.read_bytes())["critical"]
        if check.returncode != 0:
            reasons.append(f"{path.name}: openssl: {check.stdout.strip() or check.stderr.strip()}")
        elif doc["mimeType"] != PAYLOAD_MEDIA_TYPE:
            reasons.append(f"{path.name}: media type {doc['mimeType']}")
        elif claims["image"]["docker-manifest-digest"] != manifest_digest:
            reasons.append(f"{path.name}: signs another manifest")
        elif _repository(claims["identity"]["docker-reference"]) != _repository(image):
            reasons.append(f"{path.name}: signs another repository")
        else:
            return None
    return "; ".join(reasons) or "no sigstore signature"


def _repository(reference: str) -> str:
    """``host[:port]/path`` of a reference, without its tag or digest."""
    name = reference.split("@")[0]
    head, _, last = name.rpartition("/")
    return f"{head}/{last.split(':')[0]}" if head else name


def _attachment(registry: Registry, repo: str, digest: str) -> dict[str, Any]:
    tag = digest.replace(":", "-") + ".sig"
    r = httpx.get(registry.url(repo, f"manifests/{tag}"), headers={"Accept": OCI_MANIFEST})
    assert r.status_code == 200, r.text
    manifest: dict[str, Any] = r.json()
    return manifest


def test_a_signed_image_verifies_with_skopeo_and_not_before(
    registry: Registry, server: ServerProcess, tmp_path: Path
) -> None:
    digest = registry.push("test/app", b"app v1\n")
    pub = server.deployment.public / "sigstore.pub"
    before = skopeo_verify(registry, f"{registry.host}/test/app@{digest}", pub, tmp_path)
    assert before == "no sigstore signature"
    with server.client() as c:
        s = sign_image(c, f"{registry.host}/test/app:1", insecure_registry=True)
    assert (s.digest, s.identity, s.added) == (digest, f"{registry.host}/test/app:1", True)
    assert s.attachment == f"{registry.host}/test/app:{digest.replace(':', '-')}.sig"
    # what skopeo reads: the payload blob and the signature annotation
    manifest = _attachment(registry, "test/app", digest)
    (layer,) = manifest["layers"]
    assert layer["mediaType"] == PAYLOAD_MEDIA_TYPE
    assert base64.b64decode(layer["annotations"][SIGNATURE_ANNOTATION]) == s.signature
    assert httpx.get(registry.url("test/app", f"blobs/{layer['digest']}")).content == s.payload
    # the independent verifiers: skopeo with the policy (by digest and by tag), openssl on the wire format
    for image in (f"{registry.host}/test/app@{digest}", f"{registry.host}/test/app:1"):
        assert skopeo_verify(registry, image, pub, tmp_path) is None
    (tmp_path / "p.json").write_bytes(s.payload)
    (tmp_path / "p.json.sig").write_bytes(s.signature)
    how = SigstoreSigner.verify(
        "sigstore", tmp_path / "p.json.sig", tmp_path / "p.json", server.deployment.public
    )
    assert how.startswith("openssl dgst -sha256 -verify")


def test_a_foreign_key_and_a_tampered_signature_fail(
    registry: Registry, server: ServerProcess, tmp_path: Path
) -> None:
    digest = registry.push("test/tamper", b"tamper\n")
    with server.client() as c:
        sign_image(c, f"{registry.host}/test/tamper@{digest}", insecure_registry=True)
    image = f"{registry.host}/test/tamper@{digest}"
    assert skopeo_verify(registry, image, server.deployment.public / "sigstore.pub", tmp_path) is None
    foreign = tmp_path / "foreign.pub"
    foreign.write_bytes(
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    assert "openssl: Verification failure" in (skopeo_verify(registry, image, foreign, tmp_path) or "")
    # flip one bit of the signature in the attachment, as an attacker with push rights could
    manifest = _attachment(registry, "test/tamper", digest)
    layer = manifest["layers"][0]
    sig = bytearray(base64.b64decode(layer["annotations"][SIGNATURE_ANNOTATION]))
    sig[-1] ^= 1
    layer["annotations"][SIGNATURE_ANNOTATION] = base64.b64encode(bytes(sig)).decode()
    tag = digest.replace(":", "-") + ".sig"
    put = httpx.put(
        registry.url("test/tamper", f"manifests/{tag}"),
        content=json.dumps(manifest).encode(),
        headers={"Content-Type": OCI_MANIFEST},
    )
    assert put.status_code == 201, put.text
    tampered = skopeo_verify(registry, image, server.deployment.public / "sigstore.pub", tmp_path)
    assert "openssl: Verification failure" in (tampered or ""), tampered


def test_the_cli_signs_by_digest_and_appends_to_an_existing_attachment(
    registry: Registry, server: ServerProcess, tmp_path: Path
) -> None:
    digest = registry.push("test/cli", b"cli\n")
    base = sign_image_argv(server, tmp_path)

    def run(*extra: str) -> dict[str, object]:
        res = subprocess.run(
            [*base, *extra], capture_output=True, text=True, env=env_without_proxy(), check=False
        )
        assert res.returncode == 0, res.stderr
        out: dict[str, object] = json.loads(res.stdout)["images"][0]
        return out

    first = run(f"{registry.host}/test/cli@{digest}")
    assert (first["digest"], first["identity"], first["added"]) == (digest, f"{registry.host}/test/cli", True)
    # a second signature (another identity) is appended, not clobbering the first (cosign's way)
    second = run("--identity", f"{registry.host}/test/cli:release", f"{registry.host}/test/cli:1")
    assert second["added"] is True
    # the same signature again: nothing to add
    assert run(f"{registry.host}/test/cli@{digest}")["added"] is False
    layers = _attachment(registry, "test/cli", digest)["layers"]
    identities = [
        parse(httpx.get(registry.url("test/cli", f"blobs/{layer['digest']}")).content).reference
        for layer in layers
    ]
    assert identities == [f"{registry.host}/test/cli", f"{registry.host}/test/cli:release"]
    image = f"{registry.host}/test/cli@{digest}"
    assert skopeo_verify(registry, image, server.deployment.public / "sigstore.pub", tmp_path) is None


def test_registry_errors_are_clear(registry: Registry, server: ServerProcess) -> None:
    with server.client() as c, pytest.raises(RegistryError, match="no such image"):
        sign_image(c, f"{registry.host}/test/absent:1", insecure_registry=True)
    wrong = "sha256:" + "0" * 64
    with server.client() as c, pytest.raises(RegistryError, match="no such image"):
        sign_image(c, f"{registry.host}/test/absent@{wrong}", insecure_registry=True)
    with pytest.raises(Exception, match="must name its registry"):
        ImageRef.parse("library/app:1")


GOOD = build("registry.example/team/app:1.0", "sha256:" + "ab" * 32, "sealbox tests")
MALFORMED = {
    "not JSON": b"{not json at all",
    "duplicate key": GOOD.replace(b'{"critical":', b'{"optional":null,"critical":', 1),
    "unexpected keys": GOOD.replace(b'"type":', b'"extra":1,"type":', 1),
    "docker-manifest-digest is not sha256": GOOD.replace(b"sha256:ab", b"sha512:ab", 1),
    "must name its registry": GOOD.replace(b"registry.example/", b"", 1),
    "critical.type is not": GOOD.replace(b"cosign container image", b"atomic container image", 1),
    "not UTF-8": GOOD.replace(b"sealbox tests", b"sealbox \xff tests", 1),
    "at most 4096 are accepted": GOOD + b" " * 5000,
    "is not a JSON object": b"[1, 2, 3, 4]",
    "nests too deeply": b"[" * 2000 + b"]" * 2000,  # under 4096 bytes (was an internal error)
}


def test_malformed_payloads_get_a_clean_refusal_with_the_reason(
    server: ServerProcess, tmp_path: Path
) -> None:
    with server.client(timeout=60) as c:
        for i, (reason, data) in enumerate(MALFORMED.items()):
            src = tmp_path / f"bad{i}.json"
            src.write_bytes(data)
            res = c.sign(src, ["sigstore"], tmp_path / "out" / src.name)
            assert not res.ok and "not a simple-signing payload" in (res.error or ""), res.error
            assert reason in (res.error or ""), (reason, res.error)
        good = write_payload(tmp_path, seed=7)
        assert c.sign(good, ["sigstore"], tmp_path / "out" / good.name).ok
    # the refusal as HTTP: a 4xx whose reason header says what is wrong
    data = MALFORMED["duplicate key"]
    sha1 = hashlib.sha1(data, usedforsecurity=False).hexdigest()
    ctx = ssl.create_default_context(cafile=str(server.deployment.ca))
    with httpx.Client(verify=ctx) as h:
        up = h.post(
            f"{server.server.url}/sign/sigstore",
            data={"sha1": sha1, "filename": "x.json", "token": server.token(), "nonce": ""},
            files={"filedata": ("x.json", data)},
        )
    assert 400 <= up.status_code < 500 and "duplicate key" in up.headers["X-Sealbox-Error"], up.headers
    # the wire format's verifier: openssl over the payload, a wrong signature fails
    sig = tmp_path / "out" / "payload.json.sig"
    SigstoreSigner.verify("sigstore", sig, good, server.deployment.public)
    sig.write_bytes(sig.read_bytes()[:-1] + bytes([sig.read_bytes()[-1] ^ 1]))
    with pytest.raises(VerificationFailed, match="openssl dgst -verify"):
        SigstoreSigner.verify("sigstore", sig, good, server.deployment.public)


def test_an_hsm_key_signs_images_skopeo_accepts(registry: Registry, tmp_path: Path) -> None:
    d = Deployment.create(tmp_path / "hsm", "release", ["sigstore"], hsm=True)
    assert 'kind = "pkcs11"' in d.config.read_text()
    assert not (d.root / "keys" / "sigstore.pem").exists()
    digest = registry.push("test/hsm", b"hsm\n")
    sp = start_server(d)
    try:
        with sp.client() as c:
            s = sign_image(c, f"{registry.host}/test/hsm:1", insecure_registry=True)
    finally:
        sp.stop()
    assert s.digest == digest
    assert (
        skopeo_verify(registry, f"{registry.host}/test/hsm@{digest}", d.public / "sigstore.pub", tmp_path)
        is None
    )
