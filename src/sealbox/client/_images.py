"""Container image signing: resolve an image in an OCI registry, have its simple-signing
payload signed by a sealbox server (format ``sigstore``, through the normal signing client),
and push the signature as a cosign attachment (``sha256-<hex>.sig``), as ``cosign sign`` and
``skopeo copy --sign-by-sigstore-private-key`` store it. See docs/formats/container.md.

Only the few OCI distribution API calls this needs: GET a manifest or a blob, a blob upload
(POST then PUT), a manifest PUT. A registry that asks for credentials (``401``) gets them as
its challenge says: HTTP Basic, or a Bearer token from its token service (the distribution
token protocol: Docker Hub, GHCR, GitLab, Harbor, Quay...; with an identity token, its OAuth2
refresh-token grant, as ACR logins need), the login taken from a containers auth file
(:class:`RegistryAuth`). Docker Hub is ``docker.io`` (its API at ``registry-1.docker.io``,
one-part names under ``library/``), as docker and containers/image name it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import os
import re
import ssl
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import aiohttp
import yarl

from .. import __version__
from ..simplesigning import (
    ATTACHMENT_SUFFIX,
    PAYLOAD_MEDIA_TYPE,
    SIGNATURE_ANNOTATION,
    PayloadError,
    build,
    check_digest,
    check_reference,
)
from ._aio import USER_AGENT, describe_error
from ._errors import ClientError

if TYPE_CHECKING:
    from ._aio import AsyncSigningClient
    from ._core import SigningClient

__all__ = [
    "ImageRef",
    "ImageSignature",
    "RegistryAuth",
    "RegistryError",
    "RegistryLogin",
    "sign_image",
    "sign_image_async",
]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
#: what an image reference may resolve to (schema 1 manifests, long deprecated, are refused)
IMAGE_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST)
#: manifests and attachment configs are small; a larger answer is not one
MAX_DOCUMENT = 4 * 1024 * 1024
REGISTRY_TIMEOUT = 60.0
#: how often a signature is merged into an attachment that other signers keep changing
ATTACH_ATTEMPTS = 5
FORMAT = "sigstore"

_REF = re.compile(r"(?P<name>[^@]+?)(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@(?P<digest>[^@]+))?")

#: Docker Hub: the name images and signatures use, the other names it goes by (auth files key
#: it as docker writes it, ``https://index.docker.io/v1/``), and where its API answers
DOCKER_HUB = "docker.io"
DOCKER_HUB_ALIASES = ("index.docker.io", "registry-1.docker.io")
DOCKER_HUB_API = "registry-1.docker.io"
#: the server name docker gives credential helpers for Docker Hub
DOCKER_HUB_HELPER_URL = "https://index.docker.io/v1/"
#: what an OAuth2 token request names as its client (docker's is "docker")
OAUTH_CLIENT_ID = "sealbox"


class RegistryError(ClientError):
    """The registry refused a request, did not answer, or holds something unexpected."""


class RegistryLogin(NamedTuple):
    """A registry login: a user and password, or (``identity_token``) an identity token, the
    OAuth2 refresh token ``docker login`` keeps for registries such as ACR, which only the
    registry's token service takes. ``repr`` never shows the secret."""

    user: str
    secret: str
    identity_token: bool = False

    def __repr__(self) -> str:
        kind = "identity token" if self.identity_token else "password"
        return f"RegistryLogin({self.user!r}, <{kind}>)"


