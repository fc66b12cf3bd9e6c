"""Labels a key uploads belong to that key (issue 21): `condition_owners` (slug, owner_id,
name). A seeded condition (the paper's ten) has no owner and is everyone's; an uploaded label
is seen, validated and prompted with only by the keys that own it, in each one's own words.

The backfill: every condition that is not seeded is owned by the owners of the datasets
holding images of it and by the owners of the jobs naming it, each under the condition's
current name. One with neither (nobody's data uses it) is deleted: left ownerless it would
become everyone's. Downgrade drops the table; the vocabulary is global again.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 05:30:00.000000
"""

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The slugs 0001 seeded (a migration keeps its own copy)
SEEDED = (
    "allergic-contact-dermatitis",
    "basal-cell-carcinoma",
    "folliculitis",
    "lichen-planus",
    "lupus-erythematosus",
    "neutrophilic-dermatoses",
    "photodermatoses",
    "psoriasis",
    "sarcoidosis",
    "squamous-cell-carcinoma",
)

conditions = sa.table("conditions", sa.column("slug", sa.String), sa.column("name", sa.String))
datasets = sa.table("datasets", sa.column("id", sa.String), sa.column("owner_id", sa.String))
images = sa.table("images", sa.column("dataset_id", sa.String), sa.column("condition", sa.String))
jobs = sa.table("jobs", sa.column("owner_id", sa.String), sa.column("condition", sa.String))


def upgrade() -> None:
    owners = op.create_table(
        "condition_owners",
        sa.Column("slug", sa.String(length=120), nullable=False),
        sa.Column("owner_id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["owner_id"], ["api_keys.id"], name=op.f("fk_condition_owners_owner_id_api_keys")
        ),
        sa.ForeignKeyConstraint(
            ["slug"],
            ["conditions.slug"],
            name=op.f("fk_condition_owners_slug_conditions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("slug", "owner_id", name=op.f("pk_condition_owners")),
    )
    with op.batch_alter_table("condition_owners", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_condition_owners_owner_id"), ["owner_id"], unique=False
        )

    # the backfill: who uses each condition that is not seeded
    bind = op.get_bind()
    uses = sa.union(
        sa.select(images.c.condition.label("slug"), datasets.c.owner_id).join(
            datasets, datasets.c.id == images.c.dataset_id
        ),
        sa.select(jobs.c.condition.label("slug"), jobs.c.owner_id).where(
            jobs.c.condition.is_not(None)
        ),
    ).subquery()
    rows = bind.execute(
        sa.select(conditions.c.slug, uses.c.owner_id, conditions.c.name)
        .join(uses, uses.c.slug == conditions.c.slug)
        .where(conditions.c.slug.not_in(SEEDED))
    ).all()
    now = datetime.now(UTC)
    if rows:
        op.bulk_insert(
            owners,
            [{"slug": s, "owner_id": o, "name": n, "created_at": now} for s, o, n in rows],
        )
    owned = {slug for slug, _, _ in rows}
    unused = [
        slug
        for slug in bind.execute(sa.select(conditions.c.slug)).scalars()
        if slug not in SEEDED and slug not in owned
    ]
    if unused:
        bind.execute(conditions.delete().where(conditions.c.slug.in_(unused)))


def downgrade() -> None:
    with op.batch_alter_table("condition_owners", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_condition_owners_owner_id"))
    op.drop_table("condition_owners")
