"""``sign-image`` against registries that ask for credentials: Debian's docker-registry with
HTTP Basic (htpasswd), and with the distribution token protocol (Bearer tokens from a token
service, as Docker Hub, GHCR, GitLab, Harbor and Quay use). The registry is the real one; the
token service is a small issuer written here (no token service is packaged for Debian): it
signs ES256 JWTs with a certificate the registry trusts, grants pull to anyone and push to
its one login, which may also come as an identity token (OAuth2 refresh-token grant, as ACR
logins do). Logins come from a containers auth file (:class:`RegistryAuth`). Docker Hub's
names are checked without the network (its API is not reachable from here)."""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import bcrypt
import httpx
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from sealbox.client import ImageRef, RegistryAuth, RegistryError, RegistryLogin, sign_image
from sealbox.errors import SealboxError
from tests.formats._registry import Registry, run_registry, sign_image_argv
from tests.servers import ServerProcess, ThreadedApp, env_without_proxy

USER, PASSWORD = "pusher", "s3cret-" + secrets.token_hex(4)
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def _authfile(path: Path, host: str, user: str = USER, password: str = PASSWORD) -> Path:
    path.write_text(
        json.dumps({"auths": {host: {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}}})
    )
    return path


@pytest.fixture
def server(sigstore_server: ServerProcess) -> ServerProcess:
    return sigstore_server


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    root = tmp_path_factory.mktemp("basic-registry")
    (root / "htpasswd").write_bytes(
        USER.encode() + b":" + bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)) + b"\n"
    )
    auth = f"  htpasswd:\n    realm: sealbox-test\n    path: {root / 'htpasswd'}\n"
    with run_registry(root, auth) as r:
        r.authfile = _authfile(root / "auth.json", r.host)
        yield r


class _TokenService:
    """A distribution token service on loopback: ES256 JWTs (the certificate in ``x5c``,
    issued by ``ca``, which the registry trusts); pull for anyone, push for the login."""

    SERVICE, ISSUER = "sealbox-test-registry", "sealbox-test-issuer"

    def __init__(self, root: Path) -> None:
        now = datetime.now(UTC)
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test token CA")])
        self.ca = (
            x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
            .public_key(self.ca_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.ca_key, hashes.SHA256())
        )  # fmt: skip
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test token signer")]))
            .issuer_name(ca_name).public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=1))
            .sign(self.ca_key, hashes.SHA256())
        )  # fmt: skip
        self.bundle = root / "token-ca.pem"
        self.bundle.write_bytes(self.ca.public_bytes(serialization.Encoding.PEM))
        self.asked: list[tuple[str | None, str]] = []  # (user, scope) of each token asked for
        self.port = 0  # once it serves
        #: the identity token (refresh token) it takes now; each grant hands out a new one
        self.identity = "idt-" + secrets.token_hex(8)

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def _jwt(self, user: str | None, scope: str) -> str:
        def b64(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

        access = []
        for item in scope.split():
            kind, name, actions = item.split(":")
            allowed = [a for a in actions.split(",") if a == "pull" or user == USER]
            access.append({"type": kind, "name": name, "actions": allowed})
        now = int(time.time())
        claims = {"iss": self.ISSUER, "sub": user or "", "aud": self.SERVICE, "exp": now + 300,
                  "nbf": now - 60, "iat": now, "jti": secrets.token_hex(8), "access": access}  # fmt: skip
        der = base64.b64encode(self.cert.public_bytes(serialization.Encoding.DER)).decode()
        head = b64(json.dumps({"typ": "JWT", "alg": "ES256", "x5c": [der]}).encode())
        body = b64(json.dumps(claims).encode())
        r, s = decode_dss_signature(self.key.sign(f"{head}.{body}".encode(), ec.ECDSA(hashes.SHA256())))
        return f"{head}.{body}.{b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    async def _token(self, request: web.Request) -> web.Response:
        user = None
        given = request.headers.get("Authorization", "")
        if given:
            if given != "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode():
                return web.Response(status=401)
            user = USER
        scope = request.query.get("scope", "")
        self.asked.append((user, _sorted_actions(scope)))
        return web.json_response({"token": self._jwt(user, scope)})

    async def _oauth(self, request: web.Request) -> web.Response:
        """The refresh-token grant: the identity token for an access token and a new identity
        token (the old one no longer works, so a client must take the new one)."""
        form = await request.post()
        if form.get("grant_type") != "refresh_token" or not form.get("client_id"):
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        if form.get("refresh_token") != self.identity or form.get("service") != self.SERVICE:
            return web.json_response({"error": "invalid_grant"}, status=401)
        scope = str(form.get("scope", ""))
        self.asked.append(("oauth:" + USER, _sorted_actions(scope)))
        self.identity = "idt-" + secrets.token_hex(8)
        body = {"access_token": self._jwt(USER, scope), "refresh_token": self.identity, "expires_in": 300}
        return web.json_response(body)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/token", self._token)
        app.router.add_post("/token", self._oauth)
        return app


def _sorted_actions(scope: str) -> str:
    """A scope's items with their actions sorted: the registry names them in any order
    (``pull,push`` or ``push,pull``)."""
    items = []
    for item in scope.split():
        kind, name, actions = item.rsplit(":", 2)
        items.append(f"{kind}:{name}:{','.join(sorted(actions.split(',')))}")
    return " ".join(items)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_TokenService]:
    service = _TokenService(tmp_path_factory.mktemp("token-service"))
    with ThreadedApp(service.app()) as running:
        service.port = running.port
        yield service


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory: pytest.TempPathFactory, tokens: _TokenService) -> Iterator[Registry]:
    root = tmp_path_factory.mktemp("token-registry")
    auth = (
        f"  token:\n    realm: {tokens.realm}\n    service: {tokens.SERVICE}\n"
        f"    issuer: {tokens.ISSUER}\n    rootcertbundle: {tokens.bundle}\n"
    )
    with run_registry(root, auth) as r:
        r.authfile = _authfile(root / "auth.json", r.host)
        yield r


