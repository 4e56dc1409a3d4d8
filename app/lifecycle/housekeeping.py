"""The periodic side of the lifecycle: one daemon thread per process (every worker, the API)
that reconciles the queue every heartbeat interval and reaps stale jobs every half stale
window. Each step is bounded and any error only skips that step until the next tick."""

from __future__ import annotations

import logging
import threading
import time

from sqlalchemy.orm import Session, sessionmaker

from app.lifecycle.reaper import reap_stale_jobs
from app.lifecycle.reconciler import Reconciler, grace_s
from app.queue import JobQueue
from app.settings import Settings

log = logging.getLogger(__name__)


class Housekeeper:
    """Runs the reconciler and `reap_stale_jobs` on a daemon thread until `stop()`."""

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
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="surfing-housekeeper", daemon=True)

    def start(self) -> Housekeeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        last_reap = time.monotonic()
        while not self._stop.wait(self.tick):
            if self.reconciler is not None:
                try:
                    self.reconciler.run()
                except Exception as e:  # keep going after a db or Redis blip
                    log.warning("reconciler pass failed: %s: %s", type(e).__name__, e)
            if time.monotonic() - last_reap >= self.reap_every:
                last_reap = time.monotonic()
                try:
                    reap_stale_jobs(self.sessions, self.queue, self.settings)
                except Exception as e:
                    log.warning("reaper pass failed: %s: %s", type(e).__name__, e)
