"""Datasets and their images: every query on `datasets` and `images` lives here.

Manifests stream in keyset-paged batches (ordered by image id) so that a million rows never
sit in memory at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from app.db.tables import ApiKey, Dataset, Image
from app.errors import NotFound


def get_dataset(*, session: Session, dataset_id: str, owner: ApiKey) -> Dataset:
    """The caller's dataset; NotFound for a missing dataset or another key's."""
    dataset = session.get(Dataset, dataset_id)
    if dataset is None or dataset.owner_id != owner.id:
        raise NotFound(f"no dataset {dataset_id!r}")
    return dataset


def list_datasets(
    *, session: Session, owner: ApiKey, kind: str | None = None
) -> list[tuple[Dataset, int]]:
    """The caller's datasets, newest first, each with its image count."""
    counts = select(Image.dataset_id, func.count().label("n")).group_by(Image.dataset_id).subquery()
    query = (
        select(Dataset, func.coalesce(counts.c.n, 0))
        .outerjoin(counts, counts.c.dataset_id == Dataset.id)
        .where(Dataset.owner_id == owner.id)
        .order_by(Dataset.created_at.desc(), Dataset.id)
    )
    if kind:
        query = query.where(Dataset.kind == kind)
    return [(d, int(n)) for d, n in session.execute(query)]


def dataset_counts(*, session: Session, dataset_id: str) -> list[dict[str, Any]]:
    """Image counts by condition x skin tone x strategy."""
    rows = session.execute(
        select(Image.condition, Image.skin_tone, Image.strategy, func.count())
        .where(Image.dataset_id == dataset_id)
        .group_by(Image.condition, Image.skin_tone, Image.strategy)
        .order_by(Image.condition, Image.skin_tone, Image.strategy)
    )
    return [{"condition": c, "skin_tone": t, "strategy": s, "count": int(n)} for c, t, s, n in rows]


@dataclass(frozen=True)
class ManifestFilter:
    condition: str | None = None
    skin_tone: int | None = None
    strategy: str | None = None
    source: str | None = None
    job_id: str | None = None


def _filtered(query: Select[Any], dataset_id: str, filters: ManifestFilter) -> Select[Any]:
    query = query.where(Image.dataset_id == dataset_id)
    if filters.condition is not None:
        query = query.where(Image.condition == filters.condition)
    if filters.skin_tone is not None:
        query = query.where(Image.skin_tone == filters.skin_tone)
    if filters.strategy is not None:
        query = query.where(Image.strategy == filters.strategy)
    if filters.source is not None:
        query = query.where(Image.source == filters.source)
    if filters.job_id is not None:
        query = query.where(Image.job_id == filters.job_id)
    return query


def iter_manifest_images(
    *,
    session: Session,
    dataset_id: str,
    filters: ManifestFilter,
    start_at: str | None,
    limit: int | None,
    batch_rows: int,
) -> Iterator[Image]:
    """Images of a dataset in id order from `start_at` (inclusive), at most `limit`."""
    remaining = limit
    cursor = start_at
    inclusive = True
    while remaining is None or remaining > 0:
        size = batch_rows if remaining is None else min(batch_rows, remaining)
        query = _filtered(select(Image), dataset_id, filters)
        if cursor is not None:
            query = query.where(Image.id >= cursor if inclusive else Image.id > cursor)
        batch = list(session.scalars(query.order_by(Image.id).limit(size)))
        session.expunge_all()
        if not batch:
            return
        yield from batch
        cursor = batch[-1].id
        inclusive = False
        if remaining is not None:
            remaining -= len(batch)
        if len(batch) < size:
            return


def next_page_start(
    *, session: Session, dataset_id: str, filters: ManifestFilter, start_at: str | None, limit: int
) -> str | None:
    """The id the page after [start_at, +limit) begins at, or None on the last page."""
    query = _filtered(select(Image.id), dataset_id, filters)
    if start_at is not None:
        query = query.where(Image.id >= start_at)
    return session.scalar(query.order_by(Image.id).offset(limit).limit(1))


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