class RegistryAuth:
    """Registry logins from a containers auth file: podman's and skopeo's ``auth.json`` or
    docker's ``config.json`` (``{"auths": {"registry.example": {"auth": base64("user:pass")}}}``;
    a key may also name ``registry/namespace``, the longest match wins), or from the credential
    helper it names for the registry (``credHelpers``) or for all (``credsStore``): the program
    ``docker-credential-<name>``, asked ``get`` (as docker, podman and skopeo ask it; ECR, GCR and
    ACR logins come that way). An entry's ``identitytoken``, or a helper's ``<token>`` user, is an
    identity token (:class:`RegistryLogin`). Docker Hub's entry may be keyed by any of its names. Never
    shows a password or token (``repr`` names the registries and helpers only).

    >>> auth = RegistryAuth.load(Path("~/.config/containers/auth.json").expanduser())
    """

    def __init__(
        self,
        logins: Mapping[str, RegistryLogin],
        helpers: Mapping[str, str] | None = None,
        store: str | None = None,
    ) -> None:
        self._logins = dict(logins)
        self._helpers = dict(helpers or {})  # registry -> helper name
        self._store = store  # the helper for every other registry

    def __repr__(self) -> str:
        return f"RegistryAuth({sorted(self._logins)}, helpers={self._helpers}, store={self._store!r})"

    @classmethod
    def load(cls, path: Path) -> RegistryAuth:
        """Read an auth file; :class:`ClientError` if it cannot be read or is malformed."""
        try:
            document = json.loads(path.read_bytes())
        except OSError as e:
            raise ClientError(f"registry auth file {path}: {e.strerror or e}") from None
        except ValueError as e:
            raise ClientError(f"registry auth file {path}: not JSON ({e})") from None
        auths = document.get("auths", {}) if isinstance(document, dict) else None
        if not isinstance(auths, dict):
            raise ClientError(f"registry auth file {path}: 'auths' must be an object")
        logins: dict[str, RegistryLogin] = {}
        for key, entry in auths.items():
            where = _auth_key(str(key))
            found = _entry_login(entry if isinstance(entry, dict) else {})
            if found is None:
                raise ClientError(
                    f"registry auth file {path}: the entry for {where} is not base64 of user:password"
                )
            if found.user or found.secret:  # an empty entry: nothing usable here
                logins[where] = found
        helpers = document.get("credHelpers", {})
        store = document.get("credsStore") or None
        if not isinstance(helpers, dict) or not all(_HELPER.fullmatch(str(h)) for h in helpers.values()):
            raise ClientError(f"registry auth file {path}: 'credHelpers' must map registries to helper names")
        if store is not None and not (isinstance(store, str) and _HELPER.fullmatch(store)):
            raise ClientError(f"registry auth file {path}: 'credsStore' must be a helper name")
        return cls(logins, {_auth_key(str(k)): str(v) for k, v in helpers.items()}, store)

    @staticmethod
    def default_file() -> Path | None:
        """Where skopeo and podman look, in their order: ``$REGISTRY_AUTH_FILE``,
        ``$XDG_RUNTIME_DIR/containers/auth.json``, ``~/.config/containers/auth.json``,
        ``~/.docker/config.json``; the first that exists (None: no file)."""
        candidates = [os.environ.get("REGISTRY_AUTH_FILE", "")]
        if os.environ.get("XDG_RUNTIME_DIR"):
            candidates.append(os.path.join(os.environ["XDG_RUNTIME_DIR"], "containers", "auth.json"))
        candidates += ["~/.config/containers/auth.json", "~/.docker/config.json"]
        for candidate in candidates:
            if candidate and (path := Path(candidate).expanduser()).is_file():
                return path
        return None

    def login(self, image: ImageRef) -> RegistryLogin | None:
        """The login for ``image``: from the registry's own helper, else the entry naming the
        longest prefix of registry/repository, else from the helper for all (None: no login).
        A helper is a program: call this off the event loop. Raises :class:`ClientError` if a
        helper fails or answers something unusable."""
        names = _auth_names(image.registry)
        asked = DOCKER_HUB_HELPER_URL if image.registry == DOCKER_HUB else image.registry
        helper = next((self._helpers[n] for n in names if n in self._helpers), None)
        if helper is not None:
            return _ask_helper(helper, asked)
        parts = image.repository.split("/")
        for n in range(len(parts), -1, -1):
            for name in names:
                found = self._logins.get("/".join([name, *parts[:n]]))
                if found is not None:
                    return found
        return _ask_helper(self._store, asked) if self._store is not None else None

    def missing(self, image: ImageRef) -> str:
        """Why there is no login for ``image``, for an error message."""
        if self._store is not None:
            return f"credential helper docker-credential-{self._store} has no login for {image.registry}"
        return f"no login for {image.registry} in the registry auth file"


