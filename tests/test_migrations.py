"""Alembic is the only source of schema: upgrade on an empty database, models == migrations
(autogenerate finds nothing to do), downgrade to base and up again, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

import app.models  # noqa: F401  (tables on Base.metadata)
from app.db import Base, alembic_config, normalize_url

TABLES = {"jobs", "job_inputs", "job_results", "api_keys"}
# 0004: progress by passes, the live preview and the completion webhook's state.
COLUMNS_0004 = {
    "pass_name", "pass_index", "pass_round", "pass_stage", "pass_stages", "pass_step",
    "preview_png", "preview_at",
    "callback_url", "webhook_status", "webhook_attempts", "webhook_error",
}  # fmt: skip


def _job_columns(engine: sa.Engine) -> set[str]:
    return {c["name"] for c in sa.inspect(engine).get_columns("jobs")}


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'migrations.db'}"
    else:
        yield request.getfixturevalue("pg_database")


def _diff(engine: sa.Engine) -> list[object]:
    with engine.connect() as conn:
        ctx = MigrationContext.configure(
            conn,
            opts={"compare_type": True, "render_as_batch": conn.dialect.name == "sqlite"},
        )
        return list(compare_metadata(ctx, Base.metadata))


def test_upgrade_matches_models_and_downgrades(empty_db: str) -> None:
    cfg = alembic_config(empty_db)
    engine = sa.create_engine(normalize_url(empty_db), poolclass=sa.pool.NullPool)
    try:
        assert sa.inspect(engine).get_table_names() == []
        command.upgrade(cfg, "head")
        inspector = sa.inspect(engine)
        assert TABLES <= set(inspector.get_table_names())
        assert _diff(engine) == []
        # The naming convention reached the database (batch mode on SQLite relies on it).
        assert inspector.get_pk_constraint("jobs")["name"] == "pk_jobs"
        indexes = {ix["name"]: ix for ix in inspector.get_indexes("jobs")}
        assert set(indexes) == {
            "ix_jobs_model_id",
            "ix_jobs_status_heartbeat_at",
            "ix_jobs_owner_key_id_idempotency_key",
        }
        assert indexes["ix_jobs_owner_key_id_idempotency_key"]["unique"]
        if engine.dialect.name == "postgresql":
            fks = inspector.get_foreign_keys("job_results")
            assert [fk["name"] for fk in fks] == ["fk_job_results_job_id_jobs"]
        # The status CHECK constraint guards the state machine on both backends.
        with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO jobs (id, kind, model_id, method, params, n_targets, status, "
                    "attempt, max_attempts, created_at, updated_at) VALUES ('x', 'invert', "
                    "'m', 'surf', '{}', 1, 'exploded', 0, 1, CURRENT_TIMESTAMP, "
                    "CURRENT_TIMESTAMP)"
                )
            )

        # 0004 adds columns only, and takes exactly those away again; an existing row gets
        # webhook_attempts = 0.
        assert COLUMNS_0004 <= _job_columns(engine)
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO jobs (id, kind, model_id, method, params, n_targets, status, "
                    "attempt, max_attempts, created_at, updated_at) VALUES ('j', 'invert', "
                    "'m', 'surf', '{}', 1, 'queued', 0, 1, CURRENT_TIMESTAMP, "
                    "CURRENT_TIMESTAMP)"
                )
            )
        before = _job_columns(engine)
        command.downgrade(cfg, "0003")
        assert _job_columns(engine) == before - COLUMNS_0004
        command.upgrade(cfg, "head")
        assert _job_columns(engine) == before and _diff(engine) == []
        with engine.begin() as conn:
            row = conn.execute(sa.text("SELECT webhook_attempts, pass_name FROM jobs")).one()
            assert tuple(row) == (0, None)
            conn.execute(sa.text("DELETE FROM jobs"))

        # 0003 (API keys, job owners) goes down and up again without touching older columns.
        command.downgrade(cfg, "0002")
        assert "api_keys" not in sa.inspect(engine).get_table_names()
        assert "owner_key_id" not in {c["name"] for c in sa.inspect(engine).get_columns("jobs")}
        command.upgrade(cfg, "head")
        assert _diff(engine) == []

        command.downgrade(cfg, "base")
        assert set(sa.inspect(engine).get_table_names()) == {"alembic_version"}
        command.upgrade(cfg, "head")
        assert _diff(engine) == []
    finally:
        engine.dispose()


def test_single_head() -> None:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    assert len(script.get_heads()) == 1
