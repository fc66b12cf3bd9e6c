"""Classifier runs (the points of an experiment's grid) and the backbone feature cache.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25 16:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("owner_id", sa.String(length=36), nullable=False),
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("config_key", sa.String(length=64), nullable=False),
        sa.Column("split", sa.JSON(), nullable=True),
        sa.Column("history", sa.JSON(), nullable=True),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("best_epoch", sa.Integer(), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=True),
        sa.Column("predictions_key", sa.Text(), nullable=True),
        sa.Column("reused_from", sa.String(length=36), nullable=True),
        sa.Column("timings", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_runs_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["owner_id"], ["api_keys.id"], name=op.f("fk_runs_owner_id_api_keys")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_runs")),
        sa.UniqueConstraint("job_id", "index", name="uq_runs_job_index"),
    )
    op.create_index("ix_runs_owner_config_key", "runs", ["owner_id", "config_key"])
    op.create_index(op.f("ix_runs_owner_id"), "runs", ["owner_id"])
    op.create_table(
        "feature_cache",
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("backbone", sa.String(length=160), nullable=False),
        sa.Column("transform", sa.String(length=64), nullable=False),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("sha256", "backbone", "transform", name=op.f("pk_feature_cache")),
    )


def downgrade() -> None:
    op.drop_table("feature_cache")
    op.drop_index(op.f("ix_runs_owner_id"), table_name="runs")
    op.drop_index("ix_runs_owner_config_key", table_name="runs")
    op.drop_table("runs")
    op.execute(
        "DELETE FROM job_chunks WHERE job_id IN (SELECT id FROM jobs WHERE kind = 'experiment')"
    )
    op.execute("DELETE FROM jobs WHERE kind = 'experiment'")
