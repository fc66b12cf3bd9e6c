"""Condition names in words: a label ingested as an identifier ('acne-vulgaris') became a
condition named 'acne-vulgaris', and the prompt said "An image of acne-vulgaris". Names with
no space are rewritten as app.vocabulary.condition_name now writes them ('acne vulgaris').

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 11:00:00.000000
"""

import re
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def words(name: str) -> str:
    """app.vocabulary.condition_name as of this revision (a migration keeps its own copy)."""
    name = " ".join(name.strip().lower().split())
    return name if " " in name else " ".join(re.split(r"[-_]+", name)).strip()


conditions = sa.table("conditions", sa.column("slug", sa.String), sa.column("name", sa.String))


def upgrade() -> None:
    bind = op.get_bind()
    rows = bind.execute(sa.select(conditions.c.slug, conditions.c.name)).all()
    for slug, name in rows:
        if name != words(name):
            bind.execute(
                conditions.update().where(conditions.c.slug == slug).values(name=words(name))
            )


def downgrade() -> None:
    """Nothing to undo: the old names were the same words with hyphens."""
