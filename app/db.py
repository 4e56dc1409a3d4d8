"""Database plumbing shared by the API and the worker: engine, sessions, base class, migrations.

The schema changes only through Alembic (migrations/); `upgrade_database` runs it from code so
the embedded mode can create its SQLite file on first start.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import DateTime, Engine, MetaData, create_engine, event
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.types import TypeDecorator

if TYPE_CHECKING:
    from app.settings import Settings

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
ALEMBIC_INI = REPO_ROOT / "alembic.ini"

# Deterministic constraint names: Alembic can then drop/alter them on every backend
# (SQLite batch mode needs names to recreate tables).
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base whose metadata carries the naming convention."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend.

    PostgreSQL keeps the zone (timestamptz); SQLite stores naive text, so we store UTC and
    re-attach the zone on the way out. Comparisons in SQL then agree on both.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


_engines: dict[str, Engine] = {}
_lock = threading.Lock()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets the API read while the in-process runner writes; busy_timeout makes writers
    # wait for each other instead of failing with "database is locked".
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def normalize_url(url: str) -> str:
    """Pick the installed PostgreSQL driver for plain `postgresql://` / `postgres://` URLs.

    SQLAlchemy 2.1 maps a bare `postgresql://` to psycopg 3, but this project ships
    psycopg2-binary; deployments should not have to spell the driver out.
    """
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            try:
                import psycopg  # noqa: F401

                driver = "postgresql+psycopg://"
            except ImportError:
                driver = "postgresql+psycopg2://"
            return driver + url[len(prefix) :]
    return url


def ensure_sqlite_dir(url: str) -> bool:
    """Create the folder of a SQLite file; return whether the URL is SQLite at all."""
    u = make_url(url)
    if u.get_backend_name() != "sqlite":
        return False
    if u.database and u.database != ":memory:":
        Path(u.database).parent.mkdir(parents=True, exist_ok=True)
    return True


def pg_connect_args(settings: Settings) -> dict[str, Any]:
    """libpq parameters that bound time: connect timeout, server-side statement timeout, and
    TCP keepalives / user timeout, which notice a peer that vanished (host down, network cut)."""
    return {
        "connect_timeout": max(2, math.ceil(settings.db_connect_timeout_s)),  # libpq's minimum
        "options": f"-c statement_timeout={int(settings.db_statement_timeout_s * 1000)}",
        "keepalives": 1,
        "keepalives_idle": 10,
        "keepalives_interval": 3,
        "keepalives_count": 3,
        "tcp_user_timeout": int(settings.db_statement_timeout_s * 1000),
    }


def make_engine(url: str, settings: Settings | None = None) -> Engine:
    """A new engine; SQLite gets thread-sharing and the pragmas above, PostgreSQL the time
    bounds of `settings` (default: the environment's)."""
    url = normalize_url(url)
    if ensure_sqlite_dir(url):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 10})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if settings is None:
        from app.settings import get_settings

        settings = get_settings()
    connect_args = pg_connect_args(settings)
    engine = create_engine(
        url,
        pool_pre_ping=True,
        pool_size=5,
        max_overflow=5,
        pool_timeout=settings.db_pool_timeout_s,
        connect_args=connect_args,
    )
    if engine.dialect.driver == "psycopg2":
        _bound_waits(engine, connect_args, settings)
    return engine


def _bound_waits(engine: Engine, connect_args: dict[str, Any], settings: Settings) -> None:
    """Route psycopg2's waiting through app.dbwait, which also sees a frozen server."""
    from app import dbwait

    dbwait.install(
        dbwait.Limits(
            connect_s=settings.db_connect_timeout_s,
            statement_s=settings.db_statement_timeout_s + 1.0,
            probe_s=settings.db_probe_timeout_s,
        )
    )
    cargs, cparams = engine.dialect.create_connect_args(engine.url)
    cparams = {**cparams, **connect_args}

    def probe_connection() -> Any:
        return engine.dialect.loaded_dbapi.connect(*cargs, **cparams)

    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbwait.register(dbapi_conn, probe_connection)

    event.listen(engine, "connect", on_connect)


def get_engine(url: str) -> Engine:
    """One engine (connection pool) per URL per process."""
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _engines[url] = make_engine(url)
        return engine


def dispose_engine(url: str) -> None:
    """Close the pool for `url` (tests drop their databases afterwards)."""
    with _lock:
        engine = _engines.pop(url, None)
    if engine is not None:
        engine.dispose()


class SafeCloseSession(Session):
    """A session whose close() survives a database that went away meanwhile.

    close() rolls back the open transaction; on a dead connection that raises, and in the API
    it runs after the response was sent (a dependency's exit), where raising resets the
    client's connection. The connections are invalidated instead: the pool drops them.
    """

    def close(self) -> None:
        try:
            super().close()
        except DBAPIError as e:
            log.warning("session closed on a lost connection: %s", str(e).partition("\n")[0])
            self.invalidate()


def session_factory(url: str) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), class_=SafeCloseSession, expire_on_commit=False)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = session_factory(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def alembic_config(url: str) -> Any:
    """Alembic Config for the repository's migrations, pointed at `url`."""
    from alembic.config import Config

    if not ALEMBIC_INI.is_file():
        raise RuntimeError(
            f"{ALEMBIC_INI} not found: run the service from a source checkout or the Docker image"
        )
    cfg = Config(str(ALEMBIC_INI))
    cfg.set_main_option("script_location", str(REPO_ROOT / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["skip_logging"] = True  # keep the host process's logging configuration
    return cfg


def upgrade_database(url: str, revision: str = "head") -> None:
    """Apply migrations up to `revision` (the only way the schema is created)."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)
