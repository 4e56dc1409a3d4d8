"""The periodic side of the lifecycle: one daemon thread per process (every worker, the API)
that reconciles the queue every heartbeat interval, reaps stale jobs every half stale window
and purges expired payloads every ten minutes (app.lifecycle.retention); each tick it also
schedules the pending webhooks of finished jobs (app.lifecycle.webhooks: sent on their own
threads). Each step is bounded and any error only skips that step until the next tick."""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta

from sqlalchemy.orm import Session, sessionmaker

from app.lifecycle.reaper import reap_stale_jobs
from app.lifecycle.reconciler import Reconciler, grace_s
from app.lifecycle.retention import PURGE_EVERY_S, purge
from app.lifecycle.webhooks import deliverer
from app.queue import JobQueue
from app.settings import Settings

log = logging.getLogger(__name__)


class Housekeeper:
    """Runs the reconciler, `reap_stale_jobs` and `purge` on a daemon thread until `stop()`."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        queue: JobQueue | None,
        settings: Settings,
        interval: float | None = None,
    ) -> None:
        self.sessions, self.queue, self.settings = sessions, queue, settings
        self.reap_every = interval or max(1.0, settings.stale_after_s / 2)
        self.tick = min(settings.heartbeat_interval_s, self.reap_every)
        self.reconciler = (
            Reconciler(sessions, queue, grace_s(settings)) if queue is not None else None
        )
        self._last_reap = time.monotonic()
        self._last_purge = -PURGE_EVERY_S  # the first tick purges: processes may not live long
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="surfing-housekeeper", daemon=True)

    def start(self) -> Housekeeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.tick):
            self.run_once()

    def run_once(self) -> None:
        """One tick: reconcile, then reap and purge if their time has come."""
        if self.reconciler is not None:
            try:
                self.reconciler.run()
            except Exception as e:  # keep going after a db or Redis blip
                log.warning("reconciler pass failed: %s: %s", type(e).__name__, e)
        hooks = deliverer(self.sessions, self.settings)
        if hooks is not None:
            try:
                hooks.scan()
            except Exception as e:
                log.warning("webhook scan failed: %s: %s", type(e).__name__, e)
        if time.monotonic() - self._last_reap >= self.reap_every:
            self._last_reap = time.monotonic()
            try:
                reap_stale_jobs(self.sessions, self.queue, self.settings)
            except Exception as e:
                log.warning("reaper pass failed: %s: %s", type(e).__name__, e)
        days = self.settings.retention_days
        if days and time.monotonic() - self._last_purge >= PURGE_EVERY_S:
            self._last_purge = time.monotonic()
            try:
                r = purge(self.sessions, timedelta(days=days))  # bounded: BUDGET_S
                if r.jobs:
                    log.info("retention: purged %d job(s) older than %d days, ~%d bytes",
                             r.jobs, days, r.bytes_freed)
            except Exception as e:
                log.warning("retention pass failed: %s: %s", type(e).__name__, e)
