"""/datasets: list, inspect, and stream manifests with a download URL per image."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from enum import StrEnum
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from app import datasets as service
from app.api.deps import CallerDep, SessionDep, SettingsDep, StoreDep
from app.config import Settings
from app.db.session import session_factory
from app.db.tables import Image
from app.schemas import MANIFEST_COLUMNS, CountRow, DatasetList, DatasetOut, Strategy
from app.storage import ObjectStore

router = APIRouter(prefix="/datasets", tags=["datasets"])


class ManifestFormat(StrEnum):
    JSONL = "jsonl"
    CSV = "csv"


class Source(StrEnum):
    REAL = "real"
    SYNTHETIC = "synthetic"


@router.get("", response_model=DatasetList)
def list_datasets(
    session: SessionDep, caller: CallerDep, kind: Source | None = None
) -> DatasetList:
    """The caller's datasets with their image counts."""
    rows = service.list_datasets(session=session, owner=caller, kind=kind.value if kind else None)
    return DatasetList(
        items=[
            DatasetOut(
                id=d.id,
                name=d.name,
                kind=d.kind,
                description=d.description,
                created_at=d.created_at,
                image_count=n,
            )
            for d, n in rows
        ]
    )


@router.get("/{dataset_id}", response_model=DatasetOut)
def get_dataset(dataset_id: str, session: SessionDep, caller: CallerDep) -> DatasetOut:
    """One dataset with its counts by condition x skin tone x strategy."""
    dataset = service.get_dataset(session=session, dataset_id=dataset_id, owner=caller)
    counts = [
        CountRow(**row) for row in service.dataset_counts(session=session, dataset_id=dataset.id)
    ]
    return DatasetOut(
        id=dataset.id,
        name=dataset.name,
        kind=dataset.kind,
        description=dataset.description,
        created_at=dataset.created_at,
        image_count=sum(c.count for c in counts),
        counts=counts,
    )


def _row(image: Image, store: ObjectStore) -> dict[str, object]:
    return {
        "image_id": image.id,
        "dataset_id": image.dataset_id,
        "url": store.url(image.storage_key),
        "sha256": image.sha256,
        "size_bytes": image.size_bytes,
        "condition": image.condition,
        "skin_tone": image.skin_tone,
        "source": image.source,
        "strategy": image.strategy,
        "model": image.model_id,
        "seed": image.seed,
        "steps": image.steps,
        "guidance_scale": image.guidance_scale,
        "prompt": image.prompt,
        "negative_prompt": image.negative_prompt,
        "parent_image_id": image.parent_image_id,
        "width": image.width,
        "height": image.height,
        "job_id": image.job_id,
        "storage_key": image.storage_key,
        "created_at": image.created_at.isoformat(),
    }


def _stream(
    *,
    settings: Settings,
    store: ObjectStore,
    dataset_id: str,
    filters: service.ManifestFilter,
    cursor: str | None,
    limit: int | None,
    fmt: ManifestFormat,
) -> Iterator[bytes]:
    # Its own session: the request's closes before the body streams.
    with session_factory(settings.database_url)() as session:
        images = service.iter_manifest_images(
            session=session,
            dataset_id=dataset_id,
            filters=filters,
            start_at=cursor,
            limit=limit,
            batch_rows=settings.manifest_batch_rows,
        )
        if fmt is ManifestFormat.CSV:
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
            writer.writeheader()
            for n, image in enumerate(images, 1):
                writer.writerow(_row(image, store))
                if n % 500 == 0:
                    yield buffer.getvalue().encode()
                    buffer.seek(0)
                    buffer.truncate()
            yield buffer.getvalue().encode()
        else:
            chunk: list[str] = []
            for image in images:
                chunk.append(json.dumps(_row(image, store), separators=(",", ":")))
                if len(chunk) >= 500:
                    yield ("\n".join(chunk) + "\n").encode()
                    chunk = []
            if chunk:
                yield ("\n".join(chunk) + "\n").encode()


@router.get("/{dataset_id}/manifest")
def get_manifest(
    dataset_id: str,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    caller: CallerDep,
    format: ManifestFormat = ManifestFormat.JSONL,
    condition: str | None = None,
    skin_tone: int | None = Query(None, ge=1, le=6),
    strategy: Strategy | None = None,
    source: Source | None = None,
    job_id: str | None = None,
    cursor: str | None = Query(None, description="Page start: X-Next-Cursor of the last page."),
    limit: int | None = Query(None, ge=1, le=1_000_000, description="Rows per page; all if unset."),
) -> StreamingResponse:
    """Every image of the dataset, one row each, streamed (JSON lines or CSV)."""
    dataset = service.get_dataset(session=session, dataset_id=dataset_id, owner=caller)
    filters = service.ManifestFilter(
        condition=condition,
        skin_tone=skin_tone,
        strategy=strategy.value if strategy else None,
        source=source.value if source else None,
        job_id=job_id,
    )
    headers: dict[str, str] = {}
    if limit is not None:
        next_start = service.next_page_start(
            session=session, dataset_id=dataset.id, filters=filters, start_at=cursor, limit=limit
        )
        if next_start is not None:
            params = {k: v for k, v in request.query_params.items() if k != "cursor"}
            params["cursor"] = next_start
            headers["X-Next-Cursor"] = next_start
            headers["Link"] = f'<{request.url.path}?{urlencode(params)}>; rel="next"'
    media = "text/csv" if format is ManifestFormat.CSV else "application/x-ndjson"
    headers["Content-Disposition"] = f'attachment; filename="{dataset.id}.{format.value}"'
    return StreamingResponse(
        _stream(
            settings=settings,
            store=store,
            dataset_id=dataset.id,
            filters=filters,
            cursor=cursor,
            limit=limit,
            fmt=format,
        ),
        media_type=media,
        headers=headers,
    )
