"""The worker's side of a chunk: claim it, beat, report steps and progress, finish or retry.

Every function here commits: a worker's progress must be visible to the API and to the
recovery step at once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app.config import Settings
from app.db.tables import Job, JobChunk, utcnow
from app.engine.jobs import UNFINISHED_CHUNKS, ChunkStatus, count_job_images
from app.engine.webhooks import emit_job_events
from app.schemas import ACTIVE_JOB_STATUSES, JobStatus

log = logging.getLogger(__name__)

FINISHED_CHUNKS = (
    ChunkStatus.SUCCEEDED.value,
    ChunkStatus.CANCELED.value,
    ChunkStatus.FAILED.value,
)


@dataclass(frozen=True)
class ChunkClaim:
    """What a worker needs to run one chunk, read in the claiming transaction."""

    job_id: str
    kind: str
    index: int
    start: int
    stop: int
    attempt: int
    dataset_id: str | None
    condition: str | None
    skin_tone: int | None
    strategy: str | None
    model_id: str | None
    seed: int
    params: dict[str, Any]


def lock_job(session: Session, job_id: str) -> Job | None:
    """The job's row, locked for this transaction (FOR NO KEY UPDATE on PostgreSQL; SQLite has
    one writer anyway). Every transaction that changes a job and its chunks takes the job
    first (claim, finish, cancel), so two of them never wait on each other in a cycle: a cancel
    committed while a worker claimed a chunk was a deadlock on PostgreSQL."""
    return session.get(Job, job_id, with_for_update={"key_share": True}, populate_existing=True)


def claim_chunk(
    *, session: Session, settings: Settings, job_id: str, index: int, worker: str
) -> ChunkClaim | None:
    """Mark a chunk running for `worker`; None when it must not run (job over, chunk done,
    or held by another live worker). Commits."""
    job = lock_job(session, job_id)
    chunk = session.get(JobChunk, (job_id, index))
    if job is None or chunk is None:
        log.warning("chunk %s/%s does not exist; dropping its message", job_id, index)
        return None
    if job.status not in ACTIVE_JOB_STATUSES:
        if chunk.status in UNFINISHED_CHUNKS and job.status == JobStatus.CANCELED:
            chunk.status = ChunkStatus.CANCELED.value
        session.commit()
        return None
    if chunk.status in FINISHED_CHUNKS:
        return None
    now = utcnow()
    stale = now - timedelta(seconds=settings.stale_after_s)
    attempts = chunk.attempts
    if chunk.status == ChunkStatus.RUNNING and chunk.heartbeat_at and chunk.heartbeat_at >= stale:
        log.info("chunk %s/%s is held by %s; skipping duplicate", job_id, index, chunk.worker)
        return None
    claimed = session.execute(
        update(JobChunk)
        .execution_options(synchronize_session=False)
        .where(
            JobChunk.job_id == job_id,
            JobChunk.index == index,
            JobChunk.status == chunk.status,
            JobChunk.attempts == attempts,
        )
        .values(
            status=ChunkStatus.RUNNING.value,
            attempts=JobChunk.attempts + 1,
            started_at=now,
            heartbeat_at=now,
            worker=worker,
            error=None,
        )
    )
    if not claimed.rowcount:  # type: ignore[attr-defined]
        session.rollback()
        return None
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.QUEUED.value)
        .values(status=JobStatus.RUNNING.value, started_at=now)
    )
    emit_job_events(session=session, job_id=job_id, settings=settings)  # job.started
    session.commit()
    return ChunkClaim(
        job_id=job.id,
        kind=job.kind,
        index=chunk.index,
        start=chunk.start,
        stop=chunk.stop,
        attempt=attempts + 1,
        dataset_id=job.dataset_id,
        condition=job.condition,
        skin_tone=job.skin_tone,
        strategy=job.strategy,
        model_id=job.model_id,
        seed=job.seed,
        params=dict(job.params or {}),
    )


def record_heartbeat(*, session: Session, job_id: str, index: int, worker: str) -> None:
    """The chunk's worker is alive (while it still holds the chunk). Commits."""
    session.execute(
        update(JobChunk)
        .where(JobChunk.job_id == job_id, JobChunk.index == index, JobChunk.worker == worker)
        .values(heartbeat_at=utcnow())
    )
    session.commit()


def record_step(*, session: Session, job_id: str, index: int, step: int, steps: int) -> None:
    """The sampler's step within the chunk's current batch (and a heartbeat). Commits."""
    session.execute(
        update(JobChunk)
        .where(JobChunk.job_id == job_id, JobChunk.index == index)
        .values(step=step, steps=steps, heartbeat_at=utcnow())
    )
    session.commit()


