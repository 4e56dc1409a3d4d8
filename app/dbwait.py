"""Bounded waits on PostgreSQL: no call waits for the server longer than its deadline.

libpq's own timeouts cannot see a *frozen* server (SIGSTOP, a hung VM): the kernel still
accepts connections and acknowledges every byte, so a query just waits for an answer that does
not come. psycopg2 lets a wait callback do all its waiting (`set_wait_callback`); ours polls in
short slices and gives up when

- the operation's own deadline passes (connect: `db_connect_timeout_s`; a statement: the
  server-side `statement_timeout` plus 1 s, the server normally enforcing it first), or
- a *probe* (a fresh connection running SELECT 1 under `db_probe_timeout_s`, started by any
  call kept waiting `PROBE_AFTER_S`) found the server not answering.

While the server is marked down every new call fails at once (the API answers 503 with
Retry-After); waiting calls keep probing, at most one probe at a time, until one succeeds.
psycopg2 closes a connection whose wait failed, and SQLAlchemy then drops it from its pool.
"""

from __future__ import annotations

import logging
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg2
from psycopg2 import extensions

log = logging.getLogger(__name__)

PROBE_AFTER_S = 0.25  # a healthy server answers our queries in milliseconds
_SLICE_MS = 100


class NotAnswering(psycopg2.OperationalError):
    """PostgreSQL did not answer in time (SQLAlchemy reports it as an OperationalError)."""


@dataclass(frozen=True)
class Limits:
    connect_s: float = 3.0
    statement_s: float = 11.0  # server statement_timeout + 1 s
    probe_s: float = 1.0


class Server:
    """What this process knows about one server: down or not, and the probe that decides it."""

    def __init__(self, connect: Callable[[], Any]) -> None:
        self.connect = connect  # a fresh DBAPI connection, as the engine makes them
        self.down = False
        self._probing = False
        self._lock = threading.Lock()

    def suspect(self) -> None:
        """Start a probe unless one is running."""
        with self._lock:
            if self._probing:
                return
            self._probing = True
        threading.Thread(target=self._probe, name="surfing-db-probe", daemon=True).start()

    def _probe(self) -> None:
        _local.probe = True
        answered = True
        try:
            conn = self.connect()
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT 1")
            finally:
                conn.close()
        except NotAnswering:
            answered = False
        except psycopg2.Error as e:  # refused, too many clients, ...: it answered, calls decide
            log.debug("database probe: %s", e)
        finally:
            was_down, self.down = self.down, not answered
            with self._lock:
                self._probing = False
        if was_down != self.down:
            log.warning("PostgreSQL %s", "is not answering" if self.down else "answers again")


_limits = Limits()
_servers: dict[str, Server] = {}
_local = threading.local()


def install(limits: Limits) -> None:
    """Make every psycopg2 call of this process wait through `wait` (process-wide)."""
    global _limits
    _limits = limits
    if extensions.get_wait_callback() is not wait:
        extensions.set_wait_callback(wait)


def register(conn: Any, connect: Callable[[], Any]) -> None:
    """Tie `conn`'s server (by its password-free dsn) to a way of opening probe connections."""
    if conn.dsn not in _servers:
        _servers[conn.dsn] = Server(connect)


def wait(conn: Any) -> None:
    """psycopg2's wait callback: poll `conn` until done, within the deadlines above."""
    server = _servers.get(conn.dsn)
    probe = getattr(_local, "probe", False)
    connecting = conn.status == extensions.STATUS_SETUP
    if probe:
        limit = _limits.probe_s
    else:
        limit = _limits.connect_s if connecting else _limits.statement_s
    if server is not None and server.down and not probe:
        server.suspect()
        raise NotAnswering("PostgreSQL is not answering (a probe timed out); try again later")
    start = time.monotonic()
    while True:
        state = conn.poll()
        if state == extensions.POLL_OK:
            return
        poller = select.poll()  # per step: libpq may change sockets while connecting
        poller.register(
            conn.fileno(), select.POLLIN if state == extensions.POLL_READ else select.POLLOUT
        )
        while not poller.poll(_SLICE_MS):
            waited = time.monotonic() - start
            if waited >= limit:
                what = "connecting" if connecting else "for an answer"
                raise NotAnswering(f"PostgreSQL: no progress {what} within {limit:g} s")
            if server is not None and not probe and waited >= PROBE_AFTER_S:
                if server.down:
                    raise NotAnswering("PostgreSQL is not answering (a probe timed out)")
                server.suspect()
