"""Job and chunk rows: insert (one function for every kind), look up, list, cancel, settle.

None of these commit: a service calls them inside its unit of work and the request commits.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from enum import StrEnum
from typing import Any, cast

from sqlalchemy import Table, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, make_transient_to_detached

from app.db.owned import get_owned
from app.db.paging import newest_first
from app.db.tables import ApiKey, Image, Job, JobChunk, utcnow
from app.errors import Conflict
from app.ids import new_id
from app.schemas import ACTIVE_JOB_STATUSES, JobStatus, Timings

ACTIVE_STATUS_VALUES = tuple(s.value for s in ACTIVE_JOB_STATUSES)
# Kinds whose count is split into chunks of chunk_size; every other kind is one chunk.
CHUNKED_KINDS = ("generate", "experiment", "finetune")


class ChunkStatus(StrEnum):
    """A chunk's state; a job's (JobStatus) is settled from its chunks'."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


UNFINISHED_CHUNKS = (ChunkStatus.PENDING.value, ChunkStatus.RUNNING.value)


class KeyRace(Exception):
    """`insert_job` lost a race: a concurrent request with the same idempotency key (and the
    same request) committed `job` first. The session was rolled back: the caller's unit of
    work is void and the request answers with `job` (200)."""

    def __init__(self, job: Job) -> None:
        super().__init__(f"job {job.id} was made first with this idempotency key")
        self.job = job


