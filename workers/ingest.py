"""Dataset ingest: the task that reads an uploaded archive into a real dataset (`train` queue).

All or nothing by default: rows are written in one transaction after every image is stored,
and a refused upload deletes what it stored and the dataset. With on_error=skip the good rows
are kept and the report lists the others. A rerun overwrites the same keys and rows.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery import Task
from sqlalchemy.orm import Session, sessionmaker

from app import engine
from app.broker import INGEST_TASK
from app.config import Settings
from app.datasets import uploads
from app.datasets.ingest import (
    Archive,
    IngestError,
    Limits,
    Member,
    Problem,
    Row,
    check_image,
    find_metadata,
    resolve_files,
    sort_copies,
)
from app.datasets.ingest_csv import Mapping, merged_labels, parse_csv
from app.datasets.repository import upsert_image
from app.db.session import session_factory
from app.db.tables import utcnow
from app.ids import real_image_id
from app.storage import ObjectStore, image_key
from app.vocabulary import add_job_conditions
from workers.celery_app import app
from workers.chunk_task import Canceled, claim_task_chunk, heartbeat, job_stopped, object_store

log = logging.getLogger(__name__)
MAX_REPORTED = 1000  # problems listed in a report; the count is always exact


def limits_of(settings: Settings) -> Limits:
    return Limits(
        max_members=settings.archive_max_members,
        max_uncompressed_bytes=settings.archive_max_uncompressed_bytes,
        max_member_bytes=settings.archive_max_member_bytes,
        max_ratio=settings.archive_max_ratio,
        max_image_pixels=settings.image_max_pixels,
        min_image_side=settings.image_min_side,
    )


def _in_row_order(problems: list[Problem]) -> list[Problem]:
    return sorted(problems, key=lambda p: (p.row or 0, p.file or ""))


def _report(problems: list[Problem]) -> list[dict[str, Any]]:
    return [p.as_dict() for p in _in_row_order(problems)[:MAX_REPORTED]]


def run_ingest(settings: Settings, claim: engine.ChunkClaim, folder: Path) -> dict[str, Any]:
    """Read the upload; returns the job's result. Raises IngestError for a refused upload."""
    store = object_store(settings)
    make_session = session_factory(settings.database_url)
    params = claim.params
    assert claim.dataset_id is not None
    limits = limits_of(settings)

    # 1. the staged upload, to local disk (streamed)
    archive_path = folder / "archive"
    store.get_file(uploads.archive_key(claim.job_id), archive_path)
    with archive_path.open("rb") as handle:
        archive = Archive(handle, limits)
        try:
            members = archive.check()
            text = _metadata_text(
                store,
                archive,
                members,
                job_id=claim.job_id,
                sent=bool(params.get("has_metadata")),
                folder=folder,
            )

            # 2. the rows, and the files they name
            parsed = parse_csv(text, _mapping(params))
            found, missing = resolve_files(parsed.rows, members)
            ingested = _Ingested(csv_format=parsed.csv_format, problems=parsed.problems + missing)
            rows = [r for r in parsed.rows if r.file in found]
            with make_session() as session:
                engine.set_job_count(
                    session=session, job_id=claim.job_id, count=len(rows) + len(ingested.problems)
                )
            by_member: dict[str, list[Row]] = {}
            for row in rows:
                by_member.setdefault(found[row.file], []).append(row)

            # 3. every image: decoded, checked, hashed, de-duplicated, stored
            _store_images(
                store, make_session, archive, by_member, ingested, claim=claim, limits=limits
            )
        finally:
            archive.close()

    # 4. byte-identical copies: duplicates are kept once; copies annotated differently are
    # problems, every row of them (the first copy, already stored, is taken back out)
    duplicates = _sort_copies(store, ingested)

    # 5. all or nothing (unless the user asked to skip bad rows)
    _refuse_bad_rows(store, ingested, skipping=params.get("on_error") == "skip")

    # 6. the labels new to the key's vocabulary (issue 21: they are its own), and the rows
    conditions = sorted({(a["condition"], a["provenance"]["label"]) for a in ingested.accepted})
    with make_session() as session:
        added = add_job_conditions(session=session, job_id=claim.job_id, labels=conditions)
        for values in ingested.accepted:
            upsert_image(session=session, values=values)
        session.commit()
    return {
        "format": ingested.csv_format,
        "columns": parsed.columns,
        "ignored_columns": parsed.ignored_columns,
        "accepted": len(ingested.accepted),
        "skipped": _report(ingested.problems),
        "skipped_count": len(ingested.problems),
        "duplicates": duplicates[:MAX_REPORTED],
        "duplicate_count": len(duplicates),
        "conditions_added": added,
        "merged_labels": merged_labels(parsed.rows),
        "rows": ingested.processed,
    }


