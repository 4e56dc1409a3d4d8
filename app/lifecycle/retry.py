"""Bounded retries of the writes that must not be lost to a short database outage.

Progress writes are skipped on a database error (the next one carries newer numbers); the
final result write is worth waiting for, so it is retried with backoff until a deadline.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import SQLAlchemyError

log = logging.getLogger(__name__)

T = TypeVar("T")

FINISH_RETRY_S = 60.0  # how long a finished attempt keeps trying to write its result


class DbRetry:
    """Retries callables on SQLAlchemyError with exponential backoff (0.1 s .. 5 s) until one
    shared deadline; the last error is re-raised after it. `failures` counts retried errors."""

    def __init__(self, budget_s: float = FINISH_RETRY_S, first_s: float = 0.1, max_s: float = 5.0):
        self.deadline = time.monotonic() + budget_s
        self.first_s, self.max_s = first_s, max_s
        self.failures = 0

    def __call__(self, what: str, fn: Callable[[], T]) -> T:
        delay = self.first_s
        while True:
            try:
                return fn()
            except SQLAlchemyError as e:
                left = self.deadline - time.monotonic()
                if left <= 0:
                    raise
                self.failures += 1
                log.warning("%s failed (%s); retrying for up to %.0f s more", what, e, left)
                time.sleep(min(delay, left))
                delay = min(delay * 2, self.max_s)
