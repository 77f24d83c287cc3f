"""Pydantic models of a signing task (``task.json``) and of the worker config (``worker.toml``).

Validation errors are turned into one line naming the failing field, e.g.
``task.json: payload.upstreamArtifacts[0].paths: Field required``.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path, PurePosixPath
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..archives import DEFAULT_MAX_MEMBERS, DEFAULT_MAX_TOTAL
from ..errors import ConfigError
from ..wire import KNOWN

#: Taskcluster slugids are 22 characters; anything path-safe up to 64 is accepted
TASK_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # whole names only: use fullmatch
RESTRICTED_BY_DEFAULT = ("nightly", "release")
CHECKSUM_ALGORITHMS = ("sha256", "sha512", "sha384", "sha1")


def describe(e: ValidationError, what: str) -> str:
    """``<what>: <field path>: <message>`` for the first error (plus how many more)."""
    errors = e.errors()
    first = errors[0]
    loc = ""
    for part in first["loc"]:
        loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
    msg = first["msg"]
    more = f" (and {len(errors) - 1} more error(s))" if len(errors) > 1 else ""
    return f"{what}: {loc or '(top level)'}: {msg}{more}"


def check_artifact_path(value: str) -> str:
    """A relative POSIX path with no empty, ``.`` or ``..`` component and no backslash."""
    if not value or "\x00" in value or "\\" in value:
        raise ValueError(f"bad artifact path {value!r}")
    p = PurePosixPath(value)
    if p.is_absolute() or any(part in ("", ".", "..") for part in value.split("/")):
        raise ValueError(f"artifact path {value!r} must be relative, without '.' or '..' components")
    return value


# -- the task -------------------------------------------------------------------------------


class UpstreamArtifact(BaseModel):
    model_config = ConfigDict(extra="forbid")

    taskId: str
    taskType: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_-]*$")]
    paths: Annotated[list[str], Field(min_length=1)]
    formats: list[str]

    @field_validator("taskId")
    @classmethod
    def _task_id(cls, v: str) -> str:
        if not TASK_ID.fullmatch(v):
            raise ValueError(f"bad taskId {v!r} (expected 1-64 of A-Z a-z 0-9 _ -)")
        return v

    @field_validator("paths")
    @classmethod
    def _paths(cls, v: list[str]) -> list[str]:
        for p in v:
            check_artifact_path(p)
        if len(set(v)) != len(v):
            raise ValueError("the same path is listed twice")
        return v

    @field_validator("formats")
    @classmethod
    def _formats(cls, v: list[str]) -> list[str]:
        for f in v:
            if f not in KNOWN:
                raise ValueError(f"unknown format {f!r}")
        if len(set(v)) != len(v):
            raise ValueError("the same format is listed twice")
        return v


class ChecksumsRequest(BaseModel):
    """``payload.checksums``: sums files over the task's (signed) inputs in ``path``."""

    model_config = ConfigDict(extra="forbid")

    path: str = "public/build"
    algorithms: Annotated[list[str], Field(min_length=1)] = ["sha256", "sha512"]
    sign: bool = True

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        return check_artifact_path(v)

    @field_validator("algorithms")
    @classmethod
    def _algorithms(cls, v: list[str]) -> list[str]:
        for a in v:
            if a not in CHECKSUM_ALGORITHMS:
                raise ValueError(f"unsupported checksum algorithm {a!r} ({', '.join(CHECKSUM_ALGORITHMS)})")
        if len(set(v)) != len(v):
            raise ValueError("the same algorithm is listed twice")
        return v


class Payload(BaseModel):
    model_config = ConfigDict(extra="allow")

    upstreamArtifacts: Annotated[list[UpstreamArtifact], Field(min_length=1)]
    checksums: ChecksumsRequest | None = None


class Metadata(BaseModel):
    model_config = ConfigDict(extra="allow")

    source: Annotated[str, Field(min_length=1, max_length=4096)]


