"""The chain of trust of upstream tasks: is every input the bytes a trusted task produced?

Per upstream task: fetch its ``public/chain-of-trust.json``; on a production worker also its
``.sig``, which must verify under a key of a trusted worker class allowed to produce the task's
types; the record must be for that taskId, list every consumed path, and give each the sha256
of the bytes fetched. The records and signatures themselves are :mod:`sealbox.task.cot`.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..errors import ConfigError
from ..fsutil import read_small
from . import cot
from .artifacts import ArtifactStore, NotInStore, Progress, Unavailable
from .exits import EXIT_FAILED, EXIT_MALFORMED, EXIT_UNAVAILABLE, Echo, TaskFailure
from .plan import Item
from .schema import WorkerConfig

Trusted = dict[str, list[Ed25519PublicKey]]


def verify_upstreams(
    config: WorkerConfig, items: list[Item], work: Path, copies: Path, echo: Echo, live: bool | None
) -> None:
    """Verify every upstream task of ``items``, fetching into ``work/cot/<taskId>/``; sets each
    item's ``source`` to a copy in ``copies`` (a private folder) whose sha256 was checked: what
    is checked is what is signed, whatever happens to ``work/cot`` after. Raises
    :class:`TaskFailure`."""
    trusted = trusted_keys(config) if config.worker.production else {}
    by_task: dict[str, list[Item]] = {}
    for item in items:
        by_task.setdefault(item.upstream.taskId, []).append(item)
    checked = "signature verified" if config.worker.production else "signature not checked (dep worker)"
    heads = [cot.RECORD, cot.SIGNATURE] if config.worker.production else [cot.RECORD]
    with Progress(echo, live) as progress, _Fetcher(config, work, progress) as get:
        upstreams = [_Upstream(tid, group) for tid, group in by_task.items()]
        get.prefetch((up.task_id, rel) for up in upstreams for rel in heads)
        records = [_trusted_record(config, trusted, get, up) for up in upstreams]
        # the artifacts, once every record that lists them is trusted
        get.prefetch((up.task_id, item.path) for up in upstreams for item in up.items)
        for up, record in zip(upstreams, records, strict=True):
            _check_files(get, up, record, copies)
            echo(f"chain of trust: {up.what}: {checked}, {len(up.items)} artifact(s) match their sha256")


def trusted_keys(config: WorkerConfig) -> Trusted:
    """The public keys of every trusted worker class of ``config``."""
    out: Trusted = {}
    for name, cls in config.trusted.items():
        try:
            out[name] = [cot.parse_public_key(k) for k in cls.keys]
        except cot.CotError as e:
            raise TaskFailure(EXIT_FAILED, f"worker config: trusted.{name}.keys: {e}") from None
    return out


@dataclass
class _Upstream:
    """One upstream task and the items taken from it."""

    task_id: str
    items: list[Item]

    @property
    def task_types(self) -> set[str]:
        return {i.upstream.taskType for i in self.items}

    @property
    def what(self) -> str:
        return f"upstream task {self.task_id} ({'/'.join(sorted(self.task_types))})"


class _Fetcher:
    """Upstream artifacts in ``work/cot/<taskId>/<path>``, from the worker's artifact store; a
    failure is a :class:`TaskFailure`. A context manager (it holds the store's session)."""

    def __init__(self, config: WorkerConfig, work: Path, progress: Progress) -> None:
        w = config.worker
        self.work = work
        self.store = ArtifactStore(
            w.artifact_store,
            progress,
            root=work / "cot",
            ca=config.path(w.artifact_store_ca) if w.artifact_store_ca else None,
            max_size=config.limits.max_download_size,
        )

    def __enter__(self) -> _Fetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.store.close()

    def prefetch(self, wanted: Iterable[tuple[str, str]]) -> None:
        """Fetch these (taskId, path) together; a failure is raised when one is asked for."""
        with _failures():
            self.store.prefetch((task_id, rel, self._dest(task_id, rel)) for task_id, rel in wanted)

    def __call__(self, task_id: str, rel: str) -> Path:
        with _failures():
            return self.store.fetch(task_id, rel, self._dest(task_id, rel))

    def optional(self, task_id: str, rel: str) -> Path | None:
        """:meth:`__call__`, or None if the store has no such file (any other failure raises)."""
        try:
            return self(task_id, rel)
        except _Missing:
            return None

    def read(self, task_id: str, rel: str, most: int) -> bytes:
        """The bytes of a small file of the chain of trust (a record, a signature): at most
        ``most``, more is malformed (it is not read whole)."""
        try:
            return read_small(self(task_id, rel), most)
        except ConfigError:
            raise TaskFailure(
                EXIT_MALFORMED, f"chain of trust: {task_id}/{rel} is larger than {most} bytes"
            ) from None

    def _dest(self, task_id: str, rel: str) -> Path:
        return self.work / "cot" / task_id / rel


class _Missing(TaskFailure):
    """The store has no such file (a 404): for a signature, the record is unsigned."""


@contextlib.contextmanager
def _failures() -> Iterator[None]:
    try:
        yield
    except NotInStore as e:
        raise _Missing(EXIT_UNAVAILABLE, f"input unavailable: {e}") from None
    except Unavailable as e:
        raise TaskFailure(EXIT_UNAVAILABLE, f"input unavailable: {e}") from None
    except ConfigError as e:
        raise TaskFailure(EXIT_FAILED, f"worker.artifact_store_ca: {e}") from None


def _trusted_record(config: WorkerConfig, trusted: Trusted, get: _Fetcher, up: _Upstream) -> dict[str, Any]:
    """The upstream's record, its signature checked (production) and its contents too."""
    data = get.read(up.task_id, cot.RECORD, cot.MAX_RECORD)
    if config.worker.production:
        _check_signature(config, trusted, get, up, data)
    return _parse_record(up, data)


def _check_files(get: _Fetcher, up: _Upstream, record: dict[str, Any], copies: Path) -> None:
    """Every artifact taken from the upstream, copied into ``copies``, has the sha256 its record
    gives; sets ``source`` to the copy."""
    files = {}
    for item in up.items:
        copy = copies / up.task_id / item.path
        source = get(up.task_id, item.path)
        try:
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, copy)
        except OSError as e:
            why = f"cannot copy {source} into the scratch folder: {e.strerror}"
            raise TaskFailure(EXIT_FAILED, why) from None
        files[item.path] = copy
    try:
        cot.check_files(record, files)
    except cot.CotError as e:
        raise TaskFailure(EXIT_MALFORMED, f"chain of trust: {up.what}: {e}") from None
    for item in up.items:
        item.source = files[item.path]


