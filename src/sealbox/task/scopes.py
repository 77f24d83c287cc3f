"""Scope, cert-level and source-tree checks of a signing task (all before any token)."""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass

from ..client import wire_name
from .schema import LevelSection, Task, WorkerConfig


class NotAllowed(Exception):
    """The task may not do what it asks (exit 3); the message says why."""


@dataclass(frozen=True)
class Grant:
    level: str
    cert_scope: str
    prefix: str
    formats: frozenset[str]


def check_scopes(config: WorkerConfig, task: Task) -> Grant:
    """Exactly one cert scope under a configured prefix naming a known level; the format
    scopes (under the same prefix) give the formats the task may use."""
    prefixes = config.scopes.prefixes
    cert_scopes = [
        (p, s) for s in task.scopes for p in prefixes if s.startswith(p + "cert:") and len(s) > len(p) + 5
    ]
    if not cert_scopes:
        raise NotAllowed(
            "no cert-level scope: the task needs exactly one of "
            + ", ".join(f"{p}cert:<level>" for p in prefixes)
        )
    if len(cert_scopes) > 1:
        raise NotAllowed("more than one cert-level scope: " + ", ".join(s for _, s in cert_scopes))
    prefix, cert_scope = cert_scopes[0]
    cert = cert_scope[len(prefix) + len("cert:") :]
    level = next((name for name in config.levels if config.cert_name(name) == cert), None)
    if level is None:
        known = ", ".join(config.cert_name(n) for n in config.levels)
        raise NotAllowed(f"unknown cert level in scope {cert_scope} (this worker knows: {known})")
    formats = frozenset(
        s[len(prefix) + len("format:") :] for s in task.scopes if s.startswith(prefix + "format:")
    )
    return Grant(level, cert_scope, prefix, formats)


def level_serves(level: LevelSection, fmt: str) -> bool:
    return fmt in level.formats or wire_name(fmt) in level.formats


def check_formats(config: WorkerConfig, grant: Grant, requested: set[str]) -> None:
    missing = sorted(requested - grant.formats)
    if missing:
        need = ", ".join(f"{grant.prefix}format:{f}" for f in missing)
        raise NotAllowed(f"format scope missing for {', '.join(missing)}: the task needs {need}")
    level = config.levels[grant.level]
    unserved = sorted(f for f in requested if not level_serves(level, f))
    if unserved:
        raise NotAllowed(f"cert level '{grant.level}' does not serve format(s) {', '.join(unserved)} here")


_PULL = re.compile(r"(^|/)(pull|pulls|merge_requests)/\d+(/|$)|(^|/)refs/pull/")


def try_or_pull_request(source: str, tasks_for: str) -> str | None:
    """Why ``source`` looks like a try or pull-request push, else None."""
    if "pull-request" in tasks_for or "pull_request" in tasks_for:
        return f"tasks_for is {tasks_for!r}"
    path = urllib.parse.urlparse(source).path
    for part in path.split("/"):
        if part == "try" or part.startswith("try-"):
            return f"source {source} is a try repository"
    if _PULL.search(path):
        return f"source {source} is a pull request"
    return None


def check_tree(config: WorkerConfig, grant: Grant, task: Task) -> str | None:
    """For a restricted level, the task's ``metadata.source`` must lie in an allow-listed
    tree and must not be a try or pull-request source. Returns the matching tree."""
    if not config.is_restricted(grant.level):
        return None
    source = task.metadata.source if task.metadata else None
    if not source:
        raise NotAllowed(f"cert level '{grant.level}' is restricted and the task has no metadata.source")
    reason = try_or_pull_request(source, task.tasks_for())
    if reason:
        raise NotAllowed(f"cert level '{grant.level}' is refused to try/pull-request sources: {reason}")
    for tree in config.levels[grant.level].trees:
        if source == tree or source.startswith(tree + "/"):
            return tree
    raise NotAllowed(f"source {source} is not in a tree allowed to use cert level '{grant.level}'")
