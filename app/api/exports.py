"""/datasets/{id}/exports: export a dataset as WebDataset shards with a card and Croissant."""

from __future__ import annotations

from functools import partial

from fastapi import APIRouter, BackgroundTasks, Query, Response, status

from app import exports as service
from app.api.deps import CallerDep, SessionDep, SettingsDep, StoreDep
from app.api.jobs import dispatch_after_commit, job_out
from app.db.tables import Job
from app.exports import ExportCreate
from app.schemas import JobList, JobOut
from app.storage import ObjectStore

router = APIRouter(prefix="/datasets", tags=["exports"])


def _export_out(job: Job, store: ObjectStore) -> JobOut:
    out = job_out(job)
    # URLs expire: every read signs them again
    out.result = service.with_fresh_urls(result=job.result, url=store.url)
    return out


@router.post("/{dataset_id}/exports", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut)
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
    job = service.create_export_job(
        session=session, dataset_id=dataset_id, params=body, owner=caller
    )
    session.commit()
    response.headers["Location"] = f"/datasets/{dataset_id}/exports/{job.id}"
    # Commit first, enqueue after: a fast worker must find the rows it reads.
    background.add_task(partial(dispatch_after_commit, settings, job.id, "export"))
    return job_out(job)


@router.get("/{dataset_id}/exports", response_model=JobList)
def list_exports(
    dataset_id: str,
    session: SessionDep,
    store: StoreDep,
    caller: CallerDep,
    limit: int = Query(50, ge=1, le=1000),
) -> JobList:
    """The dataset's exports, newest first."""
    rows = service.list_exports(session=session, dataset_id=dataset_id, owner=caller, limit=limit)
    return JobList(items=[_export_out(job, store) for job in rows], next_cursor=None)


@router.get("/{dataset_id}/exports/{job_id}", response_model=JobOut)
def get_export(
    dataset_id: str, job_id: str, session: SessionDep, store: StoreDep, caller: CallerDep
) -> JobOut:
    """One export job, with fresh download URLs for its files."""
    job = service.get_export(session=session, dataset_id=dataset_id, job_id=job_id, owner=caller)
    return _export_out(job, store)
