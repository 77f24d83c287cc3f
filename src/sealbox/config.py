"""Server configuration (TOML), validated with pydantic. Errors name the failing field."""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigError
from .formats.base import FormatSettings
from .keys.store import KeySpec

Level = Literal["dep", "nightly", "release"]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
DEFAULT_MAX_FILESIZE = 2 * 1024**3


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSection(_Strict):
    level: Level
    listen: str = "127.0.0.1:9110"
    data_dir: Path = Path("data")
    max_file_age: int = Field(86400, gt=0, description="seconds a stored input/result is kept")
    cleanup_interval: int = Field(300, gt=0)
    get_hold: float = Field(30.0, ge=0, le=60, description="long-poll hold of GET, seconds")
    job_timeout: float = Field(120.0, gt=0)
    concurrency: int = Field(4, ge=1, le=64)
    signing_processes: int = Field(
        default_factory=lambda: min(4, os.cpu_count() or 1),
        ge=0,
        le=64,
        description="worker processes for small in-process jobs; 0 signs in threads only",
    )
    min_filesize: int = Field(10, ge=0)
    max_filesize: int = Field(DEFAULT_MAX_FILESIZE, gt=0)

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        parse_listen(v)
        return v


class TLSSection(_Strict):
    cert: Path
    key: Path


class SecuritySection(_Strict):
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


class KeySection(_Strict):
    path: Path
    kind: Literal["pem", "pkcs12"] = "pem"
    chain: Path | None = None


class FormatSection(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)
    key: str | None = None
    max_filesize: int | None = Field(None, gt=0)


class ServerConfig(_Strict):
    server: ServerSection
    tls: TLSSection
    security: SecuritySection
    keys: dict[str, KeySection] = {}
    formats: dict[str, FormatSection]
    base_dir: Path = Path(".")

    def resolve(self, p: Path) -> Path:
        return p if p.is_absolute() else self.base_dir / p

    def key_spec(self, name: str) -> KeySpec:
        k = self.keys[name]
        return KeySpec(name, self.resolve(k.path), k.kind, self.resolve(k.chain) if k.chain else None)

    def format_settings(self, fmt: str) -> FormatSettings:
        section = self.formats[fmt]
        return FormatSettings(fmt, section.key, dict(section.model_extra or {}), self.base_dir)

    def max_filesize(self, fmt: str) -> int:
        return self.formats[fmt].max_filesize or self.server.max_filesize

    def token_secrets(self) -> list[bytes]:
        out = []
        for p in self.security.token_secret_files:
            path = self.resolve(p)
            try:
                secret = path.read_bytes().strip()
            except OSError as e:
                raise ConfigError(f"security.token_secret_files: cannot read {path}: {e.strerror}") from None
            if len(secret) < 16:
                raise ConfigError(f"security.token_secret_files: {path} holds fewer than 16 bytes")
            out.append(secret)
        return out


def parse_listen(value: str) -> tuple[str, int]:
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
    return cfg
