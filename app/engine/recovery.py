"""Recovery: chunks of active jobs that no worker holds and no message will deliver.

A worker's recovery loop (workers/recovery.py) finds them here and sends them again, then
refills the dispatch window (app/engine/dispatch.py), which also sends what the API could not.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app.config import Settings
from app.db.tables import Job, JobChunk, utcnow
from app.engine.jobs import ACTIVE_STATUS_VALUES, UNFINISHED_CHUNKS, ChunkStatus

PENDING = ChunkStatus.PENDING.value
RUNNING = ChunkStatus.RUNNING.value


@dataclass(frozen=True)
class LostChunk:
    job_id: str
    index: int
    status: str
    dispatched_at: datetime | None
    reason: str


def find_lost_chunks(
    *, session: Session, settings: Settings, kind: str, queue_is_empty: bool, limit: int = 1000
) -> list[LostChunk]:
    """Chunks of active jobs that no worker holds and no message will deliver.

    (Chunks never dispatched are not lost: they wait their turn in the dispatch window, which
    the recovery step refills.)
    - dispatched, not started, and the queue is empty: its message was lost (Redis restarted
      empty, or an embedded broker whose worker was killed);
    - running with a stale heartbeat: its worker died.
    """
    now = utcnow()
    active = select(Job.id).where(Job.status.in_(ACTIVE_STATUS_VALUES), Job.kind == kind)
    found: list[LostChunk] = []

    if queue_is_empty:
        cutoff = now - timedelta(seconds=settings.redispatch_after_s)
        waiting = session.execute(
            select(JobChunk.job_id, JobChunk.index, JobChunk.dispatched_at)
            .where(
                JobChunk.job_id.in_(active),
                JobChunk.status == PENDING,
                JobChunk.dispatched_at < cutoff,
            )
            .limit(limit)
        )
        found += [LostChunk(j, i, PENDING, d, "message lost") for j, i, d in waiting]

    stale = now - timedelta(seconds=settings.stale_after_s)
    dead = session.execute(
        select(JobChunk.job_id, JobChunk.index, JobChunk.dispatched_at)
        .where(
            JobChunk.job_id.in_(active),
            JobChunk.status == RUNNING,
            JobChunk.heartbeat_at < stale,
        )
        .limit(limit)
    )
    found += [LostChunk(j, i, RUNNING, d, "worker died") for j, i, d in dead]
    return found


def requeue_chunk(*, session: Session, settings: Settings, chunk: LostChunk) -> bool:
    """Take a lost chunk back for re-dispatch; False when its state moved on since it was
    found (claimed by a worker, or re-dispatched by another worker's recovery). Not committed:
    the recovery loop commits it, then sends the message."""
    query = update(JobChunk).where(
        JobChunk.job_id == chunk.job_id,
        JobChunk.index == chunk.index,
        JobChunk.status == chunk.status,
    )
    if chunk.dispatched_at is None:
        query = query.where(JobChunk.dispatched_at.is_(None))
    else:
        query = query.where(JobChunk.dispatched_at == chunk.dispatched_at)
    if chunk.status == RUNNING:
        stale = utcnow() - timedelta(seconds=settings.stale_after_s)
        query = query.where(JobChunk.heartbeat_at < stale)
    result = session.execute(
        query.values(
            status=PENDING,
            dispatched_at=utcnow(),
            dispatches=JobChunk.dispatches + 1,
            worker=None,
        )
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def close_abandoned_chunks(*, session: Session, settings: Settings, kind: str) -> int:
    """Chunks left `running` by a dead worker after their job ended (canceled, or failed by
    another chunk): nobody will run or finish them, so they are closed as canceled. Returns how
    many. Not committed: the recovery loop commits."""
    ended = select(Job.id).where(Job.kind == kind, Job.status.not_in(ACTIVE_STATUS_VALUES))
    stale = utcnow() - timedelta(seconds=settings.stale_after_s)
    result = session.execute(
        update(JobChunk)
        .where(
            JobChunk.status == RUNNING,
            JobChunk.heartbeat_at < stale,
            JobChunk.job_id.in_(ended),
        )
        .values(status=ChunkStatus.CANCELED.value, finished_at=utcnow(), worker=None)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def has_active_chunks(*, session: Session, kind: str) -> bool:
    """Whether any active job of `kind` has a chunk that is not finished."""
    active = select(Job.id).where(Job.status.in_(ACTIVE_STATUS_VALUES), Job.kind == kind)
    return (
        session.scalar(
            select(func.count())
            .select_from(JobChunk)
            .where(JobChunk.job_id.in_(active), JobChunk.status.in_(UNFINISHED_CHUNKS))
        )
        or 0
    ) > 0
