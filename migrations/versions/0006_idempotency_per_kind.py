"""Idempotency keys per kind: a key is unique per (owner, kind, key), not per (owner, key), so
a key a generation job used is free for an experiment; and `jobs.request_hash`, the sha256 of
the request a key was first used with (a reuse with another body is refused with a 409).

On SQLite the unique constraint lives in the table's definition, so the table is rebuilt
(batch mode). Rebuilding drops `jobs`, and with foreign keys enforced that drop deletes the
rows that cascade from it (chunks, runs) or fails on images; enforcement is turned off for the
rebuild (outside a transaction: SQLite ignores the pragma inside one) and checked after it.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-08 10:00:00.000000
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD = "uq_jobs_owner_idempotency"
NEW = "uq_jobs_owner_kind_idempotency"


@contextmanager
def foreign_keys_off() -> Iterator[None]:
    """On SQLite, no foreign key enforcement while `jobs` is rebuilt; a no-op elsewhere."""
    if op.get_bind().dialect.name != "sqlite":
        yield
        return
    context = op.get_context()
    with context.autocommit_block():
        op.execute("PRAGMA foreign_keys=OFF")
    yield
    broken = op.get_bind().exec_driver_sql("PRAGMA foreign_key_check").fetchall()
    if broken:
        raise RuntimeError(f"foreign keys broken by the rebuild of jobs: {broken[:5]}")
    with context.autocommit_block():
        op.execute("PRAGMA foreign_keys=ON")


def upgrade() -> None:
    with foreign_keys_off(), op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("request_hash", sa.String(length=64), nullable=True))
        batch_op.drop_constraint(OLD, type_="unique")
        batch_op.create_unique_constraint(NEW, ["owner_id", "kind", "idempotency_key"])


def downgrade() -> None:
    # the older constraint allows one job per (owner, key): later jobs of other kinds that
    # reused a key keep their row and lose their key
    op.execute(
        "UPDATE jobs SET idempotency_key = NULL WHERE idempotency_key IS NOT NULL AND EXISTS "
        "(SELECT 1 FROM jobs AS first WHERE first.owner_id = jobs.owner_id "
        "AND first.idempotency_key = jobs.idempotency_key "
        "AND (first.created_at < jobs.created_at "
        "OR (first.created_at = jobs.created_at AND first.id < jobs.id)))"
    )
    with foreign_keys_off(), op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_constraint(NEW, type_="unique")
        batch_op.create_unique_constraint(OLD, ["owner_id", "idempotency_key"])
        batch_op.drop_column("request_hash")