def _signature_checks(server: ServerProcess, registry: Registry, repo: str, digest: str) -> None:
    """The attachment in a Basic registry (read with the login) holds a signature by the server's
    key over a payload naming ``digest``."""
    tag = digest.replace(":", "-") + ".sig"
    login = json.loads((registry.authfile or Path()).read_text())["auths"][registry.host]["auth"]
    with httpx.Client(headers={"Authorization": f"Basic {login}"}) as h:
        r = h.get(registry.url(repo, f"manifests/{tag}"), headers={"Accept": OCI_MANIFEST})
        layer = r.json()["layers"][0]
        payload = h.get(registry.url(repo, f"blobs/{layer['digest']}")).content
    pub = serialization.load_pem_public_key((server.deployment.public / "sigstore.pub").read_bytes())
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    sig = base64.b64decode(layer["annotations"]["dev.cosignproject.cosign/signature"])
    pub.verify(sig, payload, ec.ECDSA(hashes.SHA256()))
    assert json.loads(payload)["critical"]["image"]["docker-manifest-digest"] == digest


def test_a_basic_auth_registry_gets_the_login(basic_registry: Registry, server: ServerProcess) -> None:
    digest = basic_registry.push("test/basic", b"basic\n")
    auth = RegistryAuth.load(basic_registry.authfile or Path())
    with server.client() as c:
        s = sign_image(c, f"{basic_registry.host}/test/basic:1", insecure_registry=True, registry_auth=auth)
    assert s.added and s.digest == digest
    _signature_checks(server, basic_registry, "test/basic", digest)


def test_without_a_login_or_with_a_wrong_one_the_error_says_so(
    basic_registry: Registry, server: ServerProcess, tmp_path: Path
) -> None:
    image = f"{basic_registry.host}/test/basic-refused:1"
    with server.client() as c:
        with pytest.raises(RegistryError, match="asks for a login: give a registry auth file"):
            sign_image(c, image, insecure_registry=True)
        other = RegistryAuth.load(_authfile(tmp_path / "other.json", "registry.example"))
        with pytest.raises(RegistryError, match=f"no login for {basic_registry.host}"):
            sign_image(c, image, insecure_registry=True, registry_auth=other)
        wrong = RegistryAuth.load(_authfile(tmp_path / "wrong.json", basic_registry.host, password="nope"))
        with pytest.raises(RegistryError, match="refused the credentials") as e:
            sign_image(c, image, insecure_registry=True, registry_auth=wrong)
    assert PASSWORD not in str(e.value) and "nope" not in str(e.value)