#: a credential helper's name: the program is docker-credential-<name>, found on PATH
_HELPER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
HELPER_TIMEOUT = 60.0


def _ask_helper(name: str, registry: str) -> RegistryLogin | None:
    """``docker-credential-<name> get`` with the registry on stdin (the docker credential helper
    protocol): its login (user ``<token>``: an identity token), or None if it has none."""
    program = f"docker-credential-{name}"
    try:
        res = subprocess.run(
            [program, "get"],
            input=registry.encode(),
            capture_output=True,
            timeout=HELPER_TIMEOUT,
            check=False,
        )
    except FileNotFoundError:
        raise ClientError(f"credential helper {program} (named for {registry}) is not on PATH") from None
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ClientError(f"credential helper {program}: {e}") from None
    if res.returncode != 0:
        said = res.stdout.decode(errors="replace").strip() + res.stderr.decode(errors="replace").strip()
        if "credentials not found" in said.lower():  # the protocol's answer for "no login"
            return None
        # what a helper prints is not echoed: it could hold a secret
        raise ClientError(f"credential helper {program} failed for {registry} (exit status {res.returncode})")
    try:
        answer = json.loads(res.stdout)
        user, secret = answer["Username"], answer["Secret"]
    except (ValueError, KeyError, TypeError):
        user = secret = None
    if not isinstance(user, str) or not isinstance(secret, str) or not user:
        raise ClientError(f"credential helper {program} answered no Username and Secret for {registry}")
    if user == "<token>" and not secret:
        raise ClientError(f"credential helper {program} answered an empty identity token for {registry}")
    return RegistryLogin(user, secret, identity_token=user == "<token>")


