"""Alembic environment: one code path for PostgreSQL and SQLite.

`render_as_batch` is switched on for SQLite, whose ALTER TABLE cannot change or drop
columns; batch mode recreates the table instead. The naming convention on Base.metadata
gives every constraint a stable name, which batch mode needs.
"""

from __future__ import annotations

import logging
from logging.config import fileConfig

from alembic import context
from sqlalchemy import create_engine, pool

import app.models  # noqa: F401  (registers the tables on Base.metadata)
from app.db import Base, ensure_sqlite_dir, normalize_url

config = context.config
if config.config_file_name is not None and not config.attributes.get("skip_logging"):
    fileConfig(config.config_file_name, disable_existing_loggers=False)
log = logging.getLogger("alembic.env")

target_metadata = Base.metadata


def database_url() -> str:
    """-x url=... beats the URL set in the config, which beats the environment."""
    x_url = context.get_x_argument(as_dictionary=True).get("url")
    if x_url:
        return normalize_url(x_url)
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return normalize_url(url)
    from app.settings import Settings

    return Settings().sqlalchemy_url


def run_migrations_offline() -> None:
    url = database_url()
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        render_as_batch=url.startswith("sqlite"),
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:  # a caller (tests) handed us an open connection
        _run(connection)
        return
    url = database_url()
    ensure_sqlite_dir(url)
    engine = create_engine(url, poolclass=pool.NullPool)  # one-shot: keep no connections
    try:
        with engine.connect() as conn:
            _run(conn)
            conn.commit()
    finally:
        engine.dispose()


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
