"""`surfing worker`: an RQ worker suited to torch.

It is a `SimpleWorker`: jobs run in the worker process itself, never in a fork, because a
process that has initialised CUDA cannot safely fork, and forking per job would also throw
away the warm checkpoint cache. RQ's job timeout (`SURFING_JOB_TIMEOUT_S`) still applies
(SIGALRM in the main thread), and run_job checks the same deadline between generator calls.

Beside the RQ loop, two daemon threads: the housekeeper (re-queue stale jobs, enqueue queued
rows missing from Redis: `app.lifecycle`) and a presence beat, so /readyz counts this worker
only while it is alive.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid

from app.db import session_factory
from app.lifecycle import Housekeeper, Reconciler, grace_s, reap_stale_jobs
from app.lifecycle.presence import PresenceBeat
from app.queue import RQJobQueue
from app.settings import get_settings

log = logging.getLogger("surfing.worker")


def run_worker(burst: bool = False) -> None:
    """Drain the queue named by SURFING_QUEUE_NAME on REDIS_URL (for ever, or until empty)."""
    from rq import SimpleWorker

    from worker.runtime import prepare_runtime

    logging.basicConfig(
        level=os.environ.get("SURFING_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    settings = get_settings()
    if not settings.redis_url:
        raise SystemExit(
            "surfing worker needs REDIS_URL (and DATABASE_URL, shared with the API); "
            "without them `surfing serve` runs jobs in-process and needs no worker"
        )
    prepare_runtime(settings)
    sessions = session_factory(settings.sqlalchemy_url)
    queue = RQJobQueue(settings)
    queue.ping()
    # Jobs of a worker that died while we were down: re-queue or fail them before starting.
    reap_stale_jobs(sessions, queue, settings)
    # ... and queued rows whose Redis entry is gone (a flushed or restarted Redis).
    Reconciler(sessions, queue, grace_s(settings)).run()
    housekeeper = Housekeeper(sessions, queue, settings).start()
    name = f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:6]}"
    presence = PresenceBeat(
        queue.redis,
        settings.queue_name,
        name,
        interval=settings.heartbeat_interval_s,
        ttl_s=settings.stale_after_s,
    ).start()
    worker = SimpleWorker([queue.queue], connection=queue.redis, name=name)
    log.info("worker %s listening on queue %r (burst=%s)", name, settings.queue_name, burst)
    try:
        worker.work(burst=burst, logging_level=os.environ.get("SURFING_LOG_LEVEL", "INFO"))
    finally:
        housekeeper.stop()
        presence.stop()
