"""Signed webhooks (issue 21): a Standard Webhooks signing secret per API key
(`api_keys.webhook_secret`, given to every existing key here), a job's subscription
(`jobs.webhook_url`, `jobs.webhook_events`) and the delivery log (`webhook_deliveries`, one
row per event with its attempts).

On SQLite a NOT NULL column on an existing table and the dropped columns of the downgrade need
a rebuild (batch mode); rebuilding drops `api_keys` and `jobs`, which other tables reference,
so foreign key enforcement is off for the rebuild and checked after it (as in 0006).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 05:30:00.000000
"""

import base64
import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def new_secret() -> str:
    """As app.db.tables.new_webhook_secret (a migration keeps its own copy)."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


@contextmanager
def foreign_keys_off() -> Iterator[None]:
    """On SQLite, no foreign key enforcement while a referenced table is rebuilt."""
    if op.get_bind().dialect.name != "sqlite":
        yield
        return
    context = op.get_context()
    with context.autocommit_block():
        op.execute("PRAGMA foreign_keys=OFF")
    yield
    broken = op.get_bind().exec_driver_sql("PRAGMA foreign_key_check").fetchall()
    if broken:
        raise RuntimeError(f"foreign keys broken by the rebuild: {broken[:5]}")
    with context.autocommit_block():
        op.execute("PRAGMA foreign_keys=ON")


def upgrade() -> None:
    # 1. every key gets a secret of its own, then the column is required
    op.add_column("api_keys", sa.Column("webhook_secret", sa.String(length=100), nullable=True))
    bind = op.get_bind()
    ids = [row[0] for row in bind.execute(sa.text("SELECT id FROM api_keys"))]
    for key_id in ids:
        bind.execute(
            sa.text("UPDATE api_keys SET webhook_secret = :secret WHERE id = :id"),
            {"secret": new_secret(), "id": key_id},
        )
    with foreign_keys_off(), op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.alter_column("webhook_secret", existing_type=sa.String(length=100), nullable=False)

    # 2. a job's subscription (nullable: no rebuild needed)
    op.add_column("jobs", sa.Column("webhook_url", sa.Text(), nullable=True))
    op.add_column("jobs", sa.Column("webhook_events", sa.JSON(), nullable=True))

    # 3. the delivery log
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("owner_id", sa.String(length=36), nullable=False),
        sa.Column("event", sa.String(length=32), nullable=False),
        sa.Column("event_key", sa.String(length=120), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("response_code", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["jobs.id"],
            name=op.f("fk_webhook_deliveries_job_id_jobs"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["owner_id"], ["api_keys.id"], name=op.f("fk_webhook_deliveries_owner_id_api_keys")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_deliveries")),
    )
    op.create_index(
        "ix_webhook_deliveries_job_id_created_at",
        "webhook_deliveries",
        ["job_id", "created_at"],
    )
    op.create_index(
        "ix_webhook_deliveries_status_next_attempt_at",
        "webhook_deliveries",
        ["status", "next_attempt_at"],
    )


def downgrade() -> None:
    op.drop_index("ix_webhook_deliveries_status_next_attempt_at", table_name="webhook_deliveries")
    op.drop_index("ix_webhook_deliveries_job_id_created_at", table_name="webhook_deliveries")
    op.drop_table("webhook_deliveries")
    with foreign_keys_off():
        with op.batch_alter_table("jobs", schema=None) as batch_op:
            batch_op.drop_column("webhook_events")
            batch_op.drop_column("webhook_url")
        with op.batch_alter_table("api_keys", schema=None) as batch_op:
            batch_op.drop_column("webhook_secret")
