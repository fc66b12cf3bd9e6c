"""Datasets and their images: lookup, listing and counts, and the rows a generation job writes.

Not every query on `images` is here: the manifest's are in manifest.py, and combine, exports,
uploads, the experiments' mixtures and workers/regenerate.py query images beside the logic
that uses them.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from app.db.owned import get_owned
from app.db.paging import newest_first
from app.db.tables import ApiKey, Dataset, Image, Job
from app.schemas import ACTIVE_JOB_STATUSES, DatasetStatus, JobStatus


def get_dataset(*, session: Session, dataset_id: str, owner: ApiKey) -> Dataset:
    """The caller's dataset; NotFound for a missing dataset or another key's."""
    return get_owned(
        session=session, table=Dataset, row_id=dataset_id, owner_id=owner.id, what="dataset"
    )


def list_datasets(
    *, session: Session, owner: ApiKey, kind: str | None = None, limit: int, cursor: str | None
) -> tuple[list[tuple[Dataset, int]], str | None]:
    """One page of the caller's datasets (of one kind when given), newest first, keyset-paged
    on (created_at, id), each with its image count (counted for the page's datasets only);
    returns the page and the next page's cursor."""
    query = select(Dataset).where(Dataset.owner_id == owner.id)
    if kind:
        query = query.where(Dataset.kind == kind)
    page, next_cursor = newest_first(
        session=session, query=query, table=Dataset, owner_id=owner.id, limit=limit, cursor=cursor
    )
    counts: dict[str, int] = {}
    if page:
        counts = {
            dataset_id: int(n)
            for dataset_id, n in session.execute(
                select(Image.dataset_id, func.count())
                .where(Image.dataset_id.in_([d.id for d in page]))
                .group_by(Image.dataset_id)
            )
        }
    return [(d, counts.get(d.id, 0)) for d in page], next_cursor


# The job kinds that write a dataset's images, and its status while one of them is active.
_WRITERS = {"ingest": DatasetStatus.INGESTING, "generate": DatasetStatus.GENERATING}


def dataset_statuses(*, session: Session, dataset_ids: list[str]) -> dict[str, DatasetStatus]:
    """Each dataset's status, from the jobs writing into it (no column: an upload's dataset is
    made with its ingest job, and a synthetic one grows with every job appended to it).
    Datasets no job writes (combined ones) are ready."""
    found: dict[str | None, set[tuple[str, str]]] = {}
    if dataset_ids:
        rows = session.execute(
            select(Job.dataset_id, Job.kind, Job.status)
            .where(Job.dataset_id.in_(dataset_ids), Job.kind.in_(list(_WRITERS)))
            .distinct()
        )
        for dataset_id, kind, status in rows:
            found.setdefault(dataset_id, set()).add((kind, status))
    active = {s.value for s in ACTIVE_JOB_STATUSES}
    statuses: dict[str, DatasetStatus] = {}
    for dataset_id in dataset_ids:
        jobs = found.get(dataset_id, set())
        writing = [_WRITERS[kind] for kind, status in jobs if status in active]
        if writing:
            statuses[dataset_id] = writing[0]
        elif jobs and all(status == JobStatus.FAILED for _, status in jobs):
            statuses[dataset_id] = DatasetStatus.FAILED
        else:
            statuses[dataset_id] = DatasetStatus.READY
    return statuses


def dataset_counts(*, session: Session, dataset_id: str) -> list[dict[str, Any]]:
    """Image counts by condition x skin tone x strategy."""
    rows = session.execute(
        select(Image.condition, Image.skin_tone, Image.strategy, func.count())
        .where(Image.dataset_id == dataset_id)
        .group_by(Image.condition, Image.skin_tone, Image.strategy)
        .order_by(Image.condition, Image.skin_tone, Image.strategy)
    )
    return [{"condition": c, "skin_tone": t, "strategy": s, "count": int(n)} for c, t, s, n in rows]


def split_counts(*, session: Session, dataset_id: str) -> list[dict[str, Any]]:
    """Image counts by condition x split (null: no split)."""
    rows = session.execute(
        select(Image.condition, Image.split, func.count())
        .where(Image.dataset_id == dataset_id)
        .group_by(Image.condition, Image.split)
        .order_by(Image.condition, Image.split.asc().nulls_last())
    )
    return [{"condition": c, "split": s, "count": int(n)} for c, s, n in rows]


def upsert_image(*, session: Session, values: dict[str, Any]) -> None:
    """Insert an image row, or overwrite the row of the same (job, index): a chunk that runs
    twice leaves one row per image."""
    dialect = session.get_bind().dialect.name
    insert_fn = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = insert_fn(Image).values(**values)
    updates = {k: statement.excluded[k] for k in values if k not in ("id", "job_id", "index")}
    statement = statement.on_conflict_do_update(index_elements=["id"], set_=updates)
    session.execute(statement)


def images_of_job_range(
    *, session: Session, job_id: str, start: int, stop: int
) -> dict[int, Image]:
    """Rows already written for images [start, stop) of a job, by index."""
    rows = session.scalars(
        select(Image).where(Image.job_id == job_id, Image.index >= start, Image.index < stop)
    )
    return {row.index: row for row in rows if row.index is not None}


def count_images(*, session: Session, source: str | None = None) -> int:
    query = select(func.count()).select_from(Image)
    if source is not None:
        query = query.where(Image.source == source)
    return int(session.scalar(query) or 0)


def parent_candidates(
    *, session: Session, dataset_id: str, condition: str, skin_tone: int | None
) -> list[str]:
    """Ids of a real dataset's images of `condition` (and `skin_tone` when set), by id."""
    query = select(Image.id).where(Image.dataset_id == dataset_id, Image.condition == condition)
    if skin_tone is not None:
        query = query.where(Image.skin_tone == skin_tone)
    return list(session.scalars(query.order_by(Image.id)))


def parents_of_job(*, session: Session, job_id: str, positions: list[int]) -> dict[int, Image]:
    """The parent image rows of a job at `positions`, by position."""
    from app.db.tables import JobParent

    rows = session.execute(
        select(JobParent.position, Image)
        .join(Image, Image.id == JobParent.image_id)
        .where(JobParent.job_id == job_id, JobParent.position.in_(positions))
    )
    return {position: image for position, image in rows}
