"""Container image inputs: a simple-signing payload (what format ``sigstore`` signs) and a tiny
OCI image layout (one small layer) that ``skopeo copy oci:DIR:TAG docker://...`` pushes."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

from ..simplesigning import build


def write_payload(
    directory: Path,
    name: str = "payload.json",
    reference: str = "registry.example/sealbox/app:1.0",
    seed: int = 0,
) -> Path:
    """A payload for an image whose manifest digest is derived from ``seed`` (distinct seeds,
    distinct payloads)."""
    digest = "sha256:" + hashlib.sha256(f"sealbox sample image {seed}".encode()).hexdigest()
    path = directory / name
    path.write_bytes(build(reference, digest, "sealbox samples"))
    return path


def _blob(layout: Path, data: bytes) -> dict[str, object]:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def write_oci_layout(directory: Path, tag: str = "1", content: bytes = b"hello from sealbox\n") -> Path:
    """An OCI image layout in ``directory/image`` holding one image tagged ``tag``: a gzipped
    layer with ``/hello.txt`` (``content``), its config and manifest. Returns the layout dir."""
    layout = directory / "image"
    (layout / "blobs" / "sha256").mkdir(parents=True)
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("hello.txt")
        info.size, info.mode, info.mtime = len(content), 0o644, 0
        tf.addfile(info, io.BytesIO(content))
    raw = tar_bytes.getvalue()
    layer = _blob(layout, gzip.compress(raw, mtime=0))
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/hello.txt"]},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(raw).hexdigest()]},
    }
    config_desc = _blob(layout, json.dumps(config).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config_desc},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **layer}],
    }
    manifest_desc = _blob(layout, json.dumps(manifest).encode())
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                **manifest_desc,
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(index))
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    return layout
