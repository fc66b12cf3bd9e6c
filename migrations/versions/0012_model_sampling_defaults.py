"""A generator's own sampler defaults (issue 24): `generator_models.sampling_defaults`, the
knobs a job on that model takes when it leaves them unset (read from the model folder's
synthderm.json when the model is registered).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07 18:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("generator_models", schema=None) as batch_op:
        batch_op.add_column(sa.Column("sampling_defaults", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("generator_models", schema=None) as batch_op:
        batch_op.drop_column("sampling_defaults")
