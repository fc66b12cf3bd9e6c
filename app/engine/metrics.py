"""The engine's Prometheus figures, read from the database (shared by every process).

Every figure is labelled by job kind: a training run and a generation chunk are not one
population.
"""

from __future__ import annotations

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from app.broker import JOB_TASKS
from app.db.tables import Job, JobChunk
from app.engine.jobs import ChunkStatus
from app.schemas import JobStatus

JOB_KINDS = tuple(JOB_TASKS)  # every kind the broker routes


def jobs_by_kind_and_status(*, session: Session) -> dict[tuple[str, str], int]:
    """(kind, status) -> number of jobs; every known pair present, zeros included."""
    rows = session.execute(
        select(Job.kind, Job.status, func.count()).group_by(Job.kind, Job.status)
    )
    stored = [s for s in JobStatus if s is not JobStatus.CANCELING]  # canceling is only shown
    counts = {(kind, s.value): 0 for kind in JOB_KINDS for s in stored}
    counts.update({(kind, status): n for kind, status, n in rows})
    return counts


def chunk_durations(
    *, session: Session, buckets: list[float]
) -> dict[str, tuple[list[int], float, int]]:
    """kind -> (cumulative bucket counts, sum, count) of succeeded chunks' durations (s)."""
    duration = JobChunk.duration_s
    columns = [func.count(case((duration <= bound, 1))) for bound in buckets]
    rows = session.execute(
        select(Job.kind, func.count(duration), func.coalesce(func.sum(duration), 0.0), *columns)
        .join(Job, Job.id == JobChunk.job_id)
        .where(JobChunk.status == ChunkStatus.SUCCEEDED.value, duration.is_not(None))
        .group_by(Job.kind)
    )
    out = {kind: ([0] * len(buckets), 0.0, 0) for kind in JOB_KINDS}
    for kind, n, total, *counts in rows:
        out[kind] = ([int(c) for c in counts], float(total or 0.0), int(n))
    return out
