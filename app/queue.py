"""Job queue abstraction: RQ on Redis, or a thread inside the API process.

Both run the same job function, `worker.jobs.run_job(job_id)`; the queue only carries the job
id, because the database row holds everything else. That keeps the two modes identical in
behaviour and lets a job be re-queued (after a lost worker) by id alone. A queue entry is a
hint, never the truth: a `queued` row with no waiting entry is enqueued again by the
reconciler (`app.lifecycle.reconciler`), and duplicates are skipped by the guarded claim.

The `app` package never imports `worker`: RQ resolves the job function from its name in the
worker process, and the in-process runner is built by a factory the caller passes in, by
default the fixed, allow-listed `EMBEDDED_RUNNER` resolved with importlib.
"""

from __future__ import annotations

import importlib
import logging
import queue as stdlib_queue
import threading
import uuid
from collections.abc import Callable, Collection
from typing import Any, Protocol

from app.settings import Settings

log = logging.getLogger(__name__)

JOB_FUNCTION = "worker.jobs.run_job"
FAILURE_CALLBACK = "worker.jobs.on_rq_failure"
# The in-process runner: a factory (settings) -> run(job_id); only these names may be loaded.
EMBEDDED_RUNNER = "worker.jobs.embedded_runner"
ALLOWED_RUNNERS = frozenset({EMBEDDED_RUNNER})
# RQ job statuses of an entry that a worker will still pop (all others: gone or taken).
RQ_WAITING = frozenset({"queued", "deferred", "scheduled"})

Runner = Callable[[str], Any]
RunnerFactory = Callable[[Settings], Runner]


def load_runner(name: str = EMBEDDED_RUNNER) -> RunnerFactory:
    """The runner factory named by an allow-listed constant (never by input)."""
    if name not in ALLOWED_RUNNERS:
        raise ValueError(f"{name!r} is not an allowed job runner")
    module, _, attr = name.rpartition(".")
    factory: RunnerFactory = getattr(importlib.import_module(module), attr)
    return factory


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

    def waiting(self, refs: Collection[str]) -> set[str]:
        """Those of `refs` (from `enqueue`) whose entries a worker will still take; the rest
        are gone (flushed, popped by a worker that died, failed). QueueUnavailable if down."""
        ...

    def workers(self) -> int:
        """Workers currently able to take jobs from this queue (alive now)."""
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
        from redis.backoff import NoBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.retry import Retry

        # Bounded time: redis-py retries timeouts 10x with backoff by default (minutes against
        # a frozen Redis); here one immediate retry, and only for a dropped connection.
        self.redis = Redis.from_url(
            settings.redis_url,
            socket_connect_timeout=settings.redis_connect_timeout_s,
            socket_timeout=settings.redis_socket_timeout_s,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
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

    def waiting(self, refs: Collection[str]) -> set[str]:
        from redis.exceptions import RedisError
        from rq.job import Job as RQJob

        refs = list(refs)
        if not refs:
            return set()
        try:
            pipe = self.redis.pipeline(transaction=False)
            for ref in refs:
                pipe.hget(RQJob.key_for(ref), "status")
            statuses = pipe.execute()
        except RedisError as e:
            raise QueueUnavailable(str(e)) from e
        return {r for r, st in zip(refs, statuses, strict=True) if st and st.decode() in RQ_WAITING}

    def workers(self) -> int:
        """Workers whose own presence beat is younger than SURFING_STALE_AFTER_S (RQ's
        registrations outlive a killed worker by minutes)."""
        from redis.exceptions import RedisError

        from app.lifecycle.presence import fresh_workers

        try:
            return fresh_workers(self.redis, self.settings.queue_name, self.settings.stale_after_s)
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
    _STOP = ("__stop__", "")

    def __init__(self, settings: Settings, runner: RunnerFactory | None = None) -> None:
        self.settings = settings
        self.runner = runner
        self._queue: stdlib_queue.Queue[tuple[str, str]] = stdlib_queue.Queue()  # (ref, job id)
        self._waiting: set[str] = set()  # refs not yet taken, or being claimed right now
        self._lock = threading.Lock()
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
        run = (self.runner or load_runner())(self.settings)  # torch loads with the runner

        while True:
            ref, job_id = self._queue.get()
            if (ref, job_id) == self._STOP:
                return
            try:
                run(job_id)
            except Exception:  # run_job already recorded the failure in the db
                log.exception("job %s failed", job_id)
            finally:
                with self._lock:
                    self._waiting.discard(ref)

    def enqueue(self, job_id: str) -> str:
        self.start()
        ref = f"local.{job_id}.{uuid.uuid4().hex[:8]}"
        with self._lock:
            self._waiting.add(ref)
        self._queue.put((ref, job_id))
        return ref

    def discard(self, queue_ref: str | None) -> None:
        pass  # run_job skips jobs whose row is no longer queued

    def depth(self) -> int:
        return self._queue.qsize()

    def waiting(self, refs: Collection[str]) -> set[str]:
        with self._lock:
            return self._waiting.intersection(refs)

    def workers(self) -> int:
        return int(self._thread is not None and self._thread.is_alive())

    def ping(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            raise QueueUnavailable("the in-process runner thread is not running")


def make_queue(settings: Settings, runner: RunnerFactory | None = None) -> JobQueue:
    """RQ when REDIS_URL is set, else the in-process runner (built by `runner`, default
    `load_runner()`)."""
    if settings.embedded:
        return InProcessJobQueue(settings, runner)
    return RQJobQueue(settings)