@dataclass
class _Ingested:
    """What an ingest has read so far: the problems, the images stored and their rows."""

    csv_format: str
    problems: list[Problem]
    accepted: list[dict[str, Any]] = field(default_factory=list)  # image rows to write
    copies: dict[str, list[Row]] = field(default_factory=dict)  # sha256 -> the rows naming it
    stored_keys: list[str] = field(default_factory=list)
    processed: int = 0  # rows done, refused ones included


def _mapping(params: dict[str, Any]) -> Mapping:
    return Mapping(
        csv_format=params.get("csv_format") or "auto",
        file_column=params.get("file_column"),
        label_column=params.get("label_column"),
        skin_tone_column=params.get("skin_tone_column"),
        split_column=params.get("split_column"),
    )


def _metadata_text(
    store: ObjectStore,
    archive: Archive,
    members: list[Member],
    *,
    job_id: str,
    sent: bool,
    folder: Path,
) -> str:
    """The metadata CSV's text: the one sent beside the archive, else the archive's own."""
    if sent:
        csv_path = folder / "metadata.csv"
        store.get_file(uploads.metadata_key(job_id), csv_path)
        csv_bytes = csv_path.read_bytes()
    else:
        name = find_metadata(members)
        csv_bytes = next(archive.read({name}))[1]
    try:
        return csv_bytes.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise IngestError(f"metadata CSV: not UTF-8 text ({exc})") from None


def _store_images(
    store: ObjectStore,
    make_session: sessionmaker[Session],
    archive: Archive,
    by_member: dict[str, list[Row]],
    ingested: _Ingested,
    *,
    claim: engine.ChunkClaim,
    limits: Limits,
) -> None:
    """Step 3, member by member in archive order, with progress and the cancel check about
    once a second; anything that stops it deletes what it stored."""
    ingested.processed = len(ingested.problems)
    last = time.monotonic()
    try:
        for member, data in archive.read(set(by_member)):
            for row in by_member[member]:
                ingested.processed += 1
                _store_image(store, row, data, ingested, claim=claim, limits=limits)
            if time.monotonic() - last > 1.0:
                last = time.monotonic()
                with make_session() as session:
                    engine.record_progress(
                        session=session, job_id=claim.job_id, index=0, done=ingested.processed
                    )
                    if job_stopped(session=session, job_id=claim.job_id):
                        raise Canceled()
    except BaseException:
        _delete(store, ingested.stored_keys)
        raise


def _store_image(
    store: ObjectStore,
    row: Row,
    data: bytes,
    ingested: _Ingested,
    *,
    claim: engine.ChunkClaim,
    limits: Limits,
) -> None:
    """One row's image: a problem if unreadable, else stored once per distinct bytes."""
    assert claim.dataset_id is not None
    try:
        checked = check_image(data, limits)
    except ValueError as exc:
        ingested.problems.append(Problem(row.number, row.file, str(exc)))
        return
    ingested.copies.setdefault(checked.sha256, []).append(row)
    if len(ingested.copies[checked.sha256]) > 1:
        return  # stored once; sorted out in step 4
    image_id = real_image_id(claim.job_id, row.number)
    key = image_key(
        dataset_id=claim.dataset_id,
        condition=row.condition,
        image_id=image_id,
        extension=checked.extension,
    )
    store.put_bytes(key, data, content_type=checked.content_type)
    ingested.stored_keys.append(key)
    ingested.accepted.append(
        {
            "id": image_id,
            "dataset_id": claim.dataset_id,
            "source": "real",
            "condition": row.condition,
            "skin_tone": row.skin_tone,
            "skin_tone_group": row.skin_tone_group,
            "split": row.split,
            "labels": row.labels or None,
            "original_name": row.file,
            "width": checked.width,
            "height": checked.height,
            "sha256": checked.sha256,
            "size_bytes": len(data),
            "storage_key": key,
            "provenance": {
                "ingest_job": claim.job_id,
                "csv_row": row.number,
                "label": row.label,
                "csv_format": ingested.csv_format,
            },
            "created_at": utcnow(),
        }
    )


