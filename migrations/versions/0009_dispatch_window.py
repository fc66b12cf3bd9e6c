"""Indexes for the dispatch window and for paging: a job's next chunk to send and the chunks in
flight (partial indexes, so a million-image job's finished chunks are never read to find
them), and (owner, created_at, id) on jobs and datasets for GET /jobs and GET /datasets.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 06:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UNDISPATCHED = "status = 'pending' AND dispatched_at IS NULL"
IN_FLIGHT = "status = 'running' OR (status = 'pending' AND dispatched_at IS NOT NULL)"


def upgrade() -> None:
    op.create_index(
        "ix_job_chunks_undispatched",
        "job_chunks",
        ["job_id", "index"],
        postgresql_where=sa.text(UNDISPATCHED),
        sqlite_where=sa.text(UNDISPATCHED),
    )
    op.create_index(
        "ix_job_chunks_in_flight",
        "job_chunks",
        ["job_id"],
        postgresql_where=sa.text(IN_FLIGHT),
        sqlite_where=sa.text(IN_FLIGHT),
    )
    op.create_index("ix_jobs_owner_created", "jobs", ["owner_id", "created_at", "id"])
    op.create_index("ix_datasets_owner_created", "datasets", ["owner_id", "created_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_datasets_owner_created", table_name="datasets")
    op.drop_index("ix_jobs_owner_created", table_name="jobs")
    op.drop_index("ix_job_chunks_in_flight", table_name="job_chunks")
    op.drop_index("ix_job_chunks_undispatched", table_name="job_chunks")
