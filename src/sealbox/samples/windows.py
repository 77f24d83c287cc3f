"""Unsigned Windows inputs beyond PE for the Authenticode formats (demo, bench, tests), made on
the spot: a real MSI from ``wixl`` (Debian ``wixl``), a CAB from ``gcab`` (Debian ``gcab``), a
security catalog (DER, built here: no catalog maker runs on Linux), an APPX/MSIX package (a zip
with its manifest, content types and block map) and a PowerShell script.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import os
import shutil
import subprocess
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

from ..formats._cab import SPC_CAB_DATA
from ..formats._cms import (
    INTEGER,
    NULL,
    OCTET_STRING,
    OID_SIGNED_DATA,
    SEQUENCE,
    SET,
    UTC_TIME,
    attribute,
    integer,
    oid,
    set_of,
    tlv,
)
from ..formats._pe import SPC_INDIRECT_DATA, spc_indirect_data
from ..winfiles import OID_CTL

__all__ = ["write_appx", "write_cab", "write_cat", "write_ps1", "write_wixl_msi"]

_FILES = {"readme.txt": b"sealbox sample\n", "data.bin": bytes(range(256)) * 64}
_EPOCH = 1_700_000_000  # fixed member times: the same arguments give the same bytes

# object identifiers
_OID_CATALOG_LIST = oid("1.3.6.1.4.1.311.12.1.1")
_OID_CATALOG_V2 = oid("1.3.6.1.4.1.311.12.1.3")
_OID_NAME_VALUE = oid("1.3.6.1.4.1.311.12.2.1")
_BMP_STRING = 0x1E


def write_wixl_msi(directory: Path, name: str = "setup.msi", payload: bytes = b"sealbox\n") -> Path:
    """A real Windows Installer package (tables, a cabinet) built by ``wixl`` from a tiny .wxs."""
    wxs = """<?xml version="1.0" encoding="utf-8"?>
<Wix xmlns="http://schemas.microsoft.com/wix/2006/wi">
  <Product Id="*" Name="sealbox sample" Language="1033" Version="1.0.0" Manufacturer="sealbox"
           UpgradeCode="6c4c3c3e-1d0e-4a53-9b8c-5b1a3f7e0a11">
    <Package InstallerVersion="200" Compressed="yes" Comments="sealbox sample"/>
    <Media Id="1" Cabinet="sample.cab" EmbedCab="yes"/>
    <Directory Id="TARGETDIR" Name="SourceDir">
      <Directory Id="ProgramFilesFolder">
        <Directory Id="INSTALLDIR" Name="sealbox">
          <Component Id="Payload" Guid="0f5d6a7e-8d2b-4c1e-9a3f-2b7c6d5e4f30">
            <File Id="payload" Name="payload.txt" Source="payload.txt" KeyPath="yes"/>
          </Component>
        </Directory>
      </Directory>
    </Directory>
    <Feature Id="Main" Level="1"><ComponentRef Id="Payload"/></Feature>
  </Product>
</Wix>
"""
    dest = Path(directory) / name
    with tempfile.TemporaryDirectory(prefix="sealbox-wixl-") as tmp:
        (Path(tmp) / "payload.txt").write_bytes(payload)
        (Path(tmp) / "sample.wxs").write_text(wxs)
        _run(["wixl", "-o", str(dest.absolute()), "sample.wxs"], Path(tmp))
    return dest


def write_cab(directory: Path, name: str = "sample.cab", files: Mapping[str, bytes] | None = None) -> Path:
    """A compressed cabinet of ``files`` (name -> bytes) made by ``gcab``."""
    dest = Path(directory) / name
    with tempfile.TemporaryDirectory(prefix="sealbox-gcab-") as tmp:
        members = dict(files or _FILES)
        for member, data in members.items():
            (Path(tmp) / member).write_bytes(data)
            os.utime(Path(tmp) / member, (_EPOCH, _EPOCH))
        _run(["gcab", "--create", "--zip", str(dest.absolute()), *members], Path(tmp))
    return dest


def _run(argv: list[str], cwd: Path) -> None:
    if shutil.which(argv[0]) is None:
        raise FileNotFoundError(f"{argv[0]} is not installed (apt-get install {argv[0]})")
    subprocess.run(argv, cwd=cwd, check=True, capture_output=True, stdin=subprocess.DEVNULL)


def _catalog_member(name: str, data: bytes) -> bytes:
    """One catalog entry: the file's SHA-256 as its tag, its name, its hash as indirect data."""
    digest = hashlib.sha256(data).digest()
    file_name = tlv(
        SEQUENCE,
        tlv(_BMP_STRING, "File".encode("utf-16-be")),
        integer(0x10010001),  # flags: name/value pair, attribute is read only
        tlv(OCTET_STRING, (name + "\0").encode("utf-16-le")),
    )
    indirect = spc_indirect_data(SPC_CAB_DATA, tlv(0xA2, tlv(0x80)), digest)  # SpcLink: an empty file name
    attributes = [
        attribute(_OID_NAME_VALUE, file_name),
        attribute(SPC_INDIRECT_DATA, indirect),
    ]
    return tlv(SEQUENCE, tlv(OCTET_STRING, digest), set_of(attributes))


