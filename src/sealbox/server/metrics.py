"""Prometheus metrics, served on their own plain-HTTP listener (``[metrics] listen``).

Everything is counted in the server process (jobs in the signing worker processes are timed
and counted by the parent that awaits them), so no multiprocess mode is needed. The hot path
costs a dict lookup and an increment: label children are made once, at start-up. Values that
exist anyway (jobs queued and running, workers alive, certificate dates) are read only when
Prometheus scrapes, by :class:`_Live`.

With the listener off, :class:`Metrics` itself is used: every method does nothing.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.aiohttp import make_aiohttp_handler
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .config import MetricsSection, Network, parse_listen
from .tokens import normalize_ip

if TYPE_CHECKING:
    from ..signlog import Recorder
    from .workers import WorkerPool


class JobsView(Protocol):
    """What a scrape reads of the job layer (its :class:`~.jobs.JobManager`)."""

    @property
    def queued(self) -> int: ...
    @property
    def active(self) -> int: ...
    @property
    def recorder(self) -> Recorder | None: ...


log = logging.getLogger("sealbox.server")

#: what a job can end as (the ``outcome`` of the job log line)
OUTCOMES = ("signed", "rejected", "gone", "failed", "error")
#: why an upload was refused: a fixed set, so no client string ever becomes a label value
REFUSALS = (
    "token_missing",
    "token_malformed",
    "token_forged",
    "token_not_yet_valid",
    "token_expired",
    "token_wrong_ip",
    "format",
    "filename",
    "size",
    "hash_mismatch",
    "remembered_failure",
    "malformed",
    "stalled",
    "other",
)
#: seconds from a job's submission to its outcome: a signing worker's 5 ms to a JVM tool's minutes
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
#: upload sizes, 1 KiB to 4 GiB by factors of 4
BYTES_BUCKETS = tuple(1024 * 4**i for i in range(12))


class Metrics:
    """The instrumentation points; this base class records nothing (metrics off)."""

    def job(self, fmt: str, outcome: str, seconds: float) -> None:
        """A job ended (``outcome`` one of :data:`OUTCOMES`) ``seconds`` after its submission."""

    def upload(self, fmt: str, size: int) -> None:
        """An upload of ``size`` bytes was accepted for ``fmt``."""

    def refused(self, reason: str) -> None:
        """An upload was refused (``reason`` one of :data:`REFUSALS`)."""

    def token_minted(self) -> None:
        """``POST /token`` issued a token."""

    def health(self, passed: Mapping[str, bool]) -> None:
        """``GET /__heartbeat__`` ran its checks (the fixed names of :mod:`.health`)."""

    def watch(
        self,
        jobs: JobsView,
        workers: WorkerPool | None,
        certificates: Mapping[str, datetime],
        tls_expiry: datetime | None,
    ) -> None:
        """Report the jobs' and workers' state at each scrape, and the certificates' expiry
        (by key name; the TLS certificate's on its own)."""


class PrometheusMetrics(Metrics):
    def __init__(self, level: str, formats: Iterable[str]) -> None:
        # The *_created series double the output and no alert uses them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        signatures = Counter(
            "sealbox_signatures",
            "Signing jobs ended, by format, cert level and outcome",
            ("format", "level", "outcome"),
            registry=r,
        )
        seconds = Histogram(
            "sealbox_signing_seconds",
            "Time from a job's submission to its outcome (queue wait and retries included)",
            ("format",),
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        sizes = Histogram(
            "sealbox_upload_bytes",
            "Size of the files uploaded and accepted for signing",
            ("format",),
            buckets=BYTES_BUCKETS,
            registry=r,
        )
        refused = Counter("sealbox_uploads_refused", "Uploads refused, by reason", ("reason",), registry=r)
        self._minted = Counter("sealbox_tokens_minted", "Upload tokens issued by POST /token", registry=r)
        # No series before the first heartbeat: a 0 would read as a failed check.
        self._checks = Gauge(
            "sealbox_health_check_ok",
            "1 if the check passed at the last GET /__heartbeat__, 0 if it failed",
            ("check",),
            registry=r,
        )
        self._heartbeat = Gauge(
            "sealbox_heartbeat_timestamp_seconds", "When GET /__heartbeat__ last ran its checks", registry=r
        )
        ProcessCollector(registry=r)  # process_*: CPU, memory, open files of the server
        formats = sorted(formats)
        # Every child made now: the hot path is a lookup, and each series exists (at 0) from
        # the start, so rate() and absent() behave from the first scrape.
        self._signatures = {(f, o): signatures.labels(f, level, o) for f in formats for o in OUTCOMES}
        self._seconds = {f: seconds.labels(f) for f in formats}
        self._sizes = {f: sizes.labels(f) for f in formats}
        self._refused = {reason: refused.labels(reason) for reason in REFUSALS}

    def job(self, fmt: str, outcome: str, seconds: float) -> None:
        self._signatures[fmt, outcome].inc()
        self._seconds[fmt].observe(seconds)

    def upload(self, fmt: str, size: int) -> None:
        self._sizes[fmt].observe(size)

    def refused(self, reason: str) -> None:
        self._refused.get(reason, self._refused["other"]).inc()

    def token_minted(self) -> None:
        self._minted.inc()

    def health(self, passed: Mapping[str, bool]) -> None:
        for name, ok in passed.items():
            self._checks.labels(name).set(ok)
        self._heartbeat.set_to_current_time()

    def watch(
        self,
        jobs: JobsView,
        workers: WorkerPool | None,
        certificates: Mapping[str, datetime],
        tls_expiry: datetime | None,
    ) -> None:
        self.registry.register(_Live(jobs, workers, certificates, tls_expiry))


class _Live(Collector):
    """Values read at scrape time from the objects that keep them anyway."""

    def __init__(
        self,
        jobs: JobsView,
        workers: WorkerPool | None,
        certificates: Mapping[str, datetime],
        tls_expiry: datetime | None,
    ) -> None:
        self.jobs = jobs
        self.workers = workers
        self.certificates = certificates
        self.tls_expiry = tls_expiry

    def collect(self) -> Iterator[Metric]:
        jobs = self.jobs
        yield GaugeMetricFamily("sealbox_jobs_queued", "Jobs waiting for a slot of their format", jobs.queued)
        yield GaugeMetricFamily("sealbox_jobs_running", "Jobs signing now", jobs.active)
        alive, configured, lost = self.workers.census() if self.workers is not None else (0, 0, 0)
        yield GaugeMetricFamily("sealbox_signing_workers", "Signing worker processes alive", alive)
        yield GaugeMetricFamily(
            "sealbox_signing_workers_configured", "Signing worker processes started", configured
        )
        yield CounterMetricFamily(
            "sealbox_worker_losses",
            "Signing worker processes lost (never replaced: their jobs sign in threads)",
            lost,
        )
        expiry = GaugeMetricFamily(
            "sealbox_certificate_expiry_timestamp_seconds",
            "When the certificate of each signing key expires (Unix time)",
            labels=("key",),
        )
        for name, when in sorted(self.certificates.items()):
            expiry.add_metric((name,), when.timestamp())
        yield expiry
        if self.tls_expiry is not None:
            yield GaugeMetricFamily(
                "sealbox_tls_certificate_expiry_timestamp_seconds",
                "When the server's TLS certificate expires (Unix time)",
                self.tls_expiry.timestamp(),
            )
        signlog = jobs.recorder.log if jobs.recorder is not None else None
        if signlog is not None:
            yield GaugeMetricFamily("sealbox_signing_log_entries", "Entries in the signing log", signlog.size)
            yield CounterMetricFamily(
                "sealbox_signing_log_flushes",
                "Batches of entries made durable (one fsync each)",
                signlog.flushes,
            )
            yield CounterMetricFamily(
                "sealbox_signing_log_failures",
                "Entries the signing log could not record (their signatures were not released)",
                signlog.failures,
            )


async def serve_metrics(metrics: PrometheusMetrics, section: MetricsSection) -> web.AppRunner:
    """Start the metrics listener (``section.listen`` set); the runner, to clean up at the end."""
    assert section.listen is not None
    host, port = parse_listen(section.listen)
    runner = web.AppRunner(
        metrics_app(metrics, section.allowed_ips), access_log=None, handle_signals=False, shutdown_timeout=1.0
    )
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    port = int(runner.addresses[0][1])  # the one the system picked for port 0
    url = f"http://{host}:{port}/metrics"
    log.info("metrics listening", extra={"fields": {"event": "metrics_listening", "url": url, "port": port}})
    return runner


def metrics_app(metrics: PrometheusMetrics, allowed: Sequence[Network]) -> web.Application:
    """``GET /metrics`` for the addresses in ``allowed`` (403 for any other)."""
    scrape = make_aiohttp_handler(metrics.registry, disable_compression=True)

    @web.middleware
    async def allowlist(request: web.Request, handler: Handler) -> web.StreamResponse:
        addr = ipaddress.ip_address(normalize_ip(request.remote or "0.0.0.0"))
        if not any(addr in net for net in allowed):
            return web.Response(status=403, text="address not allowed\n")
        return await handler(request)

    app = web.Application(middlewares=[allowlist])
    app.router.add_get("/metrics", scrape)
    return app