def _entry_login(entry: Mapping[str, Any]) -> RegistryLogin | None:
    """An ``auths`` entry's login: its ``identitytoken`` (the user, if any, from ``auth``), else
    ``auth`` = base64("user:password"); an empty login if it has neither; None if malformed."""
    encoded, token = entry.get("auth") or "", entry.get("identitytoken") or ""
    user, password = "", ""
    if encoded:
        try:
            user, sep, password = base64.b64decode(str(encoded), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        if not sep or not (user or token):
            return None
    if token:
        return RegistryLogin(user or "<token>", str(token), identity_token=True)
    return RegistryLogin(user, password)


def _auth_key(key: str) -> str:
    """An ``auths`` key as ``registry[/namespace]``: docker writes URLs (``https://host/v1/``)."""
    if "://" in key:
        key = key.split("://", 1)[1].split("/", 1)[0]
    return key.rstrip("/")


def _auth_names(registry: str) -> tuple[str, ...]:
    """The names an auth file may key ``registry`` by (Docker Hub has three)."""
    return (DOCKER_HUB, *DOCKER_HUB_ALIASES) if registry == DOCKER_HUB else (registry,)


def _basic(login: RegistryLogin) -> str:
    return "Basic " + base64.b64encode(f"{login.user}:{login.secret}".encode()).decode()


def _challenge(header: str) -> tuple[str, dict[str, str]]:
    """``WWW-Authenticate``'s scheme (lower case) and parameters (``realm``, ``service``,
    ``scope``...)."""
    scheme, _, rest = header.strip().partition(" ")
    params = {k.lower(): v for k, v in re.findall(r'(\w+)="([^"]*)"', rest)}
    return scheme.lower(), params


@dataclass(frozen=True)
class ImageRef:
    """``registry/repository`` with a tag, a digest or both (the digest wins)."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> ImageRef:
        """``host[:port]/path:tag``, ``host[:port]/path@sha256:...`` (or both); the registry
        must be named (a host with a dot or a port, or ``localhost``). Docker Hub's names
        become ``docker.io``, and a one-part name there ``library/NAME``, as docker names them.

        >>> ImageRef.parse("docker.io/alpine:3.20").name
        'docker.io/library/alpine'
        """
        m = _REF.fullmatch(text.strip())
        if m is None or (m.group("tag") is None and m.group("digest") is None):
            raise ClientError(
                f"image '{text}': expected REGISTRY/REPOSITORY:TAG or REGISTRY/REPOSITORY@sha256:..."
            )
        name, tag, digest = m.group("name"), m.group("tag"), m.group("digest")
        try:
            check_reference(name)
            if digest is not None:
                check_digest(digest)
        except PayloadError as e:
            hint = " (Docker Hub: docker.io/NAME)" if "/" not in name or "must name" in str(e) else ""
            raise ClientError(f"image '{text}': {e}{hint}") from None
        registry, _, repository = name.partition("/")
        if registry in DOCKER_HUB_ALIASES or registry == DOCKER_HUB:
            registry = DOCKER_HUB
            repository = repository if "/" in repository else f"library/{repository}"
        return cls(registry, repository, tag, digest)

    @property
    def api_host(self) -> str:
        """Where the registry's API answers (``host[:port]``)."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def name(self) -> str:
        """``registry/repository``."""
        return f"{self.registry}/{self.repository}"

    def __str__(self) -> str:
        return self.name + (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")


@dataclass(frozen=True)
class ImageSignature:
    """What :func:`sign_image_async` did."""

    image: ImageRef
    #: the manifest digest signed
    digest: str
    #: the docker-reference in the payload (the identity a policy checks)
    identity: str
    #: ``registry/repository:sha256-<hex>.sig``
    attachment: str
    payload: bytes
    #: DER ECDSA signature over ``payload``
    signature: bytes
    #: False: the attachment already held this very signature, nothing was pushed
    added: bool
    #: the signing server that signed it ('' for a result from the client's cache)
    server: str


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class _Registry:
    """The distribution API calls of one repository, answering the registry's challenges."""

    def __init__(
        self, session: aiohttp.ClientSession, image: ImageRef, insecure: bool, auth: RegistryAuth | None
    ) -> None:
        self._session = session
        self._insecure = insecure
        self._base = yarl.URL(f"{'http' if insecure else 'https'}://{image.api_host}/v2/{image.repository}")
        self._where = image.name
        self._image = image
        self._auth = auth
        self._authorization: str | None = None  # sent with every request once a challenge is met
        self._looked_up: tuple[RegistryLogin | None] | None = None
        self._refresh: str | None = None  # an identity token, as the token service last gave it

    async def _request(
        self, method: str, url: yarl.URL, ok: tuple[int, ...], **kw: Any
    ) -> tuple[int, bytes, Any]:
        """(status, body, headers); a status outside ``ok`` (and not 404 when 404 is in ``ok``)
        raises RegistryError. A ``401`` is answered as its challenge asks, once per request."""
        headers = dict(kw.pop("headers", {}))
        what = f"{self._where}: {method} {url.path}"
        for answered in (False, True):
            if self._authorization is not None:
                headers["Authorization"] = self._authorization
            status, body, got = await self._fetch(what, method, url, headers=headers, **kw)
            if status == 401 and not answered:
                await self._answer(got.get("WWW-Authenticate", ""))
                continue
            if status not in ok:
                raise RegistryError(self._refusal(method, url, status, body, got))
            return status, body, got
        raise AssertionError("unreachable")  # the second pass returns or raises

    async def _fetch(self, what: str, method: str, url: yarl.URL, **kw: Any) -> tuple[int, bytes, Any]:
        """One request: (status, body of at most MAX_DOCUMENT bytes, headers); RegistryError
        (saying ``what`` was asked) if it fails or the answer is larger."""
        try:
            async with self._session.request(method, url, **kw) as r:
                body = await r.content.read(MAX_DOCUMENT + 1)
                if len(body) > MAX_DOCUMENT:
                    raise RegistryError(f"{what}: answer larger than {MAX_DOCUMENT} bytes")
                return r.status, body, r.headers
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise RegistryError(f"{what}: {describe_error(e)}") from None

    async def _login(self) -> RegistryLogin | None:
        """The login for this repository, looked up once (a helper is a program)."""
        if self._auth is None:
            return None
        if self._looked_up is None:
            self._looked_up = (await asyncio.to_thread(self._auth.login, self._image),)
        return self._looked_up[0]

    async def _answer(self, header: str) -> None:
        """Meet a ``401``'s challenge: Basic with the login, or a Bearer token from the realm
        (with the login, or anonymous when there is none: public images pull that way)."""
        scheme, params = _challenge(header)
        login = await self._login()
        if scheme == "basic":
            if login is None:
                raise RegistryError(f"{self._where}: the registry asks for a login: {self._missing()}")
            if login.identity_token:
                raise RegistryError(
                    f"{self._where}: the registry asks for HTTP Basic, and the login for it is an "
                    "identity token, which only a token service takes"
                )
            self._authorization = _basic(login)
            return
        if scheme != "bearer" or not params.get("realm"):
            raise RegistryError(
                f"{self._where}: the registry asks for credentials sign-image cannot give ({header[:100]!r})"
            )
        realm = yarl.URL(params["realm"])
        if realm.scheme != "https" and not (self._insecure and realm.scheme == "http"):
            raise RegistryError(
                f"{self._where}: the registry's token service is not HTTPS: {realm.human_repr()[:100]}"
            )
        query = {k: v for k, v in params.items() if k in ("service", "scope")}
        what = f"{self._where}: token service {realm.host}"
        if login is not None and login.identity_token:
            # OAuth2's refresh-token grant (the distribution token spec's POST form), as docker
            # uses an identity token; the service may hand back a new one for the next scope.
            form = {
                **query,
                "grant_type": "refresh_token",
                "refresh_token": self._refresh or login.secret,
                "client_id": OAUTH_CLIENT_ID,
            }
            status, body, _ = await self._fetch(what, "POST", realm, data=form)
        else:
            headers = {"Authorization": _basic(login)} if login is not None else {}
            status, body, _ = await self._fetch(what, "GET", realm.update_query(query), headers=headers)
        if status in (400, 401, 403) and login is not None and login.identity_token:
            raise RegistryError(f"{what} refused the identity token ({status})")
        if status in (401, 403):
            why = "refused the login" if login is not None else f"wants a login: {self._missing()}"
            raise RegistryError(f"{what} {why} ({status})")
        if status != 200:
            raise RegistryError(f"{what} answered {status}")
        try:
            answer = json.loads(body)
            token = answer.get("token") or answer.get("access_token")
            refresh = answer.get("refresh_token")
        except (ValueError, AttributeError):
            token = refresh = None
        if not isinstance(token, str) or not token or not token.isprintable():
            raise RegistryError(f"{what} answered no token")
        if isinstance(refresh, str) and refresh and refresh.isprintable():
            self._refresh = refresh
        self._authorization = f"Bearer {token}"

    def _missing(self) -> str:
        if self._auth is None:
            return "give a registry auth file (--registry-auth-file, or skopeo/podman/docker login)"
        return self._auth.missing(self._image)

    def _refusal(self, method: str, url: yarl.URL, status: int, body: bytes, headers: Any) -> str:
        if status in (401, 403) and self._authorization is not None:
            return f"{self._where}: {method} {url.path}: the registry refused the credentials ({status})"
        try:
            errors = json.loads(body)["errors"]
            detail = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors)[:300]
        except (ValueError, KeyError, TypeError, AttributeError):
            detail = body[:200].decode(errors="replace")
        return f"{self._where}: {method} {url.path}: {status} {detail}".rstrip()

    async def manifest(self, reference: str, accept: tuple[str, ...]) -> tuple[bytes, str] | None:
        """(manifest bytes, media type), or None if there is none under ``reference``."""
        status, body, headers = await self._request(
            "GET", self._base / "manifests" / reference, (200, 404), headers={"Accept": ", ".join(accept)}
        )
        if status == 404:
            return None
        media_type = headers.get("Content-Type", "").split(";")[0].strip()
        if media_type not in accept:
            raise RegistryError(f"{self._where}@{reference}: unexpected manifest type '{media_type[:100]}'")
        return body, media_type

    async def blob(self, digest: str) -> bytes:
        _, body, _ = await self._request("GET", self._base / "blobs" / digest, (200,))
        if _sha256(body) != digest:
            raise RegistryError(f"{self._where}: blob {digest} does not match its digest")
        return body

    async def put_blob(self, data: bytes) -> str:
        digest = _sha256(data)
        status, _, _ = await self._request("HEAD", self._base / "blobs" / digest, (200, 404))
        if status == 200:
            return digest
        _, _, headers = await self._request("POST", self._base / "blobs" / "uploads" / "", (202,))
        location = headers.get("Location")
        if not location:
            raise RegistryError(f"{self._where}: the blob upload answer has no Location")
        url = self._base.join(yarl.URL(location)).update_query(digest=digest)
        await self._request(
            "PUT", url, (201,), data=data, headers={"Content-Type": "application/octet-stream"}
        )
        return digest

    async def put_manifest(self, tag: str, data: bytes, media_type: str) -> None:
        await self._request(
            "PUT", self._base / "manifests" / tag, (201,), data=data, headers={"Content-Type": media_type}
        )


async def _resolve(registry: _Registry, image: ImageRef) -> str:
    """The digest of the image's manifest, checked against the bytes the registry holds."""
    reference = image.digest or image.tag
    assert reference is not None
    found = await registry.manifest(reference, IMAGE_TYPES)
    if found is None:
        raise RegistryError(f"{image}: no such image in the registry")
    digest = _sha256(found[0])
    if image.digest is not None and digest != image.digest:
        raise RegistryError(f"{image}: the registry's manifest does not match the digest")
    return digest


def _layer(payload_digest: str, size: int, signature_b64: str) -> dict[str, Any]:
    return {
        "mediaType": PAYLOAD_MEDIA_TYPE,
        "size": size,
        "digest": payload_digest,
        "annotations": {SIGNATURE_ANNOTATION: signature_b64},
    }


async def _attach(registry: _Registry, tag: str, payload: bytes, signature: bytes) -> bool:
    """Add the signature to the attachment ``tag`` (made if absent; another signature there
    stays, as cosign does). False if this very signature is there already.

    Registries have no conditional manifest PUT, so two signers of one image can each read the
    tag, add their own layer and write it back, the second dropping the first's (cosign can).
    Here the tag is read again right before the PUT (changed since it was merged: merge again)
    and after it (the layer gone, a writer that read before this PUT wrote after it: merge
    again), at most :data:`ATTACH_ATTEMPTS` times; what is left is the time between that last
    read and the PUT."""
    layer = _layer(_sha256(payload), len(payload), base64.b64encode(signature).decode())
    wrote = False
    found = await registry.manifest(tag, (OCI_MANIFEST,))
    for _ in range(ATTACH_ATTEMPTS):
        manifest, config = await _attachment(registry, tag, found)
        if layer in manifest["layers"]:
            return wrote  # there: before this call (False), or since it (True)
        await registry.put_blob(payload)
        manifest["layers"].append(layer)
        config["rootfs"]["diff_ids"].append(layer["digest"])  # the payload is its own uncompressed layer
        config_bytes = json.dumps(config, separators=(",", ":")).encode()
        manifest["config"] = {
            "mediaType": OCI_CONFIG,
            "size": len(config_bytes),
            "digest": await registry.put_blob(config_bytes),
        }
        now = await registry.manifest(tag, (OCI_MANIFEST,))
        if now != found:  # another signer wrote meanwhile: merge with what it wrote
            found = now
            continue
        await registry.put_manifest(tag, json.dumps(manifest, separators=(",", ":")).encode(), OCI_MANIFEST)
        wrote = True
        found = await registry.manifest(tag, (OCI_MANIFEST,))  # what the next merge starts from
        if layer in _manifest(tag, found)["layers"]:
            return True
    raise RegistryError(
        f"the attachment {tag} kept changing under other signers ({ATTACH_ATTEMPTS} attempts): sign again"
    )


def _manifest(tag: str, found: tuple[bytes, str] | None) -> dict[str, Any]:
    """The attachment manifest ``found`` (None: a new, empty one), parsed; its layers a list."""
    if found is None:
        return {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {}, "layers": []}
    try:
        manifest = json.loads(found[0])
        if not isinstance(manifest["layers"], list):
            raise TypeError
    except (ValueError, KeyError, TypeError) as e:
        raise _not_an_attachment(tag, e) from None
    return manifest  # type: ignore[no-any-return]


async def _attachment(
    registry: _Registry, tag: str, found: tuple[bytes, str] | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The attachment manifest ``found`` (None: a new, empty one) and its config, parsed."""
    manifest = _manifest(tag, found)
    if found is None:
        return manifest, {
            "architecture": "",
            "os": "",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": []},
        }
    try:
        config = json.loads(await registry.blob(manifest["config"]["digest"]))
        if not isinstance(config["rootfs"]["diff_ids"], list):
            raise TypeError
    except (ValueError, KeyError, TypeError) as e:
        raise _not_an_attachment(tag, e) from None
    return manifest, config


def _not_an_attachment(tag: str, e: Exception) -> RegistryError:
    return RegistryError(f"the attachment {tag} is not a cosign signature manifest ({e!r:.80})")


def _registry_ssl(registry_ca: Path | None) -> ssl.SSLContext:
    try:
        return ssl.create_default_context(cafile=str(registry_ca) if registry_ca else None)
    except (OSError, ssl.SSLError) as e:
        raise ClientError(f"registry CA bundle {registry_ca} cannot be loaded: {e}") from None


async def sign_image_async(
    client: AsyncSigningClient,
    image: str | ImageRef,
    *,
    identity: str | None = None,
    insecure_registry: bool = False,
    registry_ca: Path | None = None,
    registry_auth: RegistryAuth | None = None,
    timeout: float = REGISTRY_TIMEOUT,
) -> ImageSignature:
    """Sign the image ``image`` (``REGISTRY/REPO:TAG`` or ``REGISTRY/REPO@sha256:...``) by
    its manifest digest, with format ``sigstore`` through ``client``, and push the signature
    to the registry as a cosign attachment.

    ``identity``: the docker-reference signed (default: the image's name, with its tag if one
    was given, as skopeo signs). ``insecure_registry``: plain HTTP (a test registry on
    loopback). ``registry_ca``: a CA bundle for the registry's TLS (default: the system's).
    ``registry_auth``: logins for registries that ask (``RegistryAuth.load(path)``).
    ``timeout`` bounds each registry request. Raises :class:`RegistryError` for the registry's
    part and the signing client's errors for the signing."""
    ref = image if isinstance(image, ImageRef) else ImageRef.parse(image)
    try:
        signed_as = check_reference(identity or (f"{ref.name}:{ref.tag}" if ref.tag else ref.name))
    except PayloadError as e:
        raise ClientError(f"identity: {e}") from None
    connector = aiohttp.TCPConnector(ssl=False if insecure_registry else _registry_ssl(registry_ca))
    async with aiohttp.ClientSession(
        connector=connector,
        headers={"User-Agent": USER_AGENT},
        timeout=aiohttp.ClientTimeout(total=timeout),
    ) as session:
        registry = _Registry(session, ref, insecure_registry, registry_auth)
        digest = await _resolve(registry, ref)
        payload = build(signed_as, digest, f"sealbox {__version__}")
        with tempfile.TemporaryDirectory(prefix="sealbox-image-") as tmp:
            source = Path(tmp) / "payload.json"
            source.write_bytes(payload)
            server, _ = await client.sign_one(source, FORMAT, source.with_name("payload.json.sig"))
            signature = source.with_name("payload.json.sig").read_bytes()
        tag = digest.replace(":", "-") + ATTACHMENT_SUFFIX
        added = await _attach(registry, tag, payload, signature)
    return ImageSignature(ref, digest, signed_as, f"{ref.name}:{tag}", payload, signature, added, server)


def sign_image(
    client: SigningClient,
    image: str | ImageRef,
    *,
    identity: str | None = None,
    insecure_registry: bool = False,
    registry_ca: Path | None = None,
    registry_auth: RegistryAuth | None = None,
    timeout: float = REGISTRY_TIMEOUT,
) -> ImageSignature:
    """:func:`sign_image_async` for a blocking :class:`SigningClient` (run on its loop)."""
    return client._run(
        sign_image_async(
            client._client,
            image,
            identity=identity,
            insecure_registry=insecure_registry,
            registry_ca=registry_ca,
            registry_auth=registry_auth,
            timeout=timeout,
        )
    )
