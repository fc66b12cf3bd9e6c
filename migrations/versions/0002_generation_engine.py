"""Generation engine: the parents of editing jobs, per-step chunk progress, and the hash of
each generator's weights (recorded with every image).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 13:34:03.353293
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "job_parents",
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.String(length=36), nullable=False),
        sa.ForeignKeyConstraint(
            ["image_id"], ["images.id"], name=op.f("fk_job_parents_image_id_images")
        ),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_job_parents_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("job_id", "position", name=op.f("pk_job_parents")),
    )
    with op.batch_alter_table("generator_models", schema=None) as batch_op:
        batch_op.add_column(sa.Column("weights_sha256", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("weights_signature", sa.String(length=64), nullable=True))

    with op.batch_alter_table("job_chunks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("step", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("steps", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("job_chunks", schema=None) as batch_op:
        batch_op.drop_column("steps")
        batch_op.drop_column("step")

    with op.batch_alter_table("generator_models", schema=None) as batch_op:
        batch_op.drop_column("weights_signature")
        batch_op.drop_column("weights_sha256")

    op.drop_table("job_parents")
