"""Concurrent signers of one image. The cosign attachment is a read-modify-write of a tag and
registries have no conditional manifest PUT, so another signer's write can land while this one
merges, or right after its PUT from a signer that read the tag before it. Both moments are
made to happen here (the other signer's write injected at that point of a real ``sign_image``,
against Debian's docker-registry), and both signatures must survive."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sealbox.client import ImageSignature, RegistryError, sign_image
from sealbox.client._images import ATTACH_ATTEMPTS, _Registry
from sealbox.simplesigning import SIGNATURE_ANNOTATION, build
from tests.formats._registry import Registry, run_registry
from tests.servers import ServerProcess

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
PAYLOAD_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with run_registry(tmp_path_factory.mktemp("race-registry")) as r:
        yield r


def _tag(digest: str) -> str:
    return digest.replace(":", "-") + ".sig"


def _other_signature(
    server: ServerProcess, tmp: Path, image: str, digest: str, n: int = 0
) -> tuple[bytes, bytes]:
    """Another signer's signature of the image (another identity), made by the server."""
    payload = build(f"{image}:other{n}", digest, "another signer")
    src = tmp / f"other{n}.json"
    src.write_bytes(payload)
    with server.client() as c:
        c.sign_one(src, "sigstore", tmp / f"other{n}.json.sig")
    return payload, (tmp / f"other{n}.json.sig").read_bytes()


def _manifest(registry: Registry, repo: str, tag: str) -> bytes | None:
    r = httpx.get(registry.url(repo, f"manifests/{tag}"), headers={"Accept": OCI_MANIFEST})
    return None if r.status_code == 404 else r.raise_for_status().content


def _put_blob(registry: Registry, repo: str, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    start = httpx.post(registry.url(repo, "blobs/uploads/")).raise_for_status()
    url = httpx.URL(registry.url(repo, "")).join(start.headers["Location"])  # it carries its state
    httpx.put(url.copy_merge_params({"digest": digest}), content=data).raise_for_status()
    return digest


def _stale_write(
    registry: Registry, repo: str, tag: str, base: bytes | None, other: tuple[bytes, bytes]
) -> None:
    """The other signer's write: the attachment as it read it (``base``; None: none) plus its
    own layer, as cosign (or sealbox without the re-reads) writes it."""
    payload, signature = other
    if base is None:
        manifest: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}
        config: dict[str, Any] = {
            "architecture": "",
            "os": "",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": []},
        }
    else:
        manifest = json.loads(base)
        config = (
            httpx.get(registry.url(repo, f"blobs/{manifest['config']['digest']}")).raise_for_status().json()
        )
    layer_digest = _put_blob(registry, repo, payload)
    manifest["layers"].append({
        "mediaType": PAYLOAD_TYPE, "size": len(payload), "digest": layer_digest,
        "annotations": {SIGNATURE_ANNOTATION: base64.b64encode(signature).decode()},
    })  # fmt: skip
    config["rootfs"]["diff_ids"].append(layer_digest)
    config_bytes = json.dumps(config).encode()
    manifest["config"] = {
        "mediaType": OCI_CONFIG,
        "size": len(config_bytes),
        "digest": _put_blob(registry, repo, config_bytes),
    }
    httpx.put(
        registry.url(repo, f"manifests/{tag}"), content=json.dumps(manifest).encode(),
        headers={"Content-Type": OCI_MANIFEST},
    ).raise_for_status()  # fmt: skip


def _signatures(registry: Registry, repo: str, tag: str) -> list[bytes]:
    found = _manifest(registry, repo, tag)
    assert found is not None
    return [
        base64.b64decode(layer["annotations"][SIGNATURE_ANNOTATION]) for layer in json.loads(found)["layers"]
    ]


def _image(
    registry: Registry, server: ServerProcess, tmp: Path, repo: str, others: int = 1
) -> tuple[str, list[tuple[bytes, bytes]]]:
    """A new image ``repo:1`` and ``others`` signatures of it by other signers."""
    digest = registry.push(repo, repo.encode() + b"\n")
    return digest, [
        _other_signature(server, tmp, f"{registry.host}/{repo}", digest, n) for n in range(others)
    ]


def _sign(registry: Registry, server: ServerProcess, repo: str, digest: str) -> ImageSignature:
    with server.client() as c:
        return sign_image(c, f"{registry.host}/{repo}@{digest}", insecure_registry=True)


def test_a_signature_written_while_this_one_merges_is_kept(
    registry: Registry, sigstore_server: ServerProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = "race/meanwhile"
    digest, (other,) = _image(registry, sigstore_server, tmp_path, repo)
    upload = _Registry.put_blob
    injected: list[bool] = []

    async def put_blob(self: _Registry, data: bytes) -> str:
        if not injected:  # it has read the tag (no attachment yet): the other signer writes now
            injected.append(True)
            _stale_write(registry, repo, _tag(digest), None, other)
        return await upload(self, data)

    monkeypatch.setattr(_Registry, "put_blob", put_blob)
    s = _sign(registry, sigstore_server, repo, digest)
    assert injected and s.added
    assert _signatures(registry, repo, _tag(digest)) == [other[1], s.signature]


def test_a_signature_dropped_right_after_the_put_is_merged_again(
    registry: Registry, sigstore_server: ServerProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = "race/after"
    digest, (other,) = _image(registry, sigstore_server, tmp_path, repo)
    put = _Registry.put_manifest
    puts: list[bytes] = []

    async def put_manifest(self: _Registry, tag: str, data: bytes, media_type: str) -> None:
        before = _manifest(registry, repo, tag)  # what a signer that read before this PUT saw
        await put(self, tag, data, media_type)
        puts.append(data)
        if len(puts) == 1:  # ... and wrote after it
            _stale_write(registry, repo, tag, before, other)

    monkeypatch.setattr(_Registry, "put_manifest", put_manifest)
    s = _sign(registry, sigstore_server, repo, digest)
    assert s.added and len(puts) == 2  # its layer was gone: merged into what the other wrote
    assert _signatures(registry, repo, _tag(digest)) == [other[1], s.signature]


def test_a_tag_that_never_settles_is_an_error(
    registry: Registry, sigstore_server: ServerProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = "race/never"
    digest, others = _image(registry, sigstore_server, tmp_path, repo, ATTACH_ATTEMPTS)
    put = _Registry.put_manifest
    puts: list[bytes] = []

    async def put_manifest(self: _Registry, tag: str, data: bytes, media_type: str) -> None:
        before = _manifest(registry, repo, tag)
        await put(self, tag, data, media_type)
        _stale_write(registry, repo, tag, before, others[len(puts)])  # every time
        puts.append(data)

    monkeypatch.setattr(_Registry, "put_manifest", put_manifest)
    with pytest.raises(RegistryError, match="kept changing under other signers"):
        _sign(registry, sigstore_server, repo, digest)
    assert len(puts) == ATTACH_ATTEMPTS
    assert _signatures(registry, repo, _tag(digest)) == [o[1] for o in others]  # theirs, none lost