def catalog_bytes(files: Mapping[str, bytes], when: dt.datetime | None = None) -> bytes:
    """An unsigned security catalog (PKCS#7 SignedData without signers holding a certificate
    trust list of ``files``' SHA-256 hashes), what ``makecat`` writes before ``signtool``."""
    stamp = (when or dt.datetime.fromtimestamp(_EPOCH, dt.UTC)).strftime("%y%m%d%H%M%SZ").encode()
    ctl = tlv(
        SEQUENCE,
        tlv(SEQUENCE, _OID_CATALOG_LIST),  # subject usage
        tlv(OCTET_STRING, hashlib.sha256("/".join(sorted(files)).encode()).digest()[:16]),  # list identifier
        tlv(UTC_TIME, stamp),
        tlv(SEQUENCE, _OID_CATALOG_V2, tlv(NULL)),  # subject algorithm: catalog version 2
        tlv(SEQUENCE, *(_catalog_member(n, d) for n, d in sorted(files.items()))),
    )
    signed = tlv(
        SEQUENCE,
        tlv(INTEGER, b"\x01"),
        tlv(SET),  # no digest algorithms: no signer yet
        tlv(SEQUENCE, OID_CTL, tlv(0xA0, ctl)),
        tlv(SET),  # no signer infos
    )
    return tlv(SEQUENCE, OID_SIGNED_DATA, tlv(0xA0, signed))


def write_cat(directory: Path, name: str = "sample.cat", files: Mapping[str, bytes] | None = None) -> Path:
    """An unsigned security catalog listing ``files`` (name -> bytes)."""
    dest = Path(directory) / name
    dest.write_bytes(catalog_bytes(files or _FILES))
    return dest


_CONTENT_TYPES = """<?xml version="1.0" encoding="UTF-8"?>
<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">\
<Default Extension="txt" ContentType="text/plain"/>\
<Default Extension="xml" ContentType="application/vnd.ms-appx.manifest+xml"/>\
<Override PartName="/AppxBlockMap.xml" ContentType="application/vnd.ms-appx.blockmap+xml"/>\
</Types>"""

_MANIFEST = """<?xml version="1.0" encoding="utf-8"?>
<Package xmlns="http://schemas.microsoft.com/appx/manifest/foundation/windows10"
         xmlns:uap="http://schemas.microsoft.com/appx/manifest/uap/windows10"
         IgnorableNamespaces="uap">
  <Identity Name="Sealbox.Sample" Publisher="{publisher}" Version="1.0.0.0" ProcessorArchitecture="neutral"/>
  <Properties>
    <DisplayName>sealbox sample</DisplayName>
    <PublisherDisplayName>sealbox</PublisherDisplayName>
    <Logo>readme.txt</Logo>
  </Properties>
  <Dependencies>
    <TargetDeviceFamily Name="Windows.Universal" MinVersion="10.0.17763.0" MaxVersionTested="10.0.22621.0"/>
  </Dependencies>
  <Resources><Resource Language="en-us"/></Resources>
  <Applications/>
</Package>
"""
_BLOCK = 64 * 1024


def _block_map(files: Mapping[str, bytes]) -> bytes:
    """AppxBlockMap.xml: each stored file's SHA-256 per 64 KiB block (no Size: not compressed)."""
    parts = []
    for name, data in files.items():
        blocks = "".join(
            f'<Block Hash="{base64.b64encode(hashlib.sha256(data[i : i + _BLOCK]).digest()).decode()}"/>'
            for i in range(0, len(data), _BLOCK)
        )
        lfh = 30 + len(name.encode())
        parts.append(
            f'<File Name="{name.replace("/", chr(92))}" Size="{len(data)}" LfhSize="{lfh}">{blocks}</File>'
        )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<BlockMap xmlns="http://schemas.microsoft.com/appx/2010/blockmap" '
        f'HashMethod="http://www.w3.org/2001/04/xmlenc#sha256">{"".join(parts)}</BlockMap>'
    ).encode()


def write_appx(directory: Path, name: str = "sample.msix", publisher: str = "CN=sealbox") -> Path:
    """An unsigned APPX/MSIX package (zip: manifest, payload and block map stored, content
    types deflated as MakeAppx deflates them: osslsigncode 2.9 writes a stored one back deflated
    under the "stored" method, a member no unzip can read).

    ``publisher`` must be the signing certificate's subject (RFC 4514, as Windows writes it)
    for Windows to install the signed package; osslsigncode does not check it."""
    files = {"AppxManifest.xml": _MANIFEST.format(publisher=publisher).encode(), **_FILES}
    dest = Path(directory) / name
    when = dt.datetime.fromtimestamp(_EPOCH, dt.UTC).timetuple()[:6]
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as z:
        for member, data in [*files.items(), ("AppxBlockMap.xml", _block_map(files))]:
            z.writestr(zipfile.ZipInfo(member, when), data)
        types = zipfile.ZipInfo("[Content_Types].xml", when)
        types.compress_type = zipfile.ZIP_DEFLATED
        z.writestr(types, _CONTENT_TYPES.encode())
    return dest


_SCRIPT = (
    "# sealbox sample script\n",
    "param([string]$Name = 'world')\n",
    'Write-Output "Hello, $Name"\n',
)


def write_ps1(directory: Path, name: str = "sample.ps1", *, bom: bool = False, crlf: bool = False) -> Path:
    """A small PowerShell script, UTF-8 with or without a byte-order mark, LF or CRLF lines."""
    text = "".join(_SCRIPT)
    if crlf:
        text = text.replace("\n", "\r\n")
    dest = Path(directory) / name
    dest.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return dest