class Task(BaseModel):
    """The fields of a Taskcluster task the runner reads; others are kept as they are."""

    model_config = ConfigDict(extra="allow")

    scopes: Annotated[list[str], Field(min_length=1)]
    payload: Payload
    dependencies: Annotated[list[str], Field(min_length=1)] | None = None
    metadata: Metadata | None = None
    extra: dict[str, Any] | None = None
    taskId: str | None = None

    @field_validator("scopes")
    @classmethod
    def _scopes(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("scopes must be unique")
        if any(not s for s in v):
            raise ValueError("empty scope")
        return v

    @field_validator("dependencies")
    @classmethod
    def _deps(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError("dependencies must be unique")
        return v

    @field_validator("taskId")
    @classmethod
    def _own_id(cls, v: str | None) -> str | None:
        if v is not None and not TASK_ID.fullmatch(v):
            raise ValueError(f"bad taskId {v!r}")
        return v

    def tasks_for(self) -> str:
        """``extra.tasks_for`` (e.g. ``hg-push``, ``github-pull-request``), '' when absent."""
        value = (self.extra or {}).get("tasks_for", "")
        return value if isinstance(value, str) else ""


def parse_task(data: Any) -> Task:
    """Validate a decoded ``task.json``; raises ValueError with the field named."""
    try:
        return Task.model_validate(data)
    except ValidationError as e:
        raise ValueError(describe(e, "task.json")) from None


# -- the worker config ----------------------------------------------------------------------


class WorkerSection(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    id: Annotated[str, Field(min_length=1, max_length=128)]
    group: Annotated[str, Field(min_length=1, max_length=128)] = "sealbox"
    worker_class: Annotated[str, Field(min_length=1, max_length=64, alias="class")] = "signing"
    production: bool
    private_key: Path | None = None
    ip: str = "127.0.0.1"
    token_duration: Annotated[int, Field(gt=0, le=86400)] = 1200
    timeout: Annotated[float, Field(gt=0)] = 600.0
    jobs: Annotated[int, Field(ge=1, le=64)] = 4
    artifact_store: str | None = None
    artifact_store_ca: Path | None = None

    @field_validator("artifact_store")
    @classmethod
    def _store(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not v.startswith(("https://", "file://")):
            raise ValueError("must be an https:// or file:// URL template")
        if "{taskId}" not in v or "{path}" not in v:
            raise ValueError("must contain {taskId} and {path}")
        return v

    @model_validator(mode="after")
    def _key(self) -> WorkerSection:
        if self.production and self.private_key is None:
            raise ValueError("a production worker needs private_key (it signs its chain-of-trust record)")
        if not self.production and self.private_key is not None:
            raise ValueError("a dep worker (production = false) never signs its record: remove private_key")
        return self


class ScopesSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prefixes: Annotated[list[str], Field(min_length=1)]

    @field_validator("prefixes")
    @classmethod
    def _prefixes(cls, v: list[str]) -> list[str]:
        out = []
        for p in v:
            if not p.strip(":"):
                raise ValueError("empty scope prefix")
            out.append(p if p.endswith(":") else p + ":")
        return out


class LevelSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cert: str | None = None
    hosts: Annotated[list[str], Field(min_length=1)]
    ca: Path
    credentials: Path
    formats: Annotated[list[str], Field(min_length=1)]
    gpg_pubkey: Path | None = None
    #: the level's signing log public key (a server's DIR/public/signlog.pub): set, every
    #: signature's inclusion in its server's log is checked and listed in the record
    log_pubkey: Path | None = None
    restricted: bool | None = None
    trees: list[str] = []

    @field_validator("formats")
    @classmethod
    def _formats(cls, v: list[str]) -> list[str]:
        for f in v:
            if f not in KNOWN:
                raise ValueError(f"unknown format {f!r}")
        return v

    @field_validator("trees")
    @classmethod
    def _trees(cls, v: list[str]) -> list[str]:
        for t in v:
            if not re.match(r"^[a-z][a-z0-9+.-]*://[^/\s]+/\S+$", t):
                raise ValueError(f"tree {t!r} must be a repository URL like https://hg.example.org/repo")
        return [t.rstrip("/") for t in v]


class TrustedClass(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: Annotated[list[str], Field(min_length=1)]
    task_types: list[str] | None = None


class ToolsSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dmg: str | None = None
    hfsplus: str | None = None
    zipalign: str | None = "zipalign"


class LimitsSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # the archive rules' defaults (sealbox.archives), as for the signing formats
    max_archive_size: Annotated[int, Field(gt=0)] = DEFAULT_MAX_TOTAL
    max_archive_members: Annotated[int, Field(gt=0)] = DEFAULT_MAX_MEMBERS
    max_download_size: Annotated[int, Field(gt=0)] = 8 * 1024**3


class WorkerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    worker: WorkerSection
    scopes: ScopesSection
    levels: Annotated[dict[str, LevelSection], Field(min_length=1)]
    trusted: dict[str, TrustedClass] = {}
    tools: ToolsSection = ToolsSection()
    limits: LimitsSection = LimitsSection()
    #: folder of the config file; relative paths resolve against it
    base_dir: Path = Path(".")

    @model_validator(mode="after")
    def _levels(self) -> WorkerConfig:
        certs: dict[str, str] = {}
        for name, level in self.levels.items():
            if not re.match(r"^[a-z][a-z0-9_-]*$", name):
                raise ValueError(f"levels.{name}: level names are lowercase words")
            cert = self.cert_name(name)
            if cert in certs:
                raise ValueError(f"levels.{name}: cert '{cert}' is also used by level '{certs[cert]}'")
            certs[cert] = name
            if self.is_restricted(name) and not self.worker.production:
                raise ValueError(
                    f"levels.{name}: restricted level on a dep worker (production = false); "
                    "only production workers, which verify signatures, may use it"
                )
            if level.restricted is False and name in RESTRICTED_BY_DEFAULT:
                raise ValueError(f"levels.{name}.restricted: '{name}' is always restricted")
        return self

    def cert_name(self, level: str) -> str:
        return self.levels[level].cert or f"{level}-signing"

    def is_restricted(self, level: str) -> bool:
        cfg = self.levels[level]
        return cfg.restricted if cfg.restricted is not None else level in RESTRICTED_BY_DEFAULT

    def path(self, p: Path) -> Path:
        return p if p.is_absolute() else self.base_dir / p


def load_worker_config(path: Path) -> WorkerConfig:
    """Read and validate a worker TOML file; raises ConfigError naming the field."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read worker config {path}: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"worker config {path}: not valid TOML: {e}") from None
    if "base_dir" in raw:
        raise ConfigError(f"worker config {path}: base_dir: not a config key")
    raw["base_dir"] = path.resolve().parent
    try:
        return WorkerConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(describe(e, f"worker config {path}")) from None
