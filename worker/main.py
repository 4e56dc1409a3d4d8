"""`surfing worker`: an RQ worker suited to torch.

It is a `SimpleWorker`: jobs run in the worker process itself, never in a fork, because a
process that has initialised CUDA cannot safely fork, and forking per job would also throw
away the warm checkpoint cache. RQ's job timeout (`SURFING_JOB_TIMEOUT_S`) still applies
(SIGALRM in the main thread), and run_job checks the same deadline between generator calls.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid

from app.db import session_factory
from app.queue import RQJobQueue
from app.services.reaper import PeriodicReaper, reap_stale_jobs
from app.settings import get_settings

log = logging.getLogger("surfing.worker")


def run_worker(burst: bool = False) -> None:
    """Drain the queue named by SURFING_QUEUE_NAME on REDIS_URL (for ever, or until empty)."""
    from rq import SimpleWorker

    from worker.jobs import prepare_runtime

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
    reaper = PeriodicReaper(sessions, queue, settings).start()
    name = f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:6]}"
    worker = SimpleWorker([queue.queue], connection=queue.redis, name=name)
    log.info("worker %s listening on queue %r (burst=%s)", name, settings.queue_name, burst)
    try:
        worker.work(burst=burst, logging_level=os.environ.get("SURFING_LOG_LEVEL", "INFO"))
    finally:
        reaper.stop()
