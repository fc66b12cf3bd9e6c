"""Generation jobs and their chunks: every query on `jobs` and `job_chunks` lives here.

The database is the source of truth; the broker only delivers. A job is committed with its
chunks before any task is sent; workers claim chunks here, report progress here, and the
recovery step finds chunks whose messages were lost and sends them again.
"""

from __future__ import annotations

import logging
import random
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, func, insert, select, update
from sqlalchemy.orm import Session

from app.config import Settings
from app.datasets import count_job_images, parent_candidates
from app.db.paging import newest_first
from app.db.tables import ApiKey, Dataset, Job, JobChunk, JobParent, utcnow
from app.errors import Conflict, InvalidField, NotFound
from app.ids import new_id
from app.schemas import ACTIVE_JOB_STATUSES, JobCreate, JobStatus, Strategy
from app.vocabulary import get_condition, get_model

log = logging.getLogger(__name__)

ACTIVE_STATUS_VALUES = tuple(s.value for s in ACTIVE_JOB_STATUSES)
# Strategies that edit a real parent image, and those that need an inpainting pipeline.
EDIT_STRATEGIES = (Strategy.INPAINT, Strategy.INPAINT_OUTPAINT, Strategy.IMAGE_TO_IMAGE)
INPAINT_STRATEGIES = (Strategy.INPAINT, Strategy.INPAINT_OUTPAINT)
# A chunk created this recently with no dispatch is left to the API that is sending it.
DISPATCH_GRACE_S = 5.0
MAX_COUNT = 1_000_000


def _job_params(params: JobCreate) -> dict[str, Any]:
    keys = (
        "guidance_scale",
        "num_inference_steps",
        "strength",
        "width",
        "height",
        "mask_fraction",
        "outpaint_strength",
        "frame_px",
        "source_dataset",
    )
    out: dict[str, Any] = {k: getattr(params, k) for k in keys if getattr(params, k) is not None}
    if params.negative_prompt:
        out["negative_prompt"] = params.negative_prompt
    out["synthetic_per_real"] = params.synthetic_per_real
    return out


def _check_model(*, session: Session, settings: Settings, params: JobCreate) -> str:
    """The generator the job uses, checked against its strategy."""
    inpaint = params.strategy in INPAINT_STRATEGIES
    model_id = params.model or (
        settings.default_inpaint_model if inpaint else settings.default_model
    )
    model = get_model(session=session, model_id=model_id)
    if model is None:
        raise InvalidField(
            f"model: unknown model {model_id!r} (GET /models lists them)", field="model"
        )
    is_inpaint_model = "Inpaint" in model.pipeline_class
    if inpaint and not is_inpaint_model:
        raise InvalidField(
            f"model: strategy {params.strategy.value} needs an inpainting pipeline; "
            f"{model_id} is a {model.pipeline_class}",
            field="model",
        )
    if not inpaint and is_inpaint_model:
        raise InvalidField(
            f"model: strategy {params.strategy.value} needs a text-to-image pipeline; "
            f"{model_id} is a {model.pipeline_class}",
            field="model",
        )
    return model_id


