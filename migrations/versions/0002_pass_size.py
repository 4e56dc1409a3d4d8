"""Record the pass a result came from: jobs and targets coalesced into one trajectory pass.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("job_results") as batch:
        batch.add_column(sa.Column("pass_jobs", sa.Integer(), server_default="1", nullable=False))
        batch.add_column(sa.Column("pass_targets", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("job_results") as batch:
        batch.drop_column("pass_targets")
        batch.drop_column("pass_jobs")
