"""Evaluations (issue 23): the memorisation audit of each evaluation, one row per synthetic
image (`evaluation_pairs`): its nearest real training image, the pair's cosine and SSIM, its
own parent's for a child, and whether it is flagged as a copy (what `exclude_copies` drops).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07 12:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "evaluation_pairs",
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("image_id", sa.String(length=36), nullable=False),
        sa.Column("dataset_id", sa.String(length=36), nullable=False),
        sa.Column("condition", sa.String(length=120), nullable=False),
        sa.Column("skin_tone", sa.Integer(), nullable=True),
        sa.Column("strategy", sa.String(length=32), nullable=True),
        sa.Column("nearest_image_id", sa.String(length=36), nullable=False),
        sa.Column("cosine", sa.Double(), nullable=False),
        sa.Column("ssim", sa.Double(), nullable=True),
        sa.Column("parent_image_id", sa.String(length=36), nullable=True),
        sa.Column("parent_cosine", sa.Double(), nullable=True),
        sa.Column("parent_ssim", sa.Double(), nullable=True),
        sa.Column("flagged", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name="fk_evaluation_pairs_job_id_jobs", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("job_id", "image_id", name="pk_evaluation_pairs"),
    )
    op.create_index(
        "ix_evaluation_pairs_dataset_flagged", "evaluation_pairs", ["dataset_id", "flagged"]
    )


def downgrade() -> None:
    op.drop_index("ix_evaluation_pairs_dataset_flagged", table_name="evaluation_pairs")
    op.drop_table("evaluation_pairs")
