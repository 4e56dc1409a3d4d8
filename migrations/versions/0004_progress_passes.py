"""Progress by passes (surf, rescue, restart, ...), a small live preview, and webhook state.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-10

A job's progress is a sequence of passes, each with its own stage counter (worker.progress);
`stage`/`stages` keep their old meaning for what reads the columns directly. The preview is a
PNG of a few kilobytes, written at most about once a second. The webhook columns are for
issue 15's completion callbacks.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PROGRESS = ("pass_name", "pass_index", "pass_round", "pass_stage", "pass_stages", "pass_step")
PREVIEW = ("preview_png", "preview_at")
WEBHOOK = ("callback_url", "webhook_status", "webhook_attempts", "webhook_error")


def upgrade() -> None:
    # Plain ADD COLUMNs (no table rebuild on SQLite, no rewrite on PostgreSQL).
    op.add_column("jobs", sa.Column("pass_name", sa.String(length=16), nullable=True))
    for name in PROGRESS[1:]:
        op.add_column("jobs", sa.Column(name, sa.Integer(), nullable=True))
    op.add_column("jobs", sa.Column("preview_png", sa.LargeBinary(), nullable=True))
    op.add_column("jobs", sa.Column("preview_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("jobs", sa.Column("callback_url", sa.Text(), nullable=True))
    op.add_column("jobs", sa.Column("webhook_status", sa.String(length=16), nullable=True))
    op.add_column(
        "jobs",
        sa.Column("webhook_attempts", sa.Integer(), server_default="0", nullable=False),
    )
    op.add_column("jobs", sa.Column("webhook_error", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        for name in reversed(PROGRESS + PREVIEW + WEBHOOK):
            batch.drop_column(name)
