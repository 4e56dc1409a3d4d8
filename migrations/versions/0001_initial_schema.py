"""Initial schema: jobs, their inputs, their results.

Revision ID: 0001
Revises:
Create Date: 2026-11-26

Migrations spell out plain SQLAlchemy types (DateTime(timezone=True) rather than the app's
UTCDateTime decorator) so they never change meaning when application code changes.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ts(name: str, nullable: bool = True) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("model_id", sa.String(length=64), nullable=False),
        sa.Column("method", sa.String(length=16), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("n_targets", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("queue_ref", sa.String(length=80), nullable=True),
        sa.Column("worker", sa.String(length=200), nullable=True),
        sa.Column("stage", sa.Integer(), nullable=True),
        sa.Column("stages", sa.Integer(), nullable=True),
        sa.Column("objective", sa.Float(), nullable=True),
        _ts("progress_at"),
        sa.Column("error", sa.Text(), nullable=True),
        _ts("created_at", nullable=False),
        _ts("updated_at", nullable=False),
        _ts("started_at"),
        _ts("heartbeat_at"),
        _ts("finished_at"),
        sa.Column("run_seconds", sa.Float(), nullable=True),
        sa.CheckConstraint("kind IN ('invert', 'cs')", name=op.f("ck_jobs_kind")),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'succeeded', 'failed', 'canceled')",
            name=op.f("ck_jobs_status"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
    )
    op.create_index(op.f("ix_jobs_model_id"), "jobs", ["model_id"], unique=False)
    op.create_index(
        op.f("ix_jobs_status_heartbeat_at"), "jobs", ["status", "heartbeat_at"], unique=False
    )

    op.create_table(
        "job_inputs",
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("target", sa.LargeBinary(), nullable=True),
        sa.Column("measurements", sa.LargeBinary(), nullable=True),
        sa.Column("matrix", sa.LargeBinary(), nullable=True),
        sa.Column("matrix_seed", sa.Integer(), nullable=True),
        sa.Column("m", sa.Integer(), nullable=True),
        sa.Column("x_init", sa.LargeBinary(), nullable=True),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_job_inputs_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("job_id", name=op.f("pk_job_inputs")),
    )

    op.create_table(
        "job_results",
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("latent", sa.JSON(), nullable=False),
        sa.Column("objective", sa.JSON(), nullable=False),
        sa.Column("pixel_error", sa.JSON(), nullable=True),
        sa.Column("measurement_residual", sa.JSON(), nullable=True),
        sa.Column("trace", sa.JSON(), nullable=False),
        sa.Column("evals", sa.Integer(), nullable=False),
        sa.Column("device", sa.String(length=32), nullable=False),
        sa.Column("solve_seconds", sa.Float(), nullable=False),
        sa.Column("reconstruction", sa.LargeBinary(), nullable=False),
        _ts("created_at", nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_job_results_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("job_id", name=op.f("pk_job_results")),
    )


def downgrade() -> None:
    op.drop_table("job_results")
    op.drop_table("job_inputs")
    op.drop_index(op.f("ix_jobs_status_heartbeat_at"), table_name="jobs")
    op.drop_index(op.f("ix_jobs_model_id"), table_name="jobs")
    op.drop_table("jobs")