def job_status(*, session: Session, job_id: str) -> str | None:
    """The job's status as stored now (None for a job that does not exist)."""
    return session.scalar(select(Job.status).where(Job.id == job_id))


def _sum_progress(*, session: Session, job_id: str) -> None:
    """A job's progress is the sum of its chunks' image counts (a rerun never double-counts)."""
    total = (
        select(func.coalesce(func.sum(JobChunk.done), 0))
        .where(JobChunk.job_id == job_id)
        .scalar_subquery()
    )
    session.execute(update(Job).where(Job.id == job_id).values(done=total))


def record_progress(*, session: Session, job_id: str, index: int, done: int) -> None:
    """Set a chunk's image count and the job's total from its chunks. Commits."""
    now = utcnow()
    session.execute(
        update(JobChunk)
        .where(JobChunk.job_id == job_id, JobChunk.index == index)
        .values(done=done, heartbeat_at=now)
    )
    _sum_progress(session=session, job_id=job_id)
    session.commit()


def _settle_when_drained(*, session: Session, job_id: str, active: list[str], now: Any) -> None:
    """No chunk left to run: the job fails if any chunk failed, else succeeds."""
    by_status = dict(
        session.execute(
            select(JobChunk.status, func.count())
            .where(JobChunk.job_id == job_id)
            .group_by(JobChunk.status)
        ).all()
    )
    if any(by_status.get(s) for s in UNFINISHED_CHUNKS):
        return
    failed = by_status.get(ChunkStatus.FAILED.value, 0)
    settled = (
        {
            "status": JobStatus.FAILED.value,
            "error": f"{failed} of {sum(by_status.values())} runs failed",
        }
        if failed
        else {"status": JobStatus.SUCCEEDED.value}
    )
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(active))
        .values(finished_at=now, **settled)
    )


def finish_chunk(
    *,
    session: Session,
    job_id: str,
    index: int,
    status: str,
    done: int | None,
    error: str | None = None,
    fail_fast: bool = True,
) -> str:
    """Close a chunk (succeeded, canceled or failed) and settle its job; returns the job's
    status. `done` None counts the chunk's stored images. With fail_fast a failed chunk fails
    the job at once; without (an experiment's runs), the job settles when no chunk is left and
    fails if any did. Commits."""
    now = utcnow()
    lock_job(session, job_id)
    chunk = session.get(JobChunk, (job_id, index))
    if chunk is None:
        raise LookupError(f"no chunk {job_id}/{index}")
    started = chunk.started_at
    if done is None:
        done = count_job_images(session=session, job_id=job_id, start=chunk.start, stop=chunk.stop)
    duration = (now - started).total_seconds() if started else None
    session.execute(
        update(JobChunk)
        .where(JobChunk.job_id == job_id, JobChunk.index == index)
        .values(
            status=status,
            done=done,
            finished_at=now,
            heartbeat_at=now,
            error=error,
            duration_s=duration,
        )
    )
    _sum_progress(session=session, job_id=job_id)
    active = [s.value for s in ACTIVE_JOB_STATUSES]
    if status == ChunkStatus.FAILED and fail_fast:
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status.in_(active))
            .values(status=JobStatus.FAILED.value, error=error, finished_at=now)
        )
        session.execute(
            update(JobChunk)
            .where(JobChunk.job_id == job_id, JobChunk.status == ChunkStatus.PENDING.value)
            .values(status=ChunkStatus.CANCELED.value, finished_at=now)
        )
    elif status == ChunkStatus.FAILED or not fail_fast:
        _settle_when_drained(session=session, job_id=job_id, active=active, now=now)
    elif status == ChunkStatus.SUCCEEDED:
        unfinished = session.scalar(
            select(func.count())
            .select_from(JobChunk)
            .where(JobChunk.job_id == job_id, JobChunk.status != ChunkStatus.SUCCEEDED.value)
        )
        if not unfinished:
            session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status.in_(active))
                .values(status=JobStatus.SUCCEEDED.value, finished_at=now)
            )
    emit_job_events(session=session, job_id=job_id)  # job.progress, or job.completed if settled
    session.commit()
    return job_status(session=session, job_id=job_id) or "unknown"


def release_for_retry(*, session: Session, job_id: str, index: int, error: str) -> None:
    """Put a failed attempt back to pending, dispatched now (the retry message is on its way).
    Commits."""
    session.execute(
        update(JobChunk)
        .where(JobChunk.job_id == job_id, JobChunk.index == index)
        .values(status=ChunkStatus.PENDING.value, error=error, dispatched_at=utcnow(), worker=None)
    )
    session.commit()
