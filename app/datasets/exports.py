"""Dataset exports, the service: the request checked and its job inserted, the exports listed,
and the rows an export reads. What the files hold is export_files.py and export_croissant.py;
workers/export.py writes them.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app import engine
from app.datasets.export_files import FILTER_NAMES, ExportParams
from app.datasets.manifest import ManifestFilter, filtered_images
from app.datasets.repository import get_dataset
from app.db.tables import ApiKey, Dataset, Image, Job, utcnow
from app.errors import InvalidField, NotFound
from app.schemas import ExportCreate


def _selection(query: Any, *, dataset_id: str, filters: ManifestFilter, as_of: datetime) -> Any:
    # Images written after the request are not part of it: a dataset that a running job
    # still fills exports as it was when asked, and a rerun writes the same bytes.
    return filtered_images(query, dataset_id, filters).where(Image.created_at <= as_of)


def count_export_images(
    *, session: Session, dataset_id: str, filters: ManifestFilter, as_of: datetime
) -> int:
    """How many images an export selects."""
    query = select(func.count()).select_from(Image)
    query = _selection(query, dataset_id=dataset_id, filters=filters, as_of=as_of)
    return int(session.scalar(query) or 0)


def export_image_ids(*, session: Session, dataset_id: str, params: ExportParams) -> list[str]:
    """The ids of an export's images in shard order: by id, or shuffled by the seed."""
    query = _selection(
        select(Image.id), dataset_id=dataset_id, filters=params.filters, as_of=params.as_of
    )
    ids = list(session.scalars(query.order_by(Image.id)))
    if params.shuffle:
        random.Random(params.seed).shuffle(ids)
    return ids


def images_by_ids(*, session: Session, ids: list[str]) -> list[Image]:
    """Image rows in the order of `ids` (detached); LookupError if one is gone."""
    rows = {row.id: row for row in session.scalars(select(Image).where(Image.id.in_(ids)))}
    session.expunge_all()
    missing = [i for i in ids if i not in rows]
    if missing:
        raise LookupError(f"image {missing[0]} was deleted during the export")
    return [rows[i] for i in ids]


def export_source(*, session: Session, dataset_id: str) -> Dataset:
    """The dataset an export job reads (the worker's side: no owner check)."""
    dataset = session.get(Dataset, dataset_id)
    if dataset is None:
        raise LookupError(f"dataset {dataset_id} is gone")
    return dataset


def create_export_job(
    *, session: Session, dataset_id: str, params: ExportCreate, owner: ApiKey
) -> Job:
    """Validate an export and insert its job (kind `export`, one chunk). Not committed."""
    dataset = get_dataset(session=session, dataset_id=dataset_id, owner=owner)
    as_of = utcnow()
    filters = ManifestFilter(
        condition=params.condition,
        skin_tone=params.skin_tone,
        strategy=params.strategy.value if params.strategy else None,
        source=params.source,
    )
    count = count_export_images(
        session=session, dataset_id=dataset.id, filters=filters, as_of=as_of
    )
    if count == 0:
        chosen = {k: getattr(filters, k) for k in FILTER_NAMES if getattr(filters, k) is not None}
        which = ", ".join(f"{k}={v}" for k, v in chosen.items())
        raise InvalidField(
            f"dataset {dataset.id} has no images{' matching ' + which if which else ''}; "
            "nothing to export",
            field=next(iter(chosen), None),
        )
    seed = params.seed
    if params.shuffle and seed is None:
        seed = secrets.randbits(62)
    stored: dict[str, Any] = {
        "shard_size": params.shard_size,
        "shuffle": params.shuffle,
        "seed": seed,
        "as_of": as_of.isoformat(),
        **{k: getattr(filters, k) for k in FILTER_NAMES if getattr(filters, k) is not None},
    }
    return engine.insert_job(
        session=session,
        owner=owner,
        kind="export",
        dataset_id=dataset.id,
        count=count,
        chunk_size=max(count, 1),
        seed=seed if params.shuffle and seed is not None else 0,
        params=stored,
        created_at=as_of,
    )


def get_export(*, session: Session, dataset_id: str, job_id: str, owner: ApiKey) -> Job:
    """One export of the caller's dataset; NotFound otherwise."""
    dataset = get_dataset(session=session, dataset_id=dataset_id, owner=owner)
    job = session.get(Job, job_id)
    if job is None or job.kind != "export" or job.dataset_id != dataset.id:
        raise NotFound(f"no export {job_id!r} of dataset {dataset.id}")
    return job


def list_exports(*, session: Session, dataset_id: str, owner: ApiKey, limit: int) -> list[Job]:
    """The exports of the caller's dataset, newest first."""
    dataset = get_dataset(session=session, dataset_id=dataset_id, owner=owner)
    return list(
        session.scalars(
            select(Job)
            .where(Job.dataset_id == dataset.id, Job.kind == "export")
            .order_by(Job.created_at.desc(), Job.id.desc())
            .limit(limit)
        )
    )


def with_fresh_urls(
    *, result: dict[str, Any] | None, url: Callable[[str], str]
) -> dict[str, Any] | None:
    """An export's result with its download URLs signed again (they expire)."""
    if not result:
        return result
    fresh = dict(result)
    fresh["shards"] = [{**s, "url": url(s["key"])} for s in result.get("shards", [])]
    for name in ("card", "croissant"):
        if isinstance(result.get(name), dict):
            fresh[name] = {**result[name], "url": url(result[name]["key"])}
    return fresh
