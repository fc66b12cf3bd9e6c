"""/datasets/{id}/exports: export a dataset as WebDataset shards with a card and Croissant."""

from __future__ import annotations

from fastapi import APIRouter, BackgroundTasks, Query, Response, status

from app.api.accepted import accept
from app.api.deps import CallerDep, SessionDep, SettingsDep, StoreDep
from app.api.problems import problem_responses
from app.api.views import export_out, job_out
from app.datasets import exports as export_service
from app.schemas import ExportCreate, JobList, JobOut

router = APIRouter(prefix="/datasets", tags=["exports"], responses=problem_responses(401, 422))


@router.post(
    "/{dataset_id}/exports",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobOut,
    responses=problem_responses(400, 404),
)
def create_export(
    dataset_id: str,
    body: ExportCreate,
    session: SessionDep,
    settings: SettingsDep,
    caller: CallerDep,
    background: BackgroundTasks,
    response: Response,
) -> JobOut:
    """Queue an export job: shards of at most `shard_size` samples, README.md and
    croissant.json under exports/{dataset_id}/{job_id}/; the job's result lists them."""
    job = export_service.create_export_job(
        session=session, dataset_id=dataset_id, params=body, owner=caller
    )
    accept(session=session, settings=settings, background=background, response=response,
           job=job, location=f"/datasets/{dataset_id}/exports/{job.id}")  # fmt: skip
    return job_out(job)


@router.get("/{dataset_id}/exports", response_model=JobList, responses=problem_responses(404))
def list_exports(
    dataset_id: str,
    session: SessionDep,
    store: StoreDep,
    caller: CallerDep,
    limit: int = Query(50, ge=1, le=1000),
) -> JobList:
    """The dataset's exports, newest first."""
    rows = export_service.list_exports(
        session=session, dataset_id=dataset_id, owner=caller, limit=limit
    )
    return JobList(items=[export_out(job, store.url) for job in rows], next_cursor=None)


@router.get(
    "/{dataset_id}/exports/{job_id}", response_model=JobOut, responses=problem_responses(404)
)
def get_export(
    dataset_id: str, job_id: str, session: SessionDep, store: StoreDep, caller: CallerDep
) -> JobOut:
    """One export job, with fresh download URLs for its files."""
    job = export_service.get_export(
        session=session, dataset_id=dataset_id, job_id=job_id, owner=caller
    )
    return export_out(job, store.url)