def _check_signature(
    config: WorkerConfig, trusted: Trusted, get: _Fetcher, up: _Upstream, data: bytes
) -> None:
    if get.optional(up.task_id, cot.SIGNATURE) is None:  # (a store that fails otherwise: exit 4)
        raise TaskFailure(
            EXIT_MALFORMED,
            f"chain of trust: {up.what}: its record is not signed ({cot.SIGNATURE} missing); "
            "a production worker only consumes signed records (a dep worker's are not)",
        )
    cls = cot.verify_signature(data, get.read(up.task_id, cot.SIGNATURE, 1024), trusted)
    if cls is None:
        raise TaskFailure(
            EXIT_MALFORMED,
            f"chain of trust: {up.what}: the record's Ed25519 signature does not verify under "
            f"any key of a trusted worker class ({', '.join(trusted) or 'none configured'})",
        )
    allowed = config.trusted[cls].task_types
    if allowed is not None and not up.task_types <= set(allowed):
        raise TaskFailure(
            EXIT_MALFORMED,
            f"chain of trust: {up.what}: signed by worker class '{cls}', which may only produce "
            f"task types {', '.join(allowed)}",
        )


def _parse_record(up: _Upstream, data: bytes) -> dict[str, Any]:
    """The record, which must be for this task and list every path taken from it."""
    try:
        record = cot.parse_record(data)
    except cot.CotError as e:
        raise TaskFailure(EXIT_MALFORMED, f"chain of trust: {up.what}: {e}") from None
    if record["taskId"] != up.task_id:
        raise TaskFailure(
            EXIT_MALFORMED,
            f"chain of trust: {up.what}: the record is for task {record['taskId']}, not {up.task_id}",
        )
    for item in up.items:
        if item.path not in record["artifacts"]:
            raise TaskFailure(
                EXIT_MALFORMED,
                f"chain of trust: {up.what}: {item.path} is not listed in its chain-of-trust record",
            )
    return record
