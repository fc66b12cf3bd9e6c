"""Staging an upload: the dataset row, its ingest job and the staged files, and their discard.

The one place that knows how an upload waits in the store (`uploads/{job}/archive` and
`uploads/{job}/metadata.csv`); the API stages it here and the ingest worker reads and drops it
through the same names.
"""

from __future__ import annotations

import contextlib
from typing import Any, BinaryIO

from sqlalchemy import delete
from sqlalchemy.orm import Session

from app import engine
from app.db.tables import ApiKey, Dataset, Image, Job
from app.ids import new_id
from app.storage import ObjectNotFound, ObjectStore, upload_key

ARCHIVE = "archive"
METADATA = "metadata.csv"
INGEST_KIND = "ingest"


def archive_key(job_id: str) -> str:
    """Where an upload's archive waits for its ingest job."""
    return upload_key(job_id, ARCHIVE)


def metadata_key(job_id: str) -> str:
    """Where an upload's separate metadata CSV (if sent) waits for its ingest job."""
    return upload_key(job_id, METADATA)


def stage_upload(
    *,
    session: Session,
    store: ObjectStore,
    owner: ApiKey,
    name: str,
    archive: BinaryIO,
    metadata: BinaryIO | None,
    params: dict[str, Any],
) -> Job:
    """A real dataset, its ingest job and the staged files. Not committed: the bytes are in the
    store before the job is visible, so a worker always finds them."""
    dataset = Dataset(id=new_id(), owner_id=owner.id, name=name, kind="real")
    session.add(dataset)
    session.flush()
    job = engine.insert_job(
        session=session, owner=owner, kind=INGEST_KIND, dataset_id=dataset.id, count=0,
        chunk_size=1, params=params,
    )  # fmt: skip
    archive.seek(0)
    store.put_file(archive_key(job.id), archive, content_type="application/octet-stream")
    if metadata is not None:
        metadata.seek(0)
        store.put_file(metadata_key(job.id), metadata, content_type="text/csv")
    return job


def discard_staged_files(store: ObjectStore, job_id: str) -> None:
    """Delete an upload's staged files (those that exist)."""
    for key in (archive_key(job_id), metadata_key(job_id)):
        with contextlib.suppress(ObjectNotFound, FileNotFoundError):
            store.delete(key)


def discard_upload(*, session: Session, job_id: str, dataset_id: str | None) -> None:
    """A refused or canceled upload keeps nothing: its rows and dataset go, and the job
    forgets the dataset. Not committed."""
    if dataset_id is None:
        return
    engine.detach_dataset(session=session, job_id=job_id)
    session.execute(delete(Image).where(Image.dataset_id == dataset_id))
    dataset = session.get(Dataset, dataset_id)
    if dataset is not None:
        session.delete(dataset)


def cancel_ingest(*, session: Session, store: ObjectStore, job: Job, owner: ApiKey) -> Job:
    """Cancel an ingest; a queued one (no worker has touched it) keeps nothing: its dataset and
    staged files go here. A running one is discarded by its worker. Not committed."""
    was_queued = job.status == "queued"
    engine.cancel_job(session=session, job_id=job.id, owner=owner)
    if was_queued and job.dataset_id:
        discard_upload(session=session, job_id=job.id, dataset_id=job.dataset_id)
        discard_staged_files(store, job.id)
    return job