def _sort_copies(store: ObjectStore, ingested: _Ingested) -> list[dict[str, Any]]:
    """Step 4: conflicting copies become problems and their stored image is deleted; returns
    the plain duplicates, by row."""
    sorted_copies = sort_copies(ingested.copies)
    ingested.problems += sorted_copies.conflicts
    conflicted = sorted_copies.conflicted
    taken_out = {a["storage_key"] for a in ingested.accepted if a["sha256"] in conflicted}
    if taken_out:
        _delete(store, sorted(taken_out))
        ingested.stored_keys = [k for k in ingested.stored_keys if k not in taken_out]
        ingested.accepted = [a for a in ingested.accepted if a["storage_key"] not in taken_out]
    return sorted(sorted_copies.duplicates, key=lambda d: d["row"])


def _refuse_bad_rows(store: ObjectStore, ingested: _Ingested, *, skipping: bool) -> None:
    """Step 5: IngestError, with what was stored deleted, for any problem (unless skipping)
    or when no image could be read."""
    problems = ingested.problems
    if problems and not skipping:
        _delete(store, ingested.stored_keys)
        count = len(problems)
        shown = _in_row_order(problems)[:5]
        raise IngestError(
            f"{count} bad row{'s' if count > 1 else ''}; nothing was kept "
            f"(send on_error=skip to keep the good rows): "
            + "; ".join(f"row {p.row}: {p.reason}" if p.row else p.reason for p in shown),
            report={"errors": _report(problems), "error_count": count},
        )
    if not ingested.accepted:
        _delete(store, ingested.stored_keys)
        raise IngestError("no image could be read", report={"errors": _report(problems)})


def _delete(store: Any, keys: list[str]) -> None:
    for key in keys:
        try:
            store.delete(key)
        except Exception:
            log.exception("could not delete %s", key)


def _drop_upload(settings: Settings, job_id: str) -> None:
    uploads.discard_staged_files(object_store(settings), job_id)


def _discard_dataset(settings: Settings, job_id: str, dataset_id: str | None) -> None:
    with session_factory(settings.database_url)() as session:
        uploads.discard_upload(session=session, job_id=job_id, dataset_id=dataset_id)
        session.commit()


@app.task(name=INGEST_TASK, bind=True, acks_late=True, ignore_result=True)
def ingest_dataset(self: Task, job_id: str, chunk_index: int) -> dict[str, Any]:
    """Ingest one uploaded dataset (the database says which and how)."""
    settings, worker, claim = claim_task_chunk(self, job_id, chunk_index)
    make_session = session_factory(settings.database_url)
    if claim is None:
        return {"job_id": job_id, "skipped": True}
    status, done, error, result = "succeeded", 0, None, None
    try:
        with (
            heartbeat(settings, job_id=job_id, index=0, worker=worker),
            tempfile.TemporaryDirectory(prefix="synthderm-ingest-") as tmp,
        ):
            result = run_ingest(settings, claim, Path(tmp))
            done = int(result["rows"])
    except Canceled:
        status = "canceled"
        _discard_dataset(settings, job_id, claim.dataset_id)
    except IngestError as exc:
        status, error, result = "failed", str(exc), exc.report
        _discard_dataset(settings, job_id, claim.dataset_id)
    except Exception as exc:  # an unexpected failure: reported, nothing half-kept
        log.exception("ingest %s failed", job_id)
        status, error = "failed", f"{type(exc).__name__}: {exc}"[:4000]
        _discard_dataset(settings, job_id, claim.dataset_id)
    with make_session() as session:
        if result is not None:
            engine.set_job_result(session=session, job_id=job_id, result=result)
        final = engine.finish_chunk(
            session=session, job_id=job_id, index=0, status=status, done=done, error=error
        )
    if status != "canceled" or final == "canceled":
        _drop_upload(settings, job_id)
    log.info("ingest %s %s: %s", job_id, status, error or result)
    return {"job_id": job_id, "status": status}
