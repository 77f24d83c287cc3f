"""Server configuration (TOML), validated with pydantic. Errors name the failing field."""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import ConfigError
from ..formats.base import FormatSettings
from ..fsutil import read_small
from ..keys import KeySpec, Pkcs11Spec

__all__ = [
    "DEFAULT_MAX_FILESIZE",
    "FormatSection",
    "KeySection",
    "Level",
    "LogSection",
    "MetricsSection",
    "Network",
    "SecuritySection",
    "ServerConfig",
    "ServerSection",
    "TLSSection",
    "load_config",
    "parse_listen",
]

Level = Literal["dep", "nightly", "release"]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
DEFAULT_MAX_FILESIZE = 2 * 1024**3


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSection(_Strict):
    """``[server]``: where it listens, its data folder, timeouts, pools and limits."""

    level: Level
    listen: str = "127.0.0.1:9110"
    data_dir: Path = Path("data")
    max_file_age: int = Field(86400, gt=0, description="seconds a stored input/result is kept")
    cleanup_interval: int = Field(300, gt=0)
    get_hold: float = Field(30.0, ge=0, le=60, description="long-poll hold of GET, seconds")
    job_timeout: float = Field(120.0, gt=0)
    body_timeout: float = Field(
        60.0, gt=0, le=3600, description="seconds an upload may go without sending a byte (then 408)"
    )
    header_timeout: float = Field(
        20.0, gt=0, le=300, description="seconds a connection has to send its first request's headers"
    )
    concurrency: int = Field(4, ge=1, le=64)
    signing_processes: int = Field(
        default_factory=lambda: min(4, os.cpu_count() or 1),
        ge=0,
        le=64,
        description="worker processes for small in-process jobs; 0 signs in threads only",
    )
    min_filesize: int = Field(10, ge=0)
    max_filesize: int = Field(DEFAULT_MAX_FILESIZE, gt=0)
    trusted_proxies: list[Network] = Field(
        default_factory=list,
        description="addresses (CIDR) of TCP balancers whose PROXY protocol header names the client",
    )
    min_free_bytes: int = Field(
        100 * 1024**2, ge=0, description="the heartbeat fails below this much free space in data_dir"
    )
    cert_expiry_warning_days: int = Field(
        30, ge=0, description="the heartbeat warns about certificates expiring within this many days"
    )

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        parse_listen(v)
        return v

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _proxies(cls, v: Any) -> Any:
        return SecuritySection._networks(v)


class TLSSection(_Strict):
    """``[tls]``: the server's certificate chain (leaf first) and its private key."""

    cert: Path
    key: Path


class SecuritySection(_Strict):
    """``[security]``: who may connect, who may mint tokens, token secrets and filename rules."""

    allowed_ips: list[Network]
    token_issuer_ips: list[Network] = []
    token_issuers: list[str] = Field(default_factory=list, description="user:scrypt$... entries")
    token_secret_files: list[Path] = Field(min_length=1)
    max_token_age: int = Field(3600, gt=0)
    allowed_filenames: list[str] = [".+"]

    @field_validator("allowed_ips", "token_issuer_ips", mode="before")
    @classmethod
    def _networks(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [ipaddress.ip_network(str(x), strict=False) for x in v]
        return v

    @field_validator("allowed_filenames")
    @classmethod
    def _regexes(cls, v: list[str]) -> list[str]:
        for pattern in v:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"bad regex {pattern!r}: {e}") from None
        return v

    @field_validator("token_issuers")
    @classmethod
    def _issuers(cls, v: list[str]) -> list[str]:
        for entry in v:
            user, sep, hashed = entry.partition(":")
            if not sep or not user or not hashed.startswith("scrypt$"):
                raise ValueError("each entry must be 'user:scrypt$...' (a salted hash, never a password)")
        return v


class MetricsSection(_Strict):
    """The Prometheus listener: plain HTTP, off unless ``listen`` is set."""

    listen: str | None = None
    allowed_ips: list[Network] = Field(
        default_factory=lambda: [ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128")]
    )

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str | None) -> str | None:
        if v is not None:
            parse_listen(v)
        return v

    @field_validator("allowed_ips", mode="before")
    @classmethod
    def _networks(cls, v: Any) -> Any:
        return SecuritySection._networks(v)


class KeySection(_Strict):
    """A key file (kind ``pem`` or ``pkcs12``: ``path``) or a key in a PKCS#11 token (kind
    ``pkcs11``: ``module``, ``token`` label, the key's ``label`` and/or ``id`` in hex, and the
    variables the module reads when it loads, e.g. SoftHSM's ``SOFTHSM2_CONF``). ``chain``:
    PEM certificates, leaf first (a PKCS#11 key without one uses its certificate on the token)."""

    kind: Literal["pem", "pkcs12", "pkcs11"] = "pem"
    path: Path | None = None
    chain: Path | None = None
    module: Path | None = None
    module_env: dict[str, str] = {}
    token: str | None = None
    label: str | None = None
    id: str | None = Field(None, pattern="^([0-9a-fA-F]{2})+$")

    @model_validator(mode="after")
    def _where(self) -> KeySection:
        if self.kind == "pkcs11":
            if self.module is None or self.token is None or (self.label is None and self.id is None):
                raise ValueError("a pkcs11 key needs module, token and label or id")
            if self.path is not None:
                raise ValueError("a pkcs11 key has no path")
        elif self.path is None:
            raise ValueError(f"a {self.kind} key needs path")
        elif self.module is not None or self.token is not None or self.module_env:
            raise ValueError(f"module, module_env and token are for pkcs11 keys, not {self.kind}")
        return self


