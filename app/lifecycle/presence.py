"""Worker presence: which workers are alive *now*, for /readyz and the workers metric.

RQ's own worker registrations outlive a SIGKILLed worker by minutes (its key's TTL), so each
`surfing worker` also beats into one sorted set per queue, scored with Redis's own clock (no
skew between hosts). Counting the members beaten within the TTL is two cheap commands.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from redis.exceptions import RedisError

log = logging.getLogger(__name__)


def presence_key(queue_name: str) -> str:
    return f"surfing:workers:{queue_name}"


def _now(redis: Any) -> float:
    sec, usec = redis.time()
    return float(sec) + usec / 1e6


def beat(redis: Any, queue_name: str, worker: str, ttl_s: float) -> None:
    """Mark `worker` alive now and forget members silent for longer than the TTL."""
    now, key = _now(redis), presence_key(queue_name)
    pipe = redis.pipeline(transaction=False)
    pipe.zadd(key, {worker: now})
    pipe.zremrangebyscore(key, "-inf", now - ttl_s)
    pipe.expire(key, max(1, int(2 * ttl_s)))
    pipe.execute()


def leave(redis: Any, queue_name: str, worker: str) -> None:
    redis.zrem(presence_key(queue_name), worker)


def fresh_workers(redis: Any, queue_name: str, ttl_s: float) -> int:
    """Workers that beat within the last `ttl_s` seconds."""
    return int(redis.zcount(presence_key(queue_name), _now(redis) - ttl_s, "+inf"))


class PresenceBeat(threading.Thread):
    """Beats every `interval` seconds from a daemon thread; leaves the set on `stop()`."""

    def __init__(
        self, redis: Any, queue_name: str, worker: str, interval: float, ttl_s: float
    ) -> None:
        super().__init__(name="surfing-presence", daemon=True)
        self.redis, self.queue_name, self.worker = redis, queue_name, worker
        self.interval, self.ttl_s = interval, ttl_s
        self._stop_event = threading.Event()

    def start(self) -> PresenceBeat:  # type: ignore[override]
        self._beat()  # visible before the first job can be taken
        super().start()
        return self

    def _beat(self) -> None:
        try:
            beat(self.redis, self.queue_name, self.worker, self.ttl_s)
        except RedisError as e:  # Redis away: the worker is not usable anyway; keep trying
            log.warning("presence beat failed: %s", e)

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self._beat()

    def stop(self) -> None:
        self._stop_event.set()
        try:
            leave(self.redis, self.queue_name, self.worker)
        except RedisError:
            pass
