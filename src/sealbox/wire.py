"""Every format name, in one table, and what follows from it.

One row per name a client, a task or a server config may use. Reading a row answers "where is
format X signed": ``family`` is the signer module ``sealbox/formats/<family>.py`` (its class:
:func:`sealbox.formats.signer_class`), ``in_process`` says whether a small job runs in the
server's signing worker processes (pure computation) or in a thread (a tool or native library).
The signer registry, each ``Signer``'s served names, the client's plan
(:mod:`sealbox.client`) and the task runner's packaging (:mod:`sealbox.task.behaviours`) are
derived from :data:`TABLE`.

Kept free of heavy imports: the CLI, the client and the task runner (on build workers) read it
without loading any signer code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = [
    "ALIASES",
    "FORMATS",
    "HASH_UPLOAD_HEADER",
    "INPUT_SHA1_HEADER",
    "KNOWN",
    "LOG_INDEX_HEADER",
    "REFUSAL_HEADER",
    "SMALL_FILE",
    "TABLE",
    "WAIT_HEADER",
    "Family",
    "Format",
    "Packaging",
    "for_task",
    "host_port",
    "https_url",
    "lookup",
    "of_family",
]

#: a signer module under ``sealbox/formats/``
Family = Literal[
    "gpg",
    "authenticode",
    "mar",
    "android",
    "emevoucher",
    "widevine",
    "macos",
    "sigstore",
    "rpm",
    "deb",
    "apt",
]
#: what the task runner does around the signing (:mod:`sealbox.task.behaviours`)
Packaging = Literal["authenticode", "widevine", "macapp", "apk", "apt"]


@dataclass(frozen=True)
class Format:
    """One format name and its properties."""

    name: str
    #: the signer module ``sealbox/formats/<family>.py``
    family: Family
    #: True: pure computation, small jobs run in the server's signing worker processes;
    #: False: a tool or a native library, run in a thread
    in_process: bool
    #: the output is a detached signature, which clients write next to the file with this suffix
    detached_suffix: str = ""
    #: 0: chains in the order asked; n > 0: after every other format, by ascending n (the
    #: detached signatures of the final bytes, in signtool's order)
    last: int = 0
    #: the task runner's packaging around the signing (zip members, archives, .dmg, .apk)
    task: Packaging | None = None
    #: a client-side name that travels under this wire name (signtool sends macapp as dmg)
    alias_of: str | None = None
    #: an ``.apk`` asked for under this name travels under that one (same key): the classic
    #: names sign v1 only (for callers that zipalign), the APK names v1+v2+v3
    apk_as: str | None = None


_IN_PROCESS, _TOOL = True, False  # the in_process column, spelled out

TABLE: tuple[Format, ...] = (
    Format("gpg", "gpg", _IN_PROCESS, detached_suffix=".asc", last=5),
    Format("sha2signcode", "authenticode", _TOOL, task="authenticode"),
    Format("sha2signcodestub", "authenticode", _TOOL, task="authenticode"),
    Format("sha2signcode-v2", "authenticode", _TOOL, task="authenticode"),
    Format("sha2signcodestub-v2", "authenticode", _TOOL, task="authenticode"),
    Format("signcode", "authenticode", _TOOL, task="authenticode"),
    Format("osslsigncode", "authenticode", _TOOL, task="authenticode"),
    Format("mar", "mar", _IN_PROCESS),
    Format("mar_sha384", "mar", _IN_PROCESS),
    Format("jar", "android", _TOOL, task="apk", apk_as="apk"),
    Format("focus-jar", "android", _TOOL, task="apk", apk_as="focus-apk"),
    Format("apk", "android", _TOOL, task="apk"),
    Format("focus-apk", "android", _TOOL, task="apk"),
    Format("emevoucher", "emevoucher", _IN_PROCESS),
    Format("widevine", "widevine", _IN_PROCESS, detached_suffix=".sig", last=1, task="widevine"),
    Format("widevine_blessed", "widevine", _IN_PROCESS, detached_suffix=".sig", last=2, task="widevine"),
    Format("dmg", "macos", _TOOL, last=4, task="macapp"),
    Format("macho", "macos", _TOOL),
    Format("macapp", "macos", _TOOL, last=3, task="macapp", alias_of="dmg"),
    # keeps its place in a chain: signtool moves only macapp and dmg last
    Format("dmgv2", "macos", _TOOL, task="macapp", alias_of="dmg"),
    # a container image's simple-signing payload (built by `sealbox sign-image`) -> DER ECDSA
    Format("sigstore", "sigstore", _IN_PROCESS, detached_suffix=".sig"),
    # Linux packages: an RPM's header signature (rpmsign), a .deb's debsigs origin signature
    Format("rpm", "rpm", _TOOL),
    Format("deb", "deb", _IN_PROCESS),
    # an APT repository's Release: the clear-signed InRelease, the detached Release.gpg (the
    # task runner writes both beside the Release)
    Format("apt-inrelease", "apt", _IN_PROCESS, task="apt"),
    Format("apt-release-gpg", "apt", _IN_PROCESS, detached_suffix=".gpg", last=6, task="apt"),
)

_BY_NAME = {f.name: f for f in TABLE}

#: every wire format name a server can serve
FORMATS = tuple(f.name for f in TABLE if f.alias_of is None)

#: client-side names that travel under another wire name
ALIASES = {f.name: f.alias_of for f in TABLE if f.alias_of is not None}

#: every name a client or a task may ask for
KNOWN = frozenset(_BY_NAME)


def lookup(name: str) -> Format | None:
    """The row of ``name`` (a wire name or an alias), None for an unknown name."""
    return _BY_NAME.get(name)


def of_family(family: Family) -> tuple[Format, ...]:
    """The wire names one signer serves, in table order (aliases travel under these)."""
    return tuple(f for f in TABLE if f.family == family and f.alias_of is None)


def for_task(task: Packaging) -> frozenset[str]:
    """Every name, aliases included, that gets this packaging in the task runner."""
    return frozenset(f.name for f in TABLE if f.task == task)


def host_port(host: str, port: int) -> str:
    """``host:port``, an IPv6 address in brackets (``[::1]:9110``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def https_url(host: str, port: int) -> str:
    """A server's base URL (``https://[::1]:9110``)."""
    return f"https://{host_port(host, port)}"


# sealbox's extensions of the classic protocol, named once for the client and the server
#: an upload asks to be answered as ``GET /sign/<fmt>/<sha1>`` would, waiting up to S seconds
WAIT_HEADER = "X-Sealbox-Wait"
#: an upload with this header ("1") and no ``sha1`` field is named by the SHA-1 of the
#: ``filedata`` received (a client that did not hash what it sent)
HASH_UPLOAD_HEADER = "X-Sealbox-Hash-Upload"
#: on every answer to an upload whose ``filedata`` was read whole: its SHA-1 as received
INPUT_SHA1_HEADER = "X-Sealbox-Input-SHA1"
#: a refusal's kind, one word of a fixed set (``token_...`` for the token, else the input)
REFUSAL_HEADER = "X-Sealbox-Refusal"
#: the signing log's index of a result, on the answer that delivers it
LOG_INDEX_HEADER = "X-Sealbox-Log-Index"


def log_index(text: str) -> int | None:
    """A signing log index as it travels (a header, a path segment): ASCII digits, 18 at most
    (``str.isdigit`` also takes other scripts' digits, and ``int`` refuses 4300 of them)."""
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 18 else None


#: Files up to this size are small, on both sides of the wire: the client reads one whole,
#: uploads it from memory and asks for the answer at once (``X-Sealbox-Wait``); the server
#: keeps the upload in memory, signs it in a signing worker process (in-process formats) and
#: stores it as a row, not a file.
SMALL_FILE = 256 * 1024
