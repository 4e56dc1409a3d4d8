"""API keys, job ownership and idempotency keys.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03

`jobs.owner_key_id` has no foreign key on purpose: adding one would rebuild the jobs table on
SQLite, and keys are only ever revoked, never deleted.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("scope", sa.String(length=16), nullable=False),
        sa.Column("secret_sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "scope IN ('read', 'submit', 'admin')", name=op.f("ck_api_keys_scope")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
    )
    # Plain ADD COLUMNs (no table rebuild on SQLite, no rewrite on PostgreSQL).
    op.add_column("jobs", sa.Column("owner_key_id", sa.String(length=32), nullable=True))
    op.add_column("jobs", sa.Column("idempotency_key", sa.String(length=255), nullable=True))
    op.add_column("jobs", sa.Column("request_hash", sa.String(length=64), nullable=True))
    op.create_index(
        op.f("ix_jobs_owner_key_id_idempotency_key"),
        "jobs",
        ["owner_key_id", "idempotency_key"],
        unique=True,
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_jobs_owner_key_id_idempotency_key"), table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("request_hash")
        batch.drop_column("idempotency_key")
        batch.drop_column("owner_key_id")
    op.drop_table("api_keys")