class FormatSection(BaseModel):
    """``[formats.NAME]``: the key a format signs with, its size limit and its own options."""

    model_config = ConfigDict(extra="allow", frozen=True)
    key: str | None = None
    max_filesize: int | None = Field(None, gt=0)


class LogSection(_Strict):
    """The signing log (docs/signing-log.md): off unless ``enabled``; new dev deployments
    enable it."""

    enabled: bool = False
    key: str | None = Field(default=None, description="the [keys.NAME] of the log's Ed25519 checkpoint key")
    dir: Path | None = Field(
        default=None, description="default: log/ inside the data folder (each replica its own)"
    )
    segment_bytes: int = Field(
        default=64 * 1024**2, ge=4096, description="a new segment starts past this size"
    )
    checkpoint_interval: float = Field(
        default=5.0, gt=0, le=3600, description="seconds between signed checkpoints while signing"
    )

    @model_validator(mode="after")
    def _key(self) -> LogSection:
        if self.enabled and self.key is None:
            raise ValueError("log.key: an enabled signing log needs its checkpoint key")
        return self


class ServerConfig(_Strict):
    """A whole ``sealbox.toml``; relative paths in it are relative to ``base_dir``."""

    server: ServerSection
    tls: TLSSection
    security: SecuritySection
    keys: dict[str, KeySection] = {}
    formats: dict[str, FormatSection]
    metrics: MetricsSection = MetricsSection()
    log: LogSection = LogSection()
    base_dir: Path = Path(".")

    def resolve(self, p: Path) -> Path:
        """``p`` relative to the config's folder, unless absolute."""
        return p if p.is_absolute() else self.base_dir / p

    def log_dir(self) -> Path:
        """The signing log's folder: ``[log] dir``, else ``log/`` inside the data folder."""
        if self.log.dir is not None:
            return self.resolve(self.log.dir)
        return self.resolve(self.server.data_dir) / "log"

    def key_spec(self, name: str) -> KeySpec | Pkcs11Spec:
        """Where the key ``[keys.NAME]`` lives: a key file or a PKCS#11 token."""
        k = self.keys[name]
        chain = self.resolve(k.chain) if k.chain else None
        if k.kind == "pkcs11":
            assert k.module is not None and k.token is not None
            key_id = bytes.fromhex(k.id) if k.id else None
            return Pkcs11Spec(name, self.resolve(k.module), k.token, k.label, key_id, chain, k.module_env)
        assert k.path is not None
        return KeySpec(name, self.resolve(k.path), k.kind, chain)

    def format_settings(self, fmt: str) -> FormatSettings:
        """What the signer of ``fmt`` is configured with: its key name and options."""
        section = self.formats[fmt]
        return FormatSettings(fmt, section.key, dict(section.model_extra or {}), self.base_dir)

    def max_filesize(self, fmt: str) -> int:
        """The upload limit of ``fmt``: its own, else the server's."""
        return self.formats[fmt].max_filesize or self.server.max_filesize

    def token_secrets(self) -> list[bytes]:
        """The token secrets, the minting one first; each file must hold at least 16 bytes."""
        out = []
        for p in self.security.token_secret_files:
            path = self.resolve(p)
            try:
                secret = read_small(path).strip()
            except OSError as e:
                raise ConfigError(f"security.token_secret_files: cannot read {path}: {e.strerror}") from None
            except ConfigError as e:
                raise ConfigError(f"security.token_secret_files: {e}") from None
            if len(secret) < 16:
                raise ConfigError(f"security.token_secret_files: {path} holds fewer than 16 bytes")
            out.append(secret)
        return out


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 in brackets) as (host, port); an empty host means 127.0.0.1."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not (0 <= int(port) < 65536):
        raise ValueError(f"listen must be HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def load_config(path: Path) -> ServerConfig:
    """Read and validate a server config; relative paths resolve against its folder."""
    try:
        raw = tomllib.loads(path.read_text("utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    raw["base_dir"] = path.resolve().parent
    try:
        cfg = ServerConfig.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{path}: {where}: {first['msg']}") from None
    for fmt, section in cfg.formats.items():
        if section.key is not None and section.key not in cfg.keys:
            raise ConfigError(f"{path}: formats.{fmt}.key: no [keys.{section.key}] section")
    if cfg.log.enabled and cfg.log.key not in cfg.keys:
        raise ConfigError(f"{path}: log.key: no [keys.{cfg.log.key}] section")
    return cfg