def _select_parents(
    *, session: Session, params: JobCreate, owner: ApiKey, seed: int
) -> tuple[list[str], int]:
    """The parent images (in the order the job uses them) and the job's image count.

    Parents are the source dataset's images of the job's condition (and skin tone when set),
    in a seeded shuffle; image i derives from parent i // k (PAPER.md section 4)."""
    k = params.synthetic_per_real
    if params.source_dataset is None:
        if params.strategy in EDIT_STRATEGIES:
            raise InvalidField(
                f"source_dataset: strategy {params.strategy.value} edits real images; "
                "name the real dataset to take them from",
                field="source_dataset",
            )
        if params.count is None:
            raise InvalidField("count: required (1..1,000,000)", field="count")
        return [], params.count
    source = session.get(Dataset, params.source_dataset)
    if source is None or source.owner_id != owner.id:
        raise InvalidField(
            f"source_dataset: no dataset {params.source_dataset!r}", field="source_dataset"
        )
    if source.kind != "real":
        raise InvalidField("source_dataset: must be a real dataset", field="source_dataset")
    candidates = parent_candidates(
        session=session,
        dataset_id=source.id,
        condition=params.condition,
        skin_tone=params.skin_tone,
    )
    tone = f" on skin type {params.skin_tone}" if params.skin_tone else ""
    if not candidates:
        raise InvalidField(
            f"source_dataset: no {params.condition} images{tone} in dataset {source.id}",
            field="source_dataset",
        )
    random.Random(seed).shuffle(candidates)
    count = params.count if params.count is not None else len(candidates) * k
    if count > len(candidates) * k:
        raise InvalidField(
            f"count: {count} images at synthetic_per_real={k} need {-(-count // k)} parents; "
            f"the source has {len(candidates)} {params.condition} images{tone}",
            field="count",
        )
    if count > MAX_COUNT:
        raise InvalidField(
            f"count: {len(candidates)} parents x {k} is {count} images, more than "
            f"{MAX_COUNT:,}; give a smaller count",
            field="count",
        )
    return candidates[: -(-count // k)], count


def job_with_key(*, session: Session, owner: ApiKey, key: str | None) -> Job | None:
    """The caller's job made with this idempotency key, if any."""
    if not key:
        return None
    return session.scalar(select(Job).where(Job.owner_id == owner.id, Job.idempotency_key == key))


def create_job(
    *, session: Session, settings: Settings, params: JobCreate, owner: ApiKey
) -> tuple[Job, bool]:
    """Validate and insert a job, its dataset, its parents and its chunks; (job, created).
    Not committed."""
    # 1. idempotency: the same key returns the job it made before
    existing = job_with_key(session=session, owner=owner, key=params.idempotency_key)
    if existing is not None:
        return existing, False

    # 2. vocabulary, model, parents
    if get_condition(session=session, slug=params.condition) is None:
        raise InvalidField(
            f"condition: unknown condition {params.condition!r} (GET /conditions lists them)",
            field="condition",
        )
    model_id = _check_model(session=session, settings=settings, params=params)
    seed = params.seed if params.seed is not None else secrets.randbits(62)
    parents, count = _select_parents(session=session, params=params, owner=owner, seed=seed)

    # 3. the synthetic dataset the images go to
    if params.dataset_id is not None:
        dataset = session.get(Dataset, params.dataset_id)
        if dataset is None or dataset.owner_id != owner.id:
            raise InvalidField(f"dataset_id: no dataset {params.dataset_id!r}", field="dataset_id")
        if dataset.kind != "synthetic":
            raise InvalidField("dataset_id: must be a synthetic dataset", field="dataset_id")
    else:
        tone = f"fst{params.skin_tone}" if params.skin_tone else "fst-any"
        dataset = Dataset(
            id=new_id(),
            owner_id=owner.id,
            name=params.dataset_name or f"{params.condition}-{tone}-{params.strategy.value}",
            kind="synthetic",
        )
        session.add(dataset)

    # 4. the job and its chunks
    chunk_size = settings.chunk_size
    job = Job(
        id=new_id(),
        owner_id=owner.id,
        dataset_id=dataset.id,
        status=JobStatus.QUEUED.value,
        condition=params.condition,
        skin_tone=params.skin_tone,
        strategy=params.strategy.value,
        model_id=model_id,
        count=count,
        seed=seed,
        chunk_size=chunk_size,
        params=_job_params(params),
        done=0,
        idempotency_key=params.idempotency_key,
        created_at=utcnow(),
    )
    session.add(job)
    session.flush()
    chunks = [
        {
            "job_id": job.id,
            "index": i,
            "start": start,
            "stop": min(start + chunk_size, count),
            "status": "pending",
            "done": 0,
            "attempts": 0,
            "dispatches": 0,
        }
        for i, start in enumerate(range(0, count, chunk_size))
    ]
    session.execute(insert(JobChunk), chunks)
    if parents:
        session.execute(
            insert(JobParent),
            [{"job_id": job.id, "position": p, "image_id": i} for p, i in enumerate(parents)],
        )
    return job, True


def create_single_chunk_job(
    *,
    session: Session,
    owner: ApiKey,
    kind: str,
    dataset_id: str,
    count: int,
    params: dict[str, Any],
) -> Job:
    """A job of one chunk (an ingest or an export): the job row and its chunk. Not committed."""
    job = Job(
        id=new_id(),
        owner_id=owner.id,
        dataset_id=dataset_id,
        kind=kind,
        status=JobStatus.QUEUED.value,
        count=count,
        seed=0,
        chunk_size=max(count, 1),
        params=params,
        done=0,
        created_at=utcnow(),
    )
    session.add(job)
    session.flush()
    session.add(
        JobChunk(job_id=job.id, index=0, start=0, stop=max(count, 1), status="pending", done=0,
                 attempts=0, dispatches=0)
    )  # fmt: skip
    return job


def set_job_count(*, session: Session, job_id: str, count: int) -> None:
    """An ingest learns its row count once it has read the CSV. Commits."""
    session.execute(update(Job).where(Job.id == job_id).values(count=count))
    session.commit()


def set_job_result(*, session: Session, job_id: str, result: dict[str, Any]) -> None:
    session.execute(update(Job).where(Job.id == job_id).values(result=result))
    session.commit()


def detach_dataset(*, session: Session, job_id: str) -> None:
    """A failed ingest keeps nothing: the job forgets the dataset it was filling."""
    session.execute(update(Job).where(Job.id == job_id).values(dataset_id=None))


def chunk_count(job: Job) -> int:
    if job.kind not in ("generate", "experiment"):
        return 1
    return -(-job.count // job.chunk_size)


def get_job(*, session: Session, job_id: str, owner: ApiKey) -> Job:
    """The caller's job; NotFound for a missing job or another key's."""
    job = session.get(Job, job_id)
    if job is None or job.owner_id != owner.id:
        raise NotFound(f"no job {job_id!r}")
    return job


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
    """The job's chunks being sampled now, with their step."""
    return list(
        session.scalars(
            select(JobChunk)
            .where(JobChunk.job_id == job_id, JobChunk.status == "running")
            .order_by(JobChunk.index)
        )
    )


def cancel_job(*, session: Session, job_id: str, owner: ApiKey) -> Job:
    """Cancel a queued or running job: pending chunks never run, a running one stops at its
    next batch. Images already written stay."""
    job = get_job(session=session, job_id=job_id, owner=owner)
    if job.status not in ACTIVE_JOB_STATUSES:
        raise Conflict(f"job {job.id} is already {job.status}; only queued or running jobs cancel")
    now = utcnow()
    job.status = JobStatus.CANCELED.value
    job.canceled_at = now
    job.finished_at = now
    session.execute(
        update(JobChunk)
        .where(JobChunk.job_id == job.id, JobChunk.status == "pending")
        .values(status="canceled", finished_at=now)
    )
    return job


# --- dispatch and recovery ---------------------------------------------------------------


def undispatched_chunks(*, session: Session, job_id: str) -> list[int]:
    return list(
        session.scalars(
            select(JobChunk.index).where(
                JobChunk.job_id == job_id,
                JobChunk.status == "pending",
                JobChunk.dispatched_at.is_(None),
            )
        )
    )


def dispatch_job(
    *,
    session_factory: Callable[[], Session],
    job_id: str,
    send: Callable[[str, int], None],
    mark_every: int = 200,
) -> int:
    """Send every undispatched chunk of a committed job; returns how many were sent.

    Chunks are marked only after their messages are accepted, so a broker failure leaves the
    rest for the recovery step instead of losing them."""
    with session_factory() as session:
        indices = undispatched_chunks(session=session, job_id=job_id)
    sent: list[int] = []

    def mark() -> None:
        if not sent:
            return
        with session_factory() as session, session.begin():
            session.execute(
                update(JobChunk)
                .where(
                    JobChunk.job_id == job_id,
                    JobChunk.index.in_(sent),
                    JobChunk.dispatched_at.is_(None),
                )
                .values(dispatched_at=utcnow(), dispatches=JobChunk.dispatches + 1)
            )
        sent.clear()

    total = 0
    try:
        for index in indices:
            send(job_id, index)
            sent.append(index)
            total += 1
            if len(sent) >= mark_every:
                mark()
                with session_factory() as session:
                    if job_status(session=session, job_id=job_id) not in ACTIVE_STATUS_VALUES:
                        break  # canceled or failed while its chunks were being sent
    finally:
        mark()
    return total


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

    - never dispatched (the API died, or the broker refused) past a short grace;
    - dispatched, not started, and the queue is empty: its message was lost (Redis restarted
      empty, or an embedded broker whose worker was killed);
    - running with a stale heartbeat: its worker died.
    """
    now = utcnow()
    grace = now - timedelta(seconds=DISPATCH_GRACE_S)
    active = select(Job.id).where(Job.status.in_(ACTIVE_STATUS_VALUES), Job.kind == kind)
    found: list[LostChunk] = []

    never = session.execute(
        select(JobChunk.job_id, JobChunk.index)
        .join(Job, Job.id == JobChunk.job_id)
        .where(
            JobChunk.job_id.in_(active),
            JobChunk.status == "pending",
            JobChunk.dispatched_at.is_(None),
            Job.created_at < grace,
        )
        .limit(limit)
    )
    found += [LostChunk(j, i, "pending", None, "never dispatched") for j, i in never]

    if queue_is_empty:
        cutoff = now - timedelta(seconds=settings.redispatch_after_s)
        waiting = session.execute(
            select(JobChunk.job_id, JobChunk.index, JobChunk.dispatched_at)
            .where(
                JobChunk.job_id.in_(active),
                JobChunk.status == "pending",
                JobChunk.dispatched_at < cutoff,
            )
            .limit(limit)
        )
        found += [LostChunk(j, i, "pending", d, "message lost") for j, i, d in waiting]

    stale = now - timedelta(seconds=settings.stale_after_s)
    dead = session.execute(
        select(JobChunk.job_id, JobChunk.index, JobChunk.dispatched_at)
        .where(
            JobChunk.job_id.in_(active),
            JobChunk.status == "running",
            JobChunk.heartbeat_at < stale,
        )
        .limit(limit)
    )
    found += [LostChunk(j, i, "running", d, "worker died") for j, i, d in dead]
    return found


def requeue_chunk(*, session: Session, settings: Settings, chunk: LostChunk) -> bool:
    """Take a lost chunk back for re-dispatch; False when its state moved on since it was
    found (claimed by a worker, or re-dispatched by another worker's recovery)."""
    query = update(JobChunk).where(
        JobChunk.job_id == chunk.job_id,
        JobChunk.index == chunk.index,
        JobChunk.status == chunk.status,
    )
    if chunk.dispatched_at is None:
        query = query.where(JobChunk.dispatched_at.is_(None))
    else:
        query = query.where(JobChunk.dispatched_at == chunk.dispatched_at)
    if chunk.status == "running":
        stale = utcnow() - timedelta(seconds=settings.stale_after_s)
        query = query.where(JobChunk.heartbeat_at < stale)
    result = session.execute(
        query.values(
            status="pending",
            dispatched_at=utcnow(),
            dispatches=JobChunk.dispatches + 1,
            worker=None,
        )
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def has_active_chunks(*, session: Session, kind: str) -> bool:
    """Whether any active job of `kind` has a chunk that is not finished."""
    active = select(Job.id).where(Job.status.in_(ACTIVE_STATUS_VALUES), Job.kind == kind)
    return (
        session.scalar(
            select(func.count())
            .select_from(JobChunk)
            .where(JobChunk.job_id.in_(active), JobChunk.status.in_(("pending", "running")))
        )
        or 0
    ) > 0


# --- the worker's side --------------------------------------------------------------------


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


def claim_chunk(
    *, session: Session, settings: Settings, job_id: str, index: int, worker: str
) -> ChunkClaim | None:
    """Mark a chunk running for `worker`; None when it must not run (job over, chunk done,
    or held by another live worker). Commits."""
    job = session.get(Job, job_id)
    chunk = session.get(JobChunk, (job_id, index))
    if job is None or chunk is None:
        log.warning("chunk %s/%s does not exist; dropping its message", job_id, index)
        return None
    if job.status not in ACTIVE_JOB_STATUSES:
        if chunk.status in ("pending", "running"):
            chunk.status = "canceled" if job.status == JobStatus.CANCELED else chunk.status
        session.commit()
        return None
    if chunk.status in ("succeeded", "canceled", "failed"):
        return None
    now = utcnow()
    stale = now - timedelta(seconds=settings.stale_after_s)
    attempts = chunk.attempts
    if chunk.status == "running" and chunk.heartbeat_at and chunk.heartbeat_at >= stale:
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
            status="running",
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


def heartbeat(*, session: Session, job_id: str, index: int, worker: str) -> None:
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
    if status == "failed" and fail_fast:
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status.in_(active))
            .values(status=JobStatus.FAILED.value, error=error, finished_at=now)
        )
        session.execute(
            update(JobChunk)
            .where(JobChunk.job_id == job_id, JobChunk.status == "pending")
            .values(status="canceled", finished_at=now)
        )
    elif status == "failed" or not fail_fast:
        by_status = dict(
            session.execute(
                select(JobChunk.status, func.count())
                .where(JobChunk.job_id == job_id)
                .group_by(JobChunk.status)
            ).all()
        )
        if not by_status.get("pending") and not by_status.get("running"):
            failed = by_status.get("failed", 0)
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
    elif status == "succeeded":
        unfinished = session.scalar(
            select(func.count())
            .select_from(JobChunk)
            .where(JobChunk.job_id == job_id, JobChunk.status != "succeeded")
        )
        if not unfinished:
            session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status.in_(active))
                .values(status=JobStatus.SUCCEEDED.value, finished_at=now)
            )
    session.commit()
    return job_status(session=session, job_id=job_id) or "unknown"


def release_for_retry(*, session: Session, job_id: str, index: int, error: str) -> None:
    """Put a failed attempt back to pending, dispatched now (the retry message is on its way)."""
    session.execute(
        update(JobChunk)
        .where(JobChunk.job_id == job_id, JobChunk.index == index)
        .values(status="pending", error=error, dispatched_at=utcnow(), worker=None)
    )
    session.commit()


# --- metrics ------------------------------------------------------------------------------


def jobs_by_status(*, session: Session) -> dict[str, int]:
    rows = session.execute(select(Job.status, func.count()).group_by(Job.status))
    counts = {s.value: 0 for s in JobStatus}
    counts.update({status: n for status, n in rows})
    return counts


def chunk_durations(*, session: Session, buckets: list[float]) -> tuple[list[int], float, int]:
    """Cumulative bucket counts, sum and count of succeeded chunks' durations (seconds)."""
    duration = JobChunk.duration_s
    columns = [func.count(case((duration <= bound, 1))) for bound in buckets]
    row = session.execute(
        select(func.count(duration), func.coalesce(func.sum(duration), 0.0), *columns).where(
            JobChunk.status == "succeeded", duration.is_not(None)
        )
    ).one()
    return [int(c) for c in row[2:]], float(row[1] or 0.0), int(row[0])
