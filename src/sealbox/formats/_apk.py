"""Unsigned Android APK and Java JAR inputs, built in pure Python (no Android SDK): the Android
signer's start-up probe, and (through :mod:`sealbox.samples.android`) the demo, bench and tests.

The APK holds a hand-encoded binary ``AndroidManifest.xml`` (AXML), a deflated asset and a
STORED ``res/raw/blob.bin`` placed at an odd offset, so ``zipalign`` has real work to do.
"""

from __future__ import annotations

import os
import struct
import zipfile
from pathlib import Path

ANDROID_NS = "http://schemas.android.com/apk/res/android"
_FIXED_TIME = (2024, 1, 1, 0, 0, 0)

# android.R.attr ids, in the order their names open the string pool
_ATTRS = (
    ("versionCode", 0x0101021B),
    ("versionName", 0x0101021C),
    ("minSdkVersion", 0x0101020C),
    ("targetSdkVersion", 0x01010270),
    ("label", 0x01010001),
    ("hasCode", 0x0101000C),
)

_T_STRING, _T_INT_DEC, _T_BOOL = 0x03, 0x10, 0x12
_NONE = 0xFFFFFFFF


def _string_pool(strings: list[str]) -> bytes:
    data = bytearray()
    offsets = []
    for s in strings:
        offsets.append(len(data))
        units = s.encode("utf-16-le")
        data += struct.pack("<H", len(units) // 2) + units + b"\x00\x00"
    while len(data) % 4:
        data += b"\x00"
    header_size = 28
    strings_start = header_size + 4 * len(strings)
    size = strings_start + len(data)
    head = struct.pack("<HHIIIIII", 0x0001, header_size, size, len(strings), 0, 0, strings_start, 0)
    return head + b"".join(struct.pack("<I", o) for o in offsets) + bytes(data)


def binary_manifest(
    package: str,
    min_sdk: int = 24,
    target_sdk: int = 33,
    version_code: int = 1,
    version_name: str = "1.0",
    label: str = "sealbox sample",
) -> bytes:
    """A binary (AXML) AndroidManifest.xml with uses-sdk and a code-less application."""
    strings = [name for name, _ in _ATTRS]
    strings += [
        "android",
        ANDROID_NS,
        "manifest",
        "uses-sdk",
        "application",
        "package",
        package,
        version_name,
        label,
    ]
    idx = {s: i for i, s in enumerate(strings)}
    ns = idx[ANDROID_NS]

    def attr(name: str, kind: int, value: int | str, namespace: int = ns) -> bytes:
        if isinstance(value, str):
            raw = data = idx[value]
        else:
            raw, data = _NONE, value & 0xFFFFFFFF
        return struct.pack("<IIIHBBI", namespace, idx[name], raw, 8, 0, kind, data)

    def start(name: str, attrs: list[bytes], line: int) -> bytes:
        body = struct.pack("<IIHHHHHH", _NONE, idx[name], 20, 20, len(attrs), 0, 0, 0) + b"".join(attrs)
        return struct.pack("<HHIII", 0x0102, 16, 16 + len(body), line, _NONE) + body

    def end(name: str, line: int) -> bytes:
        return struct.pack("<HHIIIII", 0x0103, 16, 24, line, _NONE, _NONE, idx[name])

    def namespace(kind: int, line: int) -> bytes:
        return struct.pack("<HHIIIII", kind, 16, 24, line, _NONE, idx["android"], ns)

    resmap = struct.pack("<HHI", 0x0180, 8, 8 + 4 * len(_ATTRS)) + b"".join(
        struct.pack("<I", rid) for _, rid in _ATTRS
    )
    body = b"".join(
        [
            _string_pool(strings),
            resmap,
            namespace(0x0100, 1),
            start(
                "manifest",
                [
                    attr("package", _T_STRING, package, _NONE),
                    attr("versionCode", _T_INT_DEC, version_code),
                    attr("versionName", _T_STRING, version_name),
                ],
                1,
            ),
            start(
                "uses-sdk",
                [
                    attr("minSdkVersion", _T_INT_DEC, min_sdk),
                    attr("targetSdkVersion", _T_INT_DEC, target_sdk),
                ],
                2,
            ),
            end("uses-sdk", 2),
            start(
                "application",
                [
                    attr("label", _T_STRING, label),
                    attr("hasCode", _T_BOOL, 0),
                ],
                3,
            ),
            end("application", 3),
            end("manifest", 1),
            namespace(0x0101, 1),
        ]
    )
    return struct.pack("<HHI", 0x0003, 8, 8 + len(body)) + body


def _member(zf: zipfile.ZipFile, name: str, data: bytes, method: int = zipfile.ZIP_DEFLATED) -> None:
    info = zipfile.ZipInfo(name, _FIXED_TIME)
    info.compress_type = method
    info.external_attr = 0o644 << 16
    zf.writestr(info, data)


def write_apk(
    directory: Path,
    name: str = "app.apk",
    min_sdk: int = 24,
    target_sdk: int = 33,
    package: str = "org.sealbox.sample",
    blob_size: int = 4099,
) -> Path:
    """Write a minimal valid, unsigned and unaligned APK into ``directory``; returns its path."""
    path = Path(directory) / name
    with zipfile.ZipFile(path, "w") as zf:
        _member(zf, "AndroidManifest.xml", binary_manifest(package, min_sdk, target_sdk))
        _member(zf, "assets/hello.txt", b"Hello from a sealbox sample APK.\n" * 8)
        # STORED, after a member whose name length leaves its data unaligned: zipalign must pad it
        _member(zf, "res/raw/blob.bin", os.urandom(blob_size), zipfile.ZIP_STORED)
    return path


def write_jar(directory: Path, name: str = "lib.jar", extra_size: int = 0) -> Path:
    """Write a small unsigned JAR (manifest, a class-like blob, a resource) into ``directory``."""
    path = Path(directory) / name
    manifest = b"Manifest-Version: 1.0\r\nCreated-By: sealbox samples\r\n\r\n"
    with zipfile.ZipFile(path, "w") as zf:
        _member(zf, "META-INF/", b"", zipfile.ZIP_STORED)
        _member(zf, "META-INF/MANIFEST.MF", manifest)
        _member(zf, "org/sealbox/sample/Hello.class", b"\xca\xfe\xba\xbe" + os.urandom(512))
        _member(zf, "org/sealbox/sample/messages.properties", b"greeting=Hello from sealbox\n")
        if extra_size:
            _member(zf, "org/sealbox/sample/data.bin", os.urandom(extra_size))
    return path