def test_a_token_registry_gets_a_bearer_token_per_scope(
    token_registry: Registry, tokens: _TokenService, server: ServerProcess
) -> None:
    digest = token_registry.push("test/token", b"token\n")
    tokens.asked.clear()
    auth = RegistryAuth.load(token_registry.authfile or Path())
    with server.client() as c:
        s = sign_image(c, f"{token_registry.host}/test/token:1", insecure_registry=True, registry_auth=auth)
    assert s.added and s.digest == digest
    # one token to read, one more once it pushes; the login went to the token service only
    assert tokens.asked == [
        (USER, "repository:test/token:pull"),
        (USER, "repository:test/token:pull,push"),
    ], tokens.asked
    # the same signature again: read with a token, nothing added
    with server.client() as c:
        again = sign_image(
            c, f"{token_registry.host}/test/token:1", insecure_registry=True, registry_auth=auth
        )
    assert not again.added


def test_an_anonymous_token_reads_but_cannot_push(
    token_registry: Registry, tokens: _TokenService, server: ServerProcess
) -> None:
    token_registry.push("test/anon", b"anon\n")
    with server.client() as c, pytest.raises(RegistryError, match="refused the credentials"):
        sign_image(c, f"{token_registry.host}/test/anon:1", insecure_registry=True)


def _identity_authfile(path: Path, host: str, identity: str) -> Path:
    """An auth file as ``docker login`` writes it for ACR: a placeholder user and the token."""
    user = base64.b64encode(b"00000000-0000-0000-0000-000000000000:").decode()
    path.write_text(json.dumps({"auths": {host: {"auth": user, "identitytoken": identity}}}))
    return path


def test_an_identity_token_is_exchanged_at_the_token_service(
    token_registry: Registry, tokens: _TokenService, server: ServerProcess, tmp_path: Path
) -> None:
    digest = token_registry.push("test/identity", b"identity\n")
    tokens.asked.clear()
    first = tokens.identity
    auth = RegistryAuth.load(_identity_authfile(tmp_path / "auth.json", token_registry.host, first))
    with server.client() as c:
        s = sign_image(
            c, f"{token_registry.host}/test/identity:1", insecure_registry=True, registry_auth=auth
        )
    assert s.added and s.digest == digest
    # a grant per scope; the second could only succeed with the identity token the first handed back
    assert tokens.asked == [
        ("oauth:" + USER, "repository:test/identity:pull"),
        ("oauth:" + USER, "repository:test/identity:pull,push"),
    ], tokens.asked
    assert tokens.identity != first
    # the first identity token no longer works: the service refuses it, and the error says so
    with server.client() as c, pytest.raises(RegistryError, match="refused the identity token") as e:
        sign_image(c, f"{token_registry.host}/test/identity:1", insecure_registry=True, registry_auth=auth)
    assert first not in str(e.value)


