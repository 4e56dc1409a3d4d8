"""Throwaway PostgreSQL clusters and Redis servers for tests, on loopback only.

Used when the machine's own servers are not usable (a fresh Debian PostgreSQL does not trust
127.0.0.1) and by the fault tests, which stop and freeze (SIGSTOP) their own servers and must
never touch the machine's. Every server lives in a temporary folder, listens on a free
loopback port (PostgreSQL also on a private socket folder), trusts local connections, and is
killed by `stop()`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pg_bin(name: str) -> str:
    """initdb/pg_ctl/postgres: on PATH, else the newest Debian cluster's bin folder."""
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: p.parent.name)
    for folder in reversed(versions):
        if (folder / name).is_file():
            return str(folder / name)
    raise FileNotFoundError(f"{name} not found (install PostgreSQL: scripts/setup.sh)")


def _as_postgres() -> dict[str, str]:
    """PostgreSQL refuses to run as root: run it as the `postgres` user then (no `runuser` in
    between: it would stop itself when its child is stopped and stay stopped)."""
    return {"user": "postgres", "group": "postgres"} if os.geteuid() == 0 else {}


def _wait(check: object, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not come up within {timeout:.0f} s")


def _pids_of(parent: int) -> list[int]:
    """`parent` and its children (a postmaster's backends), from /proc."""
    pids = [parent]
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("PPid:") and int(line.split()[1]) == parent:
                pids.append(int(status.parent.name))
    return pids


class PostgresServer:
    """A private cluster: initdb in a temp folder, trust auth, loopback port + own socket dir."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="surfing-pg-"))
        self.data = self.root / "data"
        self.sockets = self.root / "sock"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.sockets.mkdir()
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
            shutil.chown(self.sockets, "postgres", "postgres")
        subprocess.run(
            [_pg_bin("initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "-N"],
            check=True,
            capture_output=True,
            **_as_postgres(),  # type: ignore[call-overload]
        )

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> PostgresServer:
        opts = [
            "-c", f"port={self.port}", "-c", "listen_addresses=127.0.0.1",
            "-c", f"unix_socket_directories={self.sockets}", "-c", "fsync=off",
            "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
            "-c", "max_connections=100", "-c", "shared_buffers=16MB",
        ]  # fmt: skip
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 (the server keeps it)
        self.proc = subprocess.Popen(
            [_pg_bin("postgres"), "-D", str(self.data), *opts],
            stdout=log,
            stderr=log,
            start_new_session=True,
            **_as_postgres(),  # type: ignore[call-overload]
        )
        _wait(self.ready, "throwaway PostgreSQL")
        return self

    def ready(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                pass
        except OSError:
            return False
        import psycopg2

        try:
            psycopg2.connect(
                host="127.0.0.1", port=self.port, user="postgres", dbname="postgres",
                connect_timeout=2,
            ).close()  # fmt: skip
        except psycopg2.Error:
            return False
        return True

    def postmaster_pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def freeze(self) -> None:
        """SIGSTOP the postmaster and all its backends: sockets stay open, nothing answers."""
        for pid in _pids_of(self.postmaster_pid()):
            os.kill(pid, signal.SIGSTOP)

    def thaw(self) -> None:
        for pid in _pids_of(self.postmaster_pid()):
            os.kill(pid, signal.SIGCONT)

    def halt(self) -> None:
        """Fast shutdown (clients are disconnected); `start()` brings the same cluster back."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.postmaster_pid(), signal.SIGINT)
            self.proc.wait(30)
        self.proc = None

    def stop(self) -> None:
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.thaw()
                self.halt()
        finally:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
            shutil.rmtree(self.root, ignore_errors=True)


class RedisServer:
    """`redis-server` on a free loopback port, no persistence, in a temp folder."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="surfing-redis-"))
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        exe = shutil.which("redis-server")
        if exe is None:
            raise FileNotFoundError("redis-server not found (scripts/setup.sh installs it)")
        log = open(self.root / "server.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.root)],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )  # fmt: skip
        _wait(self.ready, "throwaway Redis")
        return self

    def ready(self) -> bool:
        from redis import Redis

        if self.proc is None or self.proc.poll() is not None:
            return False
        try:
            return bool(Redis.from_url(self.url, socket_connect_timeout=0.5).ping())
        except Exception:
            return False

    def freeze(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.thaw()
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.root, ignore_errors=True)
