"""Fine-tuning jobs (issue 22): registered fine-tuned models (new columns on
`generator_models`: owner, fine-tune, family, base, condition, weights key, training record),
each fine-tune member's state (`finetune_members`), the images it trains on (`finetune_images`,
the lineage) and its loss per step (`finetune_losses`).

Only nullable columns are added to an existing table, which SQLite does in place.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07 09:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UTC_DATETIME = sa.DateTime(timezone=True)
MODEL_COLUMNS = (
    ("owner_id", sa.String(length=36)),
    ("finetune_id", sa.String(length=36)),
    ("finetune_index", sa.Integer()),
    ("family_id", sa.String(length=120)),
    ("base_model_id", sa.String(length=120)),
    ("condition", sa.String(length=120)),
    ("weights_key", sa.Text()),
    ("training", sa.JSON()),
)
MODEL_INDEXES = ("owner_id", "finetune_id", "family_id")


def _job_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["job_id"], ["jobs.id"], name=f"fk_{table}_job_id_jobs", ondelete="CASCADE"
    )


def upgrade() -> None:
    for name, type_ in MODEL_COLUMNS:
        op.add_column("generator_models", sa.Column(name, type_, nullable=True))
    for name in MODEL_INDEXES:
        op.create_index(f"ix_generator_models_{name}", "generator_models", [name])

    op.create_table(
        "finetune_members",
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.String(length=120), nullable=False),
        sa.Column("conditions", sa.JSON(), nullable=False),
        sa.Column("train_images", sa.Integer(), nullable=False),
        sa.Column("loss", sa.Double(), nullable=True),
        sa.Column("images_per_s", sa.Double(), nullable=True),
        sa.Column("checkpoint_key", sa.Text(), nullable=True),
        sa.Column("checkpoint_step", sa.Integer(), nullable=True),
        sa.Column("samples", sa.JSON(), nullable=False),
        sa.Column("final_loss", sa.Double(), nullable=True),
        sa.Column("weights_sha256", sa.String(length=64), nullable=True),
        _job_fk("finetune_members"),
        sa.PrimaryKeyConstraint("job_id", "index", name="pk_finetune_members"),
    )
    op.create_table(
        "finetune_images",
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.String(length=36), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("storage_key", sa.Text(), nullable=False),
        sa.Column("condition", sa.String(length=120), nullable=False),
        sa.Column("skin_tone", sa.Integer(), nullable=True),
        _job_fk("finetune_images"),
        sa.PrimaryKeyConstraint("job_id", "index", "image_id", name="pk_finetune_images"),
    )
    op.create_index("ix_finetune_images_sha256", "finetune_images", ["sha256"])
    op.create_table(
        "finetune_losses",
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("loss", sa.Double(), nullable=False),
        _job_fk("finetune_losses"),
        sa.PrimaryKeyConstraint("job_id", "index", "step", name="pk_finetune_losses"),
    )


def downgrade() -> None:
    op.drop_table("finetune_losses")
    op.drop_index("ix_finetune_images_sha256", table_name="finetune_images")
    op.drop_table("finetune_images")
    op.drop_table("finetune_members")
    for name in MODEL_INDEXES:
        op.drop_index(f"ix_generator_models_{name}", table_name="generator_models")
    # SQLite (3.35+) drops a column without a constraint or index in place, as PostgreSQL does
    for name, _type in reversed(MODEL_COLUMNS):
        op.drop_column("generator_models", name)
