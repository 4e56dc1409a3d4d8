"""Job queue abstraction: RQ on Redis, or a thread inside the API process.

Both run the same job function, `worker.jobs.run_job(job_id)`; the queue only carries the job
id, because the database row holds everything else. That keeps the two modes identical in
behaviour and lets a job be re-queued (after a lost worker) by id alone.
"""

from __future__ import annotations

import logging
import queue as stdlib_queue
import threading
import uuid
from typing import Protocol

from app.settings import Settings

log = logging.getLogger(__name__)

JOB_FUNCTION = "worker.jobs.run_job"
FAILURE_CALLBACK = "worker.jobs.on_rq_failure"


class QueueUnavailable(RuntimeError):
    """The queue backend cannot be reached (Redis down)."""


class JobQueue(Protocol):
    """What the API needs from a queue backend."""

    kind: str

    def start(self) -> None: ...

    def close(self) -> None: ...

    def enqueue(self, job_id: str) -> str:
        """Queue the job; returns the backend's reference for it."""
        ...

    def discard(self, queue_ref: str | None) -> None:
        """Best effort: drop a queued entry (the db status is what really cancels)."""
        ...

    def depth(self) -> int: ...

    def workers(self) -> int:
        """Workers currently able to take jobs from this queue."""
        ...

    def ping(self) -> None:
        """Raise QueueUnavailable if the backend does not answer."""
        ...


class RQJobQueue:
    """RQ on Redis: jobs go to `settings.queue_name`; any number of `surfing worker`s drain it."""

    kind = "rq"

    def __init__(self, settings: Settings) -> None:
        from redis import Redis
        from rq import Queue

        assert settings.redis_url
        self.settings = settings
        self.redis = Redis.from_url(settings.redis_url, socket_connect_timeout=5, socket_timeout=10)
        self.queue = Queue(settings.queue_name, connection=self.redis)

    def start(self) -> None:
        pass

    def close(self) -> None:
        self.redis.close()

    def enqueue(self, job_id: str) -> str:
        from redis.exceptions import RedisError
        from rq import Callback

        # A fresh RQ id per enqueue: a re-queued job must not collide with the record of the
        # attempt that was lost (RQ may still hold it in its started/failed registries).
        ref = f"{job_id}_{uuid.uuid4().hex[:8]}"  # RQ ids allow [A-Za-z0-9_-] only
        try:
            self.queue.enqueue_call(
                JOB_FUNCTION,
                args=(job_id,),
                job_id=ref,
                timeout=self.settings.job_timeout_s,
                result_ttl=self.settings.rq_result_ttl_s,
                failure_ttl=self.settings.rq_failure_ttl_s,
                description=f"surfing job {job_id}",
                on_failure=Callback(FAILURE_CALLBACK),
            )
        except RedisError as e:
            raise QueueUnavailable(f"cannot reach Redis: {e}") from e
        return ref

    def discard(self, queue_ref: str | None) -> None:
        if not queue_ref:
            return
        from redis.exceptions import RedisError
        from rq.exceptions import InvalidJobOperation, NoSuchJobError
        from rq.job import Job as RQJob

        try:
            RQJob.fetch(queue_ref, connection=self.redis).cancel()
        except (NoSuchJobError, InvalidJobOperation, RedisError) as e:
            log.debug("could not discard RQ job %s: %s", queue_ref, e)

    def depth(self) -> int:
        from redis.exceptions import RedisError

        try:
            return int(self.queue.count)
        except RedisError as e:
            raise QueueUnavailable(str(e)) from e

    def workers(self) -> int:
        from redis.exceptions import RedisError
        from rq import Worker

        try:
            return len(Worker.all(queue=self.queue))
        except RedisError as e:
            raise QueueUnavailable(str(e)) from e

    def ping(self) -> None:
        from redis.exceptions import RedisError

        try:
            self.redis.ping()
        except RedisError as e:
            raise QueueUnavailable(f"cannot reach Redis: {e}") from e


class InProcessJobQueue:
    """Embedded mode: one daemon thread runs queued jobs one at a time in this process.

    Jobs are still claimed, heart-beaten and finished through the database exactly as a
    remote worker does it; the thread just replaces Redis + `surfing worker`.
    """

    kind = "in-process"
    _STOP = "__stop__"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._queue: stdlib_queue.Queue[str] = stdlib_queue.Queue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(
                target=self._loop, name="surfing-inprocess-runner", daemon=True
            )
            self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(self._STOP)
            self._thread.join(timeout)

    def _loop(self) -> None:
        from worker.jobs import prepare_runtime, run_job  # torch loads with the runner

        prepare_runtime(self.settings)

        while True:
            job_id = self._queue.get()
            if job_id == self._STOP:
                return
            try:
                run_job(job_id, settings=self.settings)
            except Exception:  # run_job already recorded the failure in the db
                log.exception("job %s failed", job_id)

    def enqueue(self, job_id: str) -> str:
        self.start()
        self._queue.put(job_id)
        return f"local.{job_id}"

    def discard(self, queue_ref: str | None) -> None:
        pass  # run_job skips jobs whose row is no longer queued

    def depth(self) -> int:
        return self._queue.qsize()

    def workers(self) -> int:
        return int(self._thread is not None and self._thread.is_alive())

    def ping(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            raise QueueUnavailable("the in-process runner thread is not running")


def make_queue(settings: Settings) -> JobQueue:
    """RQ when REDIS_URL is set, else the in-process runner."""
    if settings.embedded:
        return InProcessJobQueue(settings)
    return RQJobQueue(settings)
