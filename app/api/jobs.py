"""/jobs: submit, list, inspect and cancel generation jobs."""

from __future__ import annotations

import contextlib
import logging
from datetime import UTC, datetime
from functools import partial

from fastapi import APIRouter, BackgroundTasks, Query, Response, status

from app import jobs as service
from app import runs
from app.api.deps import CallerDep, SessionDep, SettingsDep, StoreDep
from app.broker import send_chunk
from app.config import Settings
from app.db.session import session_factory
from app.db.tables import Job, JobChunk
from app.ingest import discard_upload
from app.schemas import (
    ChunkStep,
    JobCreate,
    JobList,
    JobOut,
    JobStatus,
    Progress,
    Strategy,
    Timings,
)
from app.storage import upload_key

log = logging.getLogger(__name__)
router = APIRouter(prefix="/jobs", tags=["jobs"])


def job_out(job: Job, running: list[JobChunk] | None = None) -> JobOut:
    """The public view of a job row (with its running chunks' steps when given)."""
    now = datetime.now(UTC)
    queued_s = running_s = None
    if job.started_at is not None:
        queued_s = (job.started_at - job.created_at).total_seconds()
        running_s = ((job.finished_at or now) - job.started_at).total_seconds()
    return JobOut(
        id=job.id,
        kind=job.kind,
        status=JobStatus(job.status),
        dataset_id=job.dataset_id,
        condition=job.condition,
        skin_tone=job.skin_tone,
        strategy=Strategy(job.strategy) if job.strategy else None,
        model=job.model_id,
        count=job.count,
        seed=job.seed,
        chunk_size=job.chunk_size,
        chunks=service.chunk_count(job),
        params=job.params or {},
        progress=Progress(
            done=job.done,
            total=job.count,
            running=[
                ChunkStep(chunk=c.index, done=c.done, step=c.step, steps=c.steps)
                for c in running or []
            ],
        ),
        timings=Timings(
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            canceled_at=job.canceled_at,
            queued_s=queued_s,
            running_s=running_s,
        ),
        error=job.error,
        result=job.result,
        idempotency_key=job.idempotency_key,
    )


def dispatch_after_commit(settings: Settings, job_id: str, kind: str = "generate") -> None:
    """Send a committed job's chunks; on a broker failure the recovery step sends them."""
    try:
        service.dispatch_job(
            session_factory=session_factory(settings.database_url),
            job_id=job_id,
            send=lambda j, i: send_chunk(settings, kind=kind, job_id=j, chunk_index=i),
        )
    except Exception:
        log.exception("dispatch of job %s failed; the worker's recovery step will send it", job_id)


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut)
def create_job(
    body: JobCreate,
    session: SessionDep,
    settings: SettingsDep,
    caller: CallerDep,
    background: BackgroundTasks,
    response: Response,
) -> JobOut:
    """Queue a generation job; its images land in a synthetic dataset."""
    job, created = service.create_job(session=session, settings=settings, params=body, owner=caller)
    session.commit()
    response.headers["Location"] = f"/jobs/{job.id}"
    if created:
        # Commit first, enqueue after: a fast worker must find the rows it reads.
        background.add_task(partial(dispatch_after_commit, settings, job.id))
    else:
        response.status_code = status.HTTP_200_OK
    return job_out(job)


@router.get("", response_model=JobList)
def list_jobs(
    session: SessionDep,
    caller: CallerDep,
    status_filter: JobStatus | None = Query(None, alias="status"),
    limit: int = Query(50, ge=1, le=1000),
    cursor: str | None = None,
) -> JobList:
    """The caller's jobs, newest first."""
    rows, next_cursor = service.list_jobs(
        session=session, owner=caller, status=status_filter, limit=limit, cursor=cursor
    )
    return JobList(items=[job_out(j) for j in rows], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobOut)
def get_job(job_id: str, session: SessionDep, caller: CallerDep) -> JobOut:
    """A job's status, progress (with the running chunks' sampler steps), timings, error."""
    job = service.get_job(session=session, job_id=job_id, owner=caller)
    return job_out(job, service.running_chunks(session=session, job_id=job.id))


@router.post("/{job_id}/cancel", response_model=JobOut)
def cancel_job(job_id: str, session: SessionDep, store: StoreDep, caller: CallerDep) -> JobOut:
    """Cancel a queued or running job. Images already generated stay in their dataset; a
    canceled upload keeps nothing."""
    found = service.get_job(session=session, job_id=job_id, owner=caller)
    was_queued = found.status == "queued"
    if found.kind == "experiment":  # its queued runs are canceled with it
        job = runs.cancel_experiment(session=session, experiment_id=job_id, owner=caller)
    else:
        job = service.cancel_job(session=session, job_id=job_id, owner=caller)
    if job.kind == "ingest" and was_queued and job.dataset_id:
        # no worker has touched it: drop the dataset and the staged upload here
        discard_upload(session=session, job_id=job.id, dataset_id=job.dataset_id)
        for name in ("archive", "metadata.csv"):
            with contextlib.suppress(Exception):
                store.delete(upload_key(job.id, name))
    session.commit()
    return job_out(job)