def test_an_identity_token_from_a_credential_helper(
    token_registry: Registry, tokens: _TokenService, server: ServerProcess, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    digest = token_registry.push("test/identity-helper", b"identity helper\n")
    program = tmp_path / "bin" / "docker-credential-idtest"
    program.parent.mkdir()
    program.write_text(
        '#!/bin/sh\n[ "$1" = get ] || exit 2\nread -r registry\n'
        f'[ "$registry" = "{token_registry.host}" ] || {{ echo \'credentials not found\'; exit 1; }}\n'
        f'printf \'{{"ServerURL":"%s","Username":"<token>","Secret":"{tokens.identity}"}}\' "$registry"\n'
    )
    program.chmod(0o755)
    monkeypatch.setenv("PATH", f"{program.parent}:{os.environ['PATH']}")
    (tmp_path / "auth.json").write_text(json.dumps({"credHelpers": {token_registry.host: "idtest"}}))
    auth = RegistryAuth.load(tmp_path / "auth.json")
    with server.client() as c:
        s = sign_image(
            c, f"{token_registry.host}/test/identity-helper:1", insecure_registry=True, registry_auth=auth
        )
    assert s.added and s.digest == digest


def test_a_basic_registry_cannot_take_an_identity_token(
    basic_registry: Registry, server: ServerProcess, tmp_path: Path
) -> None:
    basic_registry.push("test/basic-identity", b"basic identity\n")
    auth = RegistryAuth.load(_identity_authfile(tmp_path / "auth.json", basic_registry.host, "idt-secret"))
    with server.client() as c, pytest.raises(RegistryError, match="identity token, which only a token") as e:
        sign_image(
            c, f"{basic_registry.host}/test/basic-identity:1", insecure_registry=True, registry_auth=auth
        )
    assert "idt-secret" not in str(e.value)


def test_docker_hub_is_docker_io_as_docker_names_it() -> None:
    """Docker Hub's names, without the network: the name signed, the API host, the error for a
    short name. (Its logins: ``test_auth_files_as_podman_and_docker_write_them``.)"""
    digest = "sha256:" + "a" * 64
    for text in (
        "docker.io/alpine:3.20",
        "index.docker.io/alpine:3.20",
        "registry-1.docker.io/library/alpine:3.20",
    ):
        ref = ImageRef.parse(text)
        assert (ref.registry, ref.repository, ref.tag) == ("docker.io", "library/alpine", "3.20"), text
        assert ref.api_host == "registry-1.docker.io"
        assert str(ref) == "docker.io/library/alpine:3.20"
    org = ImageRef.parse(f"docker.io/org/app@{digest}")
    assert (org.name, org.digest, org.api_host) == ("docker.io/org/app", digest, "registry-1.docker.io")
    other = ImageRef.parse("ghcr.io/org/app:1")
    assert (other.name, other.api_host) == ("ghcr.io/org/app", "ghcr.io")
    with pytest.raises(SealboxError, match=r"Docker Hub: docker\.io/NAME"):
        ImageRef.parse("alpine:3.20")


def test_the_cli_takes_the_auth_file_and_finds_the_default_one(
    basic_registry: Registry, server: ServerProcess, tmp_path: Path
) -> None:
    digest = basic_registry.push("test/cli-auth", b"cli auth\n")
    base = sign_image_argv(server, tmp_path)
    env = {k: v for k, v in env_without_proxy().items() if k not in ("REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR")}
    env["HOME"] = str(tmp_path / "home")  # no ~/.docker/config.json to find
    image = f"{basic_registry.host}/test/cli-auth@{digest}"
    refused = subprocess.run([*base, image], capture_output=True, text=True, env=env, check=False)
    assert refused.returncode == 1 and "asks for a login" in refused.stderr
    authfile = str(basic_registry.authfile)
    res = subprocess.run([*base, "--registry-auth-file", authfile, image], capture_output=True, text=True,
                         env=env, check=False)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["images"][0]["added"] is True
    again = subprocess.run([*base, image], capture_output=True, text=True,
                           env={**env, "REGISTRY_AUTH_FILE": authfile}, check=False)  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["images"][0]["added"] is False
    assert PASSWORD not in res.stderr + res.stdout + again.stderr + again.stdout


def test_auth_files_as_podman_and_docker_write_them(tmp_path: Path) -> None:
    def login(user: str, password: str) -> dict[str, str]:
        return {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}

    path = tmp_path / "config.json"
    path.write_text(json.dumps({
        "auths": {
            "https://index.docker.io/v1/": login("hub", "pw-hub-1"),  # docker's URL form
            "registry.example": login("all", "pw-all-2"),
            "registry.example/team": login("team", "pw-team-3"),  # a namespace: the longest match wins
            "token.example": {"identitytoken": "xyz"},  # nothing usable
        },
    }))  # fmt: skip
    auth = RegistryAuth.load(path)
    hub = RegistryLogin("hub", "pw-hub-1")
    assert auth.login(ImageRef.parse("index.docker.io/library/app:1")) == hub
    assert auth.login(ImageRef.parse("docker.io/app:1")) == hub  # Docker Hub by any of its names
    assert auth.login(ImageRef.parse("registry.example/other/app:1")) == RegistryLogin("all", "pw-all-2")
    assert auth.login(ImageRef.parse("registry.example/team/app:1")) == RegistryLogin("team", "pw-team-3")
    token = auth.login(ImageRef.parse("token.example/app:1"))
    assert token == RegistryLogin("<token>", "xyz", identity_token=True)
    assert "no login for gcr.io" in auth.missing(ImageRef.parse("gcr.io/p/app:1"))
    shown = repr(auth) + repr(auth.login(ImageRef.parse("docker.io/app:1"))) + repr(token)
    assert not any(secret in shown for secret in ("pw-hub-1", "pw-all-2", "pw-team-3", "xyz"))
    path.write_text(json.dumps({"auths": {"docker.io": login("podman", "pw-podman-4")}}))  # podman's key
    assert RegistryAuth.load(path).login(ImageRef.parse("index.docker.io/org/app:1")) == (
        "podman",
        "pw-podman-4",
        False,
    )
    bad_files = (
        '{"auths": []}',
        "not json",
        '{"auths": {"r.example": {"auth": "bm9jb2xvbg=="}}}',  # base64 of a string without ':'
        '{"credHelpers": {"r.example": "../../bin/sh"}}',  # a helper name, not a path
        '{"credsStore": ["x"]}',
    )
    for bad in bad_files:
        path.write_text(bad)
        with pytest.raises(SealboxError, match="registry auth file"):
            RegistryAuth.load(path)


HELPER = """#!/bin/sh
# docker-credential-sealboxtest: the docker credential helper protocol, as ECR's or gcloud's
[ "$1" = get ] || exit 2
read -r registry
case "$registry" in
  {host}) printf '{{"ServerURL":"%s","Username":"{user}","Secret":"{password}"}}' "$registry" ;;
  https://index.docker.io/v1/) printf '{{"ServerURL":"%s","Username":"hub","Secret":"pw-hub"}}' "$registry" ;;
  token.example) printf '{{"ServerURL":"token.example","Username":"<token>","Secret":"refresh"}}' ;;
  broken.example) echo "boom: secret-in-helper-output" >&2; exit 3 ;;
  *) echo "credentials not found in native keychain"; exit 1 ;;
esac
"""


@pytest.fixture
def helper(basic_registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """``docker-credential-sealboxtest`` on PATH, with the login of ``basic_registry``."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    program = bindir / "docker-credential-sealboxtest"
    program.write_text(HELPER.format(host=basic_registry.host, user=USER, password=PASSWORD))
    program.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    return "sealboxtest"


@pytest.mark.parametrize("where", ["credHelpers", "credsStore"])
def test_a_credential_helper_gives_the_login(
    basic_registry: Registry, server: ServerProcess, tmp_path: Path, helper: str, where: str
) -> None:
    digest = basic_registry.push(f"test/helper-{where.lower()}", b"helper " + where.encode())
    path = tmp_path / "auth.json"
    config = (
        {"credHelpers": {basic_registry.host: helper}} if where == "credHelpers" else {"credsStore": helper}
    )
    path.write_text(json.dumps(config))
    auth = RegistryAuth.load(path)
    assert PASSWORD not in repr(auth)
    image = f"{basic_registry.host}/test/helper-{where.lower()}:1"
    with server.client() as c:
        s = sign_image(c, image, insecure_registry=True, registry_auth=auth)
    assert s.added and s.digest == digest


def test_what_a_credential_helper_cannot_give_is_said(tmp_path: Path, helper: str) -> None:
    path = tmp_path / "auth.json"
    path.write_text(json.dumps({"credsStore": helper, "credHelpers": {"absent.example": "nosuchhelper"}}))
    auth = RegistryAuth.load(path)
    assert auth.login(ImageRef.parse("other.example/app:1")) is None  # "credentials not found"
    assert "has no login for other.example" in auth.missing(ImageRef.parse("other.example/app:1"))
    assert auth.login(ImageRef.parse("token.example/app:1")) == RegistryLogin("<token>", "refresh", True)
    # Docker Hub: the helper is asked for the server docker names it by
    assert auth.login(ImageRef.parse("docker.io/app:1")) == RegistryLogin("hub", "pw-hub")
    with pytest.raises(SealboxError, match=r"failed for broken\.example") as e:
        auth.login(ImageRef.parse("broken.example/app:1"))
    assert "secret-in-helper-output" not in str(e.value)  # what a helper prints is not echoed
    with pytest.raises(SealboxError, match=r"docker-credential-nosuchhelper \(.*\) is not on PATH"):
        auth.login(ImageRef.parse("absent.example/app:1"))
