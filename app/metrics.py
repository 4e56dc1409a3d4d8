"""Prometheus metrics for GET /metrics.

Request metrics are counted in this process. Job metrics (counts by status, durations) and
queue depth are read from the database and the queue *at scrape time*, because jobs run in
other processes (RQ workers) and the database is the one place that sees all of them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session, sessionmaker

from app.models import Job, JobStatus

log = logging.getLogger(__name__)

DURATION_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class StateCollector:
    """Queue depth, workers, jobs by status and job-duration histograms, read on scrape."""

    def __init__(self, sessions: sessionmaker[Session], queue: Callable[[], Any]) -> None:
        self.sessions = sessions
        self.queue = queue

    def describe(self) -> list[Metric]:
        return []  # collected lazily; nothing to check at registration time

    def collect(self) -> Iterator[Metric]:
        queue = self.queue()
        if queue is not None:
            try:
                depth = GaugeMetricFamily("surfing_queue_depth", "Jobs waiting in the queue.")
                depth.add_metric([], queue.depth())
                yield depth
                workers = GaugeMetricFamily("surfing_workers", "Workers serving the queue.")
                workers.add_metric([], queue.workers())
                yield workers
            except Exception as e:  # a scrape must not fail because Redis blinked
                log.warning("metrics: queue unavailable: %s", e)
        try:
            yield from self._jobs()
        except Exception as e:
            log.warning("metrics: database unavailable: %s", e)

    def _jobs(self) -> Iterator[Metric]:
        with self.sessions() as s:
            counts = s.execute(
                select(Job.kind, Job.status, func.count()).group_by(Job.kind, Job.status)
            ).all()
            bucket_cols = [
                func.sum(case((Job.run_seconds <= b, 1), else_=0)) for b in DURATION_BUCKETS
            ]
            durations = s.execute(
                select(Job.kind, Job.status, func.count(), func.sum(Job.run_seconds), *bucket_cols)
                .where(Job.run_seconds.is_not(None))
                .group_by(Job.kind, Job.status)
            ).all()
        jobs = GaugeMetricFamily(
            "surfing_jobs", "Jobs by kind and status.", labels=["kind", "status"]
        )
        seen = {(k, st) for k, st, _ in counts}
        for kind, status, n in counts:
            jobs.add_metric([kind, status], n)
        for status in JobStatus:
            for kind in ("invert", "cs"):
                if (kind, status.value) not in seen:
                    jobs.add_metric([kind, status.value], 0)
        yield jobs
        hist = HistogramMetricFamily(
            "surfing_job_duration_seconds",
            "Wall time of finished job attempts (claim to finish).",
            labels=["kind", "status"],
        )
        for kind, status, n, total, *cum in durations:
            buckets = [(str(b), int(c or 0)) for b, c in zip(DURATION_BUCKETS, cum, strict=True)]
            buckets.append(("+Inf", int(n)))
            hist.add_metric([kind, status], buckets, float(total or 0.0))
        yield hist


class Metrics:
    """A registry per app instance (tests build many apps in one process)."""

    def __init__(self, sessions: sessionmaker[Session], queue: Callable[[], Any]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter(
            "surfing_http_requests",
            "HTTP requests by method, route template and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "surfing_http_request_duration_seconds",
            "HTTP request latency by method and route template.",
            ["method", "route"],
            registry=self.registry,
        )
        self.registry.register(StateCollector(sessions, queue))  # type: ignore[arg-type]
