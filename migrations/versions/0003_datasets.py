"""Real datasets: a split, a Fitzpatrick group, extra labels and the file name per image;
jobs of other kinds (ingest, export) with a result; indexes for de-duplication and parents.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 13:55:04.616246
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.add_column(sa.Column("skin_tone_group", sa.String(length=8), nullable=True))
        batch_op.add_column(sa.Column("split", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("labels", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("original_name", sa.Text(), nullable=True))
        batch_op.create_index("ix_images_dataset_id_sha256", ["dataset_id", "sha256"], unique=False)
        batch_op.create_index("ix_images_parent_image_id", ["parent_image_id"], unique=False)

    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("result", sa.JSON(), nullable=True))
        batch_op.alter_column("condition", existing_type=sa.VARCHAR(length=120), nullable=True)
        batch_op.alter_column("dataset_id", existing_type=sa.VARCHAR(length=36), nullable=True)
        batch_op.alter_column("strategy", existing_type=sa.VARCHAR(length=32), nullable=True)
        batch_op.alter_column("model_id", existing_type=sa.VARCHAR(length=120), nullable=True)


def downgrade() -> None:
    # jobs of the later kinds cannot live in the older schema
    other = "(SELECT id FROM jobs WHERE kind <> 'generate')"
    op.execute(f"DELETE FROM job_chunks WHERE job_id IN {other}")
    op.execute(f"UPDATE images SET job_id = NULL WHERE job_id IN {other}")
    op.execute("DELETE FROM jobs WHERE kind <> 'generate' OR dataset_id IS NULL")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.alter_column("model_id", existing_type=sa.VARCHAR(length=120), nullable=False)
        batch_op.alter_column("strategy", existing_type=sa.VARCHAR(length=32), nullable=False)
        batch_op.alter_column("condition", existing_type=sa.VARCHAR(length=120), nullable=False)
        batch_op.alter_column("dataset_id", existing_type=sa.VARCHAR(length=36), nullable=False)
        batch_op.drop_column("result")

    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.drop_index("ix_images_parent_image_id")
        batch_op.drop_index("ix_images_dataset_id_sha256")
        batch_op.drop_column("original_name")
        batch_op.drop_column("labels")
        batch_op.drop_column("split")
        batch_op.drop_column("skin_tone_group")
