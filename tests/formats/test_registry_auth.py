"""``sign-image`` against registries that ask for credentials: Debian's docker-registry with
HTTP Basic (htpasswd), and with the distribution token protocol (Bearer tokens from a token
service, as Docker Hub, GHCR, GitLab, Harbor and Quay use). The registry is the real one; the
token service is a small issuer written here (no token service is packaged for Debian): it
signs ES256 JWTs with a certificate the registry trusts, grants pull to anyone and push to
its one login. Logins come from a containers auth file (:class:`RegistryAuth`)."""

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

from sealbox.client import RegistryAuth, RegistryError, sign_image
from sealbox.client._images import ImageRef
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
        # the registry names the actions in any order (pull,push or push,pull)
        self.asked.append((user, " ".join(_sorted_actions(item) for item in scope.split())))
        return web.json_response({"token": self._jwt(user, scope)})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/token", self._token)
        return app


def _sorted_actions(scope: str) -> str:
    kind, name, actions = scope.rsplit(":", 2)
    return f"{kind}:{name}:{','.join(sorted(actions.split(',')))}"


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
    assert auth.login(ImageRef.parse("index.docker.io/library/app:1")) == ("hub", "pw-hub-1")
    assert auth.login(ImageRef.parse("registry.example/other/app:1")) == ("all", "pw-all-2")
    assert auth.login(ImageRef.parse("registry.example/team/app:1")) == ("team", "pw-team-3")
    assert auth.login(ImageRef.parse("token.example/app:1")) is None
    assert "no login for gcr.io" in auth.missing(ImageRef.parse("gcr.io/p/app:1"))
    assert not any(pw in repr(auth) for pw in ("pw-hub-1", "pw-all-2", "pw-team-3"))
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
    with pytest.raises(SealboxError, match="identity token"):
        auth.login(ImageRef.parse("token.example/app:1"))
    with pytest.raises(SealboxError, match=r"failed for broken\.example") as e:
        auth.login(ImageRef.parse("broken.example/app:1"))
    assert "secret-in-helper-output" not in str(e.value)  # what a helper prints is not echoed
    with pytest.raises(SealboxError, match=r"docker-credential-nosuchhelper \(.*\) is not on PATH"):
        auth.login(ImageRef.parse("absent.example/app:1"))