def request_hash(endpoint: str, body: dict[str, Any]) -> str:
    """sha256 of a request (its endpoint and JSON body, less the idempotency key): what a
    reused key must match."""
    canonical = json.dumps([endpoint, body], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def insert_job(
    *,
    session: Session,
    owner: ApiKey,
    kind: str,
    count: int,
    chunk_size: int,
    params: dict[str, Any],
    dataset_id: str | None = None,
    seed: int = 0,
    idempotency_key: str | None = None,
    request_hash: str | None = None,
    condition: str | None = None,
    skin_tone: int | None = None,
    strategy: str | None = None,
    model_id: str | None = None,
    created_at: datetime | None = None,
    webhook: str | None = None,
    webhook_events: list[str] | None = None,
) -> Job:
    """A queued job of `kind` and its chunks: [start, stop) ranges of `chunk_size` over
    max(count, 1) images (or runs, or rows). Flushed, not committed.

    With an idempotency key another request may insert the same (owner, kind, key) at once:
    the database lets one win, and the loser's whole session is rolled back and KeyRace
    carries the winner's job (Conflict if the winner was made by a different request).
    `webhook` and `webhook_events` come from `engine.subscription` (the URL checked)."""
    owner_id = owner.id
    values: dict[str, Any] = {
        "id": new_id(), "owner_id": owner_id, "dataset_id": dataset_id, "kind": kind,
        "status": JobStatus.QUEUED.value, "condition": condition, "skin_tone": skin_tone,
        "strategy": strategy, "model_id": model_id, "count": count, "seed": seed,
        "chunk_size": chunk_size, "params": params, "done": 0, "error": None, "result": None,
        "idempotency_key": idempotency_key, "request_hash": request_hash, "webhook_url": webhook,
        "webhook_events": webhook_events, "created_at": created_at or utcnow(),
        "started_at": None, "finished_at": None, "canceled_at": None,
    }  # fmt: skip
    # Core inserts (compiled once) rather than the ORM's unit of work: POST /jobs makes one job
    # per request, and the flush was a tenth of its time
    session.flush()  # rows the caller added (its dataset) go first; nothing to do when none
    try:
        session.execute(_INSERT_JOB, values)
    except IntegrityError:
        if idempotency_key is None:
            raise
        # PostgreSQL raises once the winner commits; SQLite's writer waits for the write lock
        # (busy timeout) and then sees the winner's row. Either way the winner is committed.
        session.rollback()
        winner = job_for_request(session=session, owner_id=owner_id, kind=kind,
                                 key=idempotency_key, request_hash=request_hash)  # fmt: skip
        if winner is None:  # another constraint failed
            raise
        raise KeyRace(winner) from None
    total = max(count, 1)
    session.execute(
        _INSERT_CHUNK,
        [
            {"job_id": values["id"], "index": i, "start": start,
             "stop": min(start + chunk_size, total), "status": ChunkStatus.PENDING.value,
             "done": 0, "attempts": 0, "dispatches": 0}
            for i, start in enumerate(range(0, total, chunk_size))
        ],
    )  # fmt: skip
    # the row as stored, in the session as if it had been loaded (every column is set, so
    # reading one never asks the database; changing one is an UPDATE at the next flush)
    job = Job(**values)
    make_transient_to_detached(job)
    session.add(job)
    return job


_INSERT_JOB = insert(cast(Table, Job.__table__))
_INSERT_CHUNK = insert(cast(Table, JobChunk.__table__))


def job_for_request(
    *, session: Session, owner_id: str, kind: str, key: str | None, request_hash: str | None
) -> Job | None:
    """The job of `kind` this idempotency key already made, when it was made by the same
    request (its `request_hash`); None for a new key; Conflict when the key was used for a
    different request (Stripe's rule: a key names one request, never a second one)."""
    if not key:
        return None
    job = session.scalar(
        select(Job).where(Job.owner_id == owner_id, Job.kind == kind, Job.idempotency_key == key)
    )
    if job is None:
        return None
    # a job from before request hashes were kept (NULL) is taken as the same request
    if request_hash is not None and job.request_hash not in (None, request_hash):
        raise Conflict(
            f"idempotency_key: the key {key!r} was already used for a different request "
            f"(it made {kind} job {job.id}); send the same request to get that job back, or "
            "use a new key for a new request",
            field="idempotency_key",
        )
    return job


def set_job_count(*, session: Session, job_id: str, count: int) -> None:
    """An ingest learns its row count once it has read the CSV. Commits."""
    session.execute(update(Job).where(Job.id == job_id).values(count=count))
    session.commit()


def set_job_result(*, session: Session, job_id: str, result: dict[str, Any] | None) -> None:
    """Record what a job made (None: nothing kept). Commits."""
    session.execute(update(Job).where(Job.id == job_id).values(result=result))
    session.commit()


def detach_dataset(*, session: Session, job_id: str) -> None:
    """A failed ingest keeps nothing: the job forgets the dataset it was filling."""
    session.execute(update(Job).where(Job.id == job_id).values(dataset_id=None))


def chunk_count(job: Job) -> int:
    """How many chunks a job has (from its row, without reading them)."""
    if job.kind not in CHUNKED_KINDS:
        return 1
    return -(-job.count // job.chunk_size)


def job_timings(job: Job) -> Timings:
    """When a job (of any kind) was made, started, ended; its time queued and running."""
    queued_s = running_s = None
    if job.started_at is not None:
        queued_s = (job.started_at - job.created_at).total_seconds()
        running_s = ((job.finished_at or utcnow()) - job.started_at).total_seconds()
    return Timings(
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        canceled_at=job.canceled_at,
        queued_s=queued_s,
        running_s=running_s,
    )


def count_job_images(*, session: Session, job_id: str, start: int, stop: int) -> int:
    """Rows written for images [start, stop) of a job."""
    return int(
        session.scalar(
            select(func.count())
            .select_from(Image)
            .where(Image.job_id == job_id, Image.index >= start, Image.index < stop)
        )
        or 0
    )


def get_job(*, session: Session, job_id: str, owner: ApiKey) -> Job:
    """The caller's job; NotFound for a missing job or another key's."""
    return get_owned(session=session, table=Job, row_id=job_id, owner_id=owner.id, what="job")


def list_jobs(
    *,
    session: Session,
    owner: ApiKey,
    status: JobStatus | None,
    limit: int,
    cursor: str | None,
    kind: str | None = None,
) -> tuple[list[Job], str | None]:
    """The caller's jobs (of one kind when given), newest first, keyset-paged on
    (created_at, id)."""
    query = select(Job).where(Job.owner_id == owner.id)
    if kind is not None:
        query = query.where(Job.kind == kind)
    if status is not None:
        query = query.where(Job.status == status.value)
    return newest_first(
        session=session, query=query, table=Job, owner_id=owner.id, limit=limit, cursor=cursor
    )


def running_chunks(*, session: Session, job_id: str) -> list[JobChunk]:
    """The job's chunks being worked on now, with their step."""
    return list(
        session.scalars(
            select(JobChunk)
            .where(JobChunk.job_id == job_id, JobChunk.status == ChunkStatus.RUNNING.value)
            .order_by(JobChunk.index)
        )
    )


def jobs_with_running_chunks(
    *, session: Session, job_ids: list[str], heartbeat_since: datetime
) -> set[str]:
    """Which of these jobs have a chunk running with a heartbeat since `heartbeat_since` (a
    canceled one among them is still finishing its batch; a dead worker's chunk is not)."""
    if not job_ids:
        return set()
    return set(
        session.scalars(
            select(JobChunk.job_id)
            .where(
                JobChunk.job_id.in_(job_ids),
                JobChunk.status == ChunkStatus.RUNNING.value,
                JobChunk.heartbeat_at >= heartbeat_since,
            )
            .distinct()
        )
    )


def cancel_job(*, session: Session, job_id: str, owner: ApiKey) -> Job:
    """Cancel a queued or running job: pending chunks never run; a running chunk is told at
    its next sampler step, and the images of its batch already sampled are still
    written and counted (so `done` may grow a little after the cancel: the API shows the job
    `canceling` until no chunk runs; `running_chunks` says which). What was written stays."""
    job = get_job(session=session, job_id=job_id, owner=owner)
    # the job's row first, as a claim or a finish takes it (app.engine.claims.lock_job)
    session.refresh(job, with_for_update={"key_share": True})
    if job.status not in ACTIVE_JOB_STATUSES:
        raise Conflict(f"job {job.id} is already {job.status}; only queued or running jobs cancel")
    now = utcnow()
    job.status = JobStatus.CANCELED.value
    job.canceled_at = now
    job.finished_at = now
    session.execute(
        update(JobChunk)
        .where(JobChunk.job_id == job.id, JobChunk.status == ChunkStatus.PENDING.value)
        .values(status=ChunkStatus.CANCELED.value, finished_at=now)
    )
    return job
