"""/jobs: submit generation jobs; list, inspect and cancel jobs of every kind."""

from __future__ import annotations

from fastapi import APIRouter, BackgroundTasks, Query, Response, status

from app import engine
from app.api.accepted import accept, accepted_response
from app.api.deps import CallerDep, CursorQuery, SessionDep, SettingsDep, StoreDep
from app.api.problems import problem_responses
from app.api.views import delivery_page, job_out, stalled_since
from app.datasets import uploads as upload_service
from app.experiments import runs as run_service
from app.generation import service as generation_service
from app.schemas import DeliveryList, JobCreate, JobList, JobOut, JobStatus

router = APIRouter(prefix="/jobs", tags=["jobs"], responses=problem_responses(401, 422))


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobOut,
    responses=problem_responses(400, 409),
)
def create_job(
    body: JobCreate,
    session: SessionDep,
    settings: SettingsDep,
    caller: CallerDep,
    background: BackgroundTasks,
    response: Response,
) -> Response:
    """Queue a generation job; its images land in a synthetic dataset."""
    job, created = generation_service.create_job(
        session=session, settings=settings, params=body, owner=caller
    )
    accept(session=session, settings=settings, background=background, response=response,
           job=job, location=f"/jobs/{job.id}", created=created)  # fmt: skip
    return accepted_response(response, job_out(job))


@router.get("", response_model=JobList)
def list_jobs(
    session: SessionDep,
    settings: SettingsDep,
    caller: CallerDep,
    status_filter: JobStatus | None = Query(None, alias="status"),
    limit: int = Query(50, ge=1, le=1000),
    cursor: CursorQuery = None,
) -> JobList:
    """The caller's jobs, newest first."""
    rows, next_cursor = engine.list_jobs(
        session=session, owner=caller, status=status_filter, limit=limit, cursor=cursor
    )
    canceled = [j.id for j in rows if j.status == JobStatus.CANCELED]
    finishing = engine.jobs_with_running_chunks(
        session=session, job_ids=canceled, heartbeat_since=stalled_since(settings)
    )
    return JobList(
        items=[job_out(j, still_running=j.id in finishing) for j in rows], next_cursor=next_cursor
    )


@router.get("/{job_id}", response_model=JobOut, responses=problem_responses(404))
def get_job(job_id: str, session: SessionDep, settings: SettingsDep, caller: CallerDep) -> JobOut:
    """A job's status, progress (with the running chunks' sampler steps and heartbeats),
    timings, error."""
    job = engine.get_job(session=session, job_id=job_id, owner=caller)
    running = engine.running_chunks(session=session, job_id=job.id)
    return job_out(job, running, stalled_before=stalled_since(settings))


@router.post("/{job_id}/cancel", response_model=JobOut, responses=problem_responses(404, 409))
def cancel_job(
    job_id: str, session: SessionDep, settings: SettingsDep, store: StoreDep, caller: CallerDep
) -> JobOut:
    """Cancel a queued or running job. Images already generated stay in their dataset; a
    canceled upload keeps nothing. A job with running chunks answers `canceling`: they finish
    the batch in hand (its images count), then GET /jobs/{id} says `canceled` and the final
    count."""
    found = engine.get_job(session=session, job_id=job_id, owner=caller)
    if found.kind == "experiment":  # its queued runs are canceled with it
        job = run_service.cancel_experiment(session=session, experiment_id=job_id, owner=caller)
    elif found.kind == "ingest":  # a queued upload keeps nothing
        job = upload_service.cancel_ingest(session=session, store=store, job=found, owner=caller)
    else:
        job = engine.cancel_job(session=session, job_id=job_id, owner=caller)
    engine.emit_job_events(session=session, job_id=job.id, settings=settings)  # job.completed
    session.commit()
    running = engine.running_chunks(session=session, job_id=job.id)
    return job_out(job, running, stalled_before=stalled_since(settings))


@router.get("/{job_id}/deliveries", response_model=DeliveryList, responses=problem_responses(404))
def list_deliveries(
    job_id: str,
    session: SessionDep,
    caller: CallerDep,
    limit: int = Query(50, ge=1, le=1000),
    cursor: CursorQuery = None,
) -> DeliveryList:
    """The job's webhook delivery log, newest first: each event, its attempts and outcome."""
    job = engine.get_job(session=session, job_id=job_id, owner=caller)
    return delivery_page(session=session, job=job, limit=limit, cursor=cursor)
