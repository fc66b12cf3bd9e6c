"""/datasets: list, inspect, combine, and stream manifests with a download URL per image.

A thin router: the manifest's SQL is app/datasets/manifest.py, its streaming (connections,
URLs signed in bulk, JSON lines, CSV and Parquet) app/datasets/manifest_stream.py.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request, status
from fastapi.responses import StreamingResponse

from app.api.deps import ID_PATTERN, CallerDep, CursorQuery, SessionDep, SettingsDep, StoreDep
from app.api.problems import problem_responses
from app.api.views import dataset_out
from app.datasets import repository as service
from app.datasets.combine import Part, combine
from app.datasets.manifest import ManifestFilter, next_page_start
from app.datasets.manifest_stream import stream_manifest, without_copies
from app.schemas import (
    CombineIn,
    CountRow,
    DatasetList,
    DatasetOut,
    ManifestFormat,
    ManifestRow,
    Name,
    SkinToneGroup,
    Source,
    Split,
    SplitCountRow,
    Strategy,
)

router = APIRouter(prefix="/datasets", tags=["datasets"], responses=problem_responses(401, 422))


@router.get("", response_model=DatasetList)
def list_datasets(
    session: SessionDep,
    caller: CallerDep,
    kind: Source | None = None,
    limit: int = Query(50, ge=1, le=1000),
    cursor: CursorQuery = None,
) -> DatasetList:
    """The caller's datasets with their image counts and status, newest first, a page at a
    time."""
    rows, next_cursor = service.list_datasets(
        session=session,
        owner=caller,
        kind=kind.value if kind else None,
        limit=limit,
        cursor=cursor,
    )
    statuses = service.dataset_statuses(session=session, dataset_ids=[d.id for d, _ in rows])
    return DatasetList(
        items=[dataset_out(d, n, status=statuses[d.id]) for d, n in rows], next_cursor=next_cursor
    )


@router.get("/{dataset_id}", response_model=DatasetOut, responses=problem_responses(404))
def get_dataset(dataset_id: str, session: SessionDep, caller: CallerDep) -> DatasetOut:
    """One dataset with its counts by condition x skin tone x strategy."""
    dataset = service.get_dataset(session=session, dataset_id=dataset_id, owner=caller)
    counts = [
        CountRow(**row) for row in service.dataset_counts(session=session, dataset_id=dataset.id)
    ]
    splits = [
        SplitCountRow(**row) for row in service.split_counts(session=session, dataset_id=dataset.id)
    ]
    status = service.dataset_statuses(session=session, dataset_ids=[dataset.id])[dataset.id]
    return dataset_out(dataset, sum(c.count for c in counts), counts, splits, status=status)


_MEDIA_TYPES = {
    ManifestFormat.JSONL: "application/x-ndjson",
    ManifestFormat.CSV: "text/csv; charset=utf-8",
    ManifestFormat.PARQUET: "application/vnd.apache.parquet",
}


def _manifest_responses() -> dict[int | str, dict[str, Any]]:
    """The document's word on the manifest: a ManifestRow per line or row in each format, the
    paging headers, and its errors."""
    schemas = {
        ManifestFormat.JSONL: ManifestRow.model_json_schema(),  # each line
        ManifestFormat.CSV: {"type": "string"},
        ManifestFormat.PARQUET: {"type": "string", "format": "binary"},
    }
    content = {_MEDIA_TYPES[f].split(";")[0]: {"schema": schema} for f, schema in schemas.items()}
    string = {"type": "string"}
    headers = {
        "X-Next-Cursor": {"description": "With `limit`: the next page's cursor.", "schema": string},
        "Link": {"description": 'With `limit`: the next URL (rel="next").', "schema": string},
        "X-Copies-Excluded": {
            "description": "With `exclude_copies`: how many flagged images were left out.",
            "schema": string,
        },
        "X-Evaluation-Id": {
            "description": "With `exclude_copies`: the evaluation whose flags were used.",
            "schema": string,
        },
    }
    ok = {"description": "One ManifestRow per image.", "content": content, "headers": headers}
    return {200: ok, **problem_responses(404)}


@router.get(
    "/{dataset_id}/manifest", response_class=StreamingResponse, responses=_manifest_responses()
)
def get_manifest(
    dataset_id: str,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    caller: CallerDep,
    format: ManifestFormat = ManifestFormat.JSONL,
    condition: Name | None = None,
    skin_tone: int | None = Query(None, ge=1, le=6, description="Fitzpatrick type 1..6."),
    skin_tone_group: SkinToneGroup | None = Query(
        None,
        description="Fitzpatrick group, from skin_tone or else the group the source gave; "
        "unknown: neither.",
    ),
    strategy: Strategy | None = None,
    source: Source | None = None,
    parent_image_id: Name | None = Query(None, description="Children of this image."),
    job_id: Name | None = None,
    split: Split | None = None,
    cursor: str | None = Query(
        None, pattern=ID_PATTERN, description="Page start: X-Next-Cursor of the last page."
    ),
    limit: int | None = Query(None, ge=1, le=1_000_000, description="Rows per page; all if unset."),
    exclude_copies: bool = Query(
        False,
        description="Leave out the images the dataset's latest evaluation flagged as copies of "
        "real training images (X-Copies-Excluded says how many); 422 without an evaluation.",
    ),
) -> StreamingResponse:
    """Every image of the dataset that the filters select, one row each, in image-id order,
    streamed as JSON lines, CSV or Parquet."""
    dataset = service.get_dataset(session=session, dataset_id=dataset_id, owner=caller)
    filters = ManifestFilter(
        condition=condition,
        skin_tone=skin_tone,
        strategy=strategy.value if strategy else None,
        source=source.value if source else None,
        job_id=job_id,
        skin_tone_group=skin_tone_group.value if skin_tone_group else None,
        parent_image_id=parent_image_id,
        split=split.value if split else None,
    )
    headers: dict[str, str] = {}
    if exclude_copies:
        filters, excluded = without_copies(
            session=session, owner_id=caller.id, dataset_id=dataset.id, filters=filters
        )
        headers["X-Copies-Excluded"] = str(excluded)
        headers["X-Evaluation-Id"] = filters.exclude_copies_of or ""
    if limit is not None:
        next_start = next_page_start(
            session=session, dataset_id=dataset.id, filters=filters, start_at=cursor, limit=limit
        )
        if next_start is not None:
            params = {k: v for k, v in request.query_params.items() if k != "cursor"}
            params["cursor"] = next_start
            headers["X-Next-Cursor"] = next_start
            headers["Link"] = f'<{request.url.path}?{urlencode(params)}>; rel="next"'
    headers["Content-Disposition"] = f'attachment; filename="{dataset.id}.{format.value}"'
    return StreamingResponse(
        stream_manifest(
            settings=settings,
            store=store,
            dataset_id=dataset.id,
            filters=filters,
            cursor=cursor,
            limit=limit,
            fmt=format,
        ),
        media_type=_MEDIA_TYPES[format],
        headers=headers,
    )


@router.post(
    "/combine",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetOut,
    responses=problem_responses(400),
)
def combine_datasets(body: CombineIn, session: SessionDep, caller: CallerDep) -> DatasetOut:
    """A dataset built from others, e.g. a real train split plus its images' synthetic
    children: `{"parts": [{"dataset_id": REAL, "split": "train"},
    {"dataset_id": SYNTH, "children_of": 0}]}`."""
    parts = [
        Part(**(p.model_dump() | {"strategy": p.strategy.value if p.strategy else None}))
        for p in body.parts
    ]
    dataset, count = combine(
        session=session, owner=caller, name=body.name, parts=parts, description=body.description
    )
    session.commit()
    return dataset_out(dataset, count)
