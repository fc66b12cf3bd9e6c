"""Dataset export: the task that writes WebDataset shards, a dataset card and Croissant metadata.

Runs on the `train` queue; no torch. Each shard is built as a tar file on local disk, then
streamed to the store: a 5,000-sample shard never sits in memory. Tar members are
deterministic (mtime 0, uid/gid 0, mode 0644), so a rerun of the same export, after a worker
died or a message was redelivered, writes the same bytes under the same keys. A canceled or
failed export keeps nothing.
"""

from __future__ import annotations

import hashlib
import io
import logging
import tarfile
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from celery import Task
from sqlalchemy.orm import Session, sessionmaker

from app import engine
from app.broker import EXPORT_TASK
from app.config import Settings
from app.datasets import export_files, exports
from app.datasets.export_croissant import croissant
from app.db.session import session_factory
from app.db.tables import Image
from app.schemas import JobStatus
from app.storage import ObjectNotFound, ObjectStore
from app.vocabulary import list_conditions
from workers.celery_app import app
from workers.chunk_task import Canceled, claim_task_chunk, heartbeat, job_stopped, object_store

log = logging.getLogger(__name__)

# Image rows read per query, and objects downloaded at once (S3 latency, not bandwidth, is
# what bounds a sequential download).
READ_BATCH = 64
DOWNLOAD_THREADS = 8
CARD_NAME = "README.md"
CROISSANT_NAME = "croissant.json"


@dataclass
class ExportProgress:
    """Samples written so far (reported as the job's progress, also when it stops)."""

    samples: int = 0


class ShardWriter:
    """One WebDataset tar on local disk, with deterministic member headers."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.samples = 0
        # open across many samples, closed by close(): not a `with` block
        self._tar = tarfile.open(path, "w", format=tarfile.PAX_FORMAT)  # noqa: SIM115

    def add_sample(self, key: str, files: list[tuple[str, bytes]]) -> None:
        """The files of one sample, `{key}.{extension}`, next to each other (WebDataset groups
        consecutive members by key)."""
        for extension, data in files:
            info = tarfile.TarInfo(f"{key}.{extension}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.type = tarfile.REGTYPE
            self._tar.addfile(info, io.BytesIO(data))
        self.samples += 1

    def add_image(self, image: Image, data: bytes) -> str:
        """An image and its provenance JSON as one sample; returns the image's extension."""
        extension = export_files.image_extension(data, image.storage_key)
        metadata = export_files.sample_metadata(image, extension=extension)
        self.add_sample(
            export_files.sample_key(image),
            [(extension, data), ("json", export_files.encode_metadata(metadata))],
        )
        return extension

    def close(self) -> None:
        self._tar.close()


def read_image(store: ObjectStore, image: Image) -> bytes:
    """The stored bytes of an image, checked against the sha256 its row records."""
    try:
        data = store.get_bytes(image.storage_key)
    except ObjectNotFound:
        raise RuntimeError(
            f"image {image.id}: object {image.storage_key} is missing from the store"
        ) from None
    if hashlib.sha256(data).hexdigest() != image.sha256:
        raise RuntimeError(
            f"image {image.id}: the bytes of {image.storage_key} do not match its sha256"
        )
    return data


def upload_shard(store: ObjectStore, *, prefix: str, writer: ShardWriter) -> export_files.ShardInfo:
    """Close a shard, hash it and stream it to the store."""
    writer.close()
    digest = hashlib.sha256()
    with writer.path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
        size = handle.tell()
        handle.seek(0)
        store.put_file(prefix + writer.path.name, handle, content_type="application/x-tar")
    writer.path.unlink()
    return export_files.ShardInfo(writer.path.name, writer.samples, digest.hexdigest(), size)


def discard(store: ObjectStore, prefix: str) -> None:
    """Delete whatever an export wrote (a canceled or failed export keeps nothing)."""
    for key in list(store.iter_keys(prefix)):
        try:
            store.delete(key)
        except Exception:
            log.exception("could not delete %s", key)


def run_export(
    settings: Settings, claim: engine.ChunkClaim, progress: ExportProgress
) -> dict[str, Any]:
    """Write the export's shards, card and Croissant file; returns the job's result."""
    assert claim.dataset_id is not None
    store = object_store(settings)
    make_session = session_factory(settings.database_url)
    params = export_files.ExportParams.from_job(claim.params)
    prefix = export_files.export_prefix(dataset_id=claim.dataset_id, job_id=claim.job_id)

    # 1. what to export, in shard order
    with make_session() as session:
        dataset = exports.export_source(session=session, dataset_id=claim.dataset_id)
        session.expunge(dataset)
        ids = exports.export_image_ids(session=session, dataset_id=dataset.id, params=params)
        known = list_conditions(session=session, owner_id=dataset.owner_id)  # its owner's words
        condition_names = {c.slug: c.name for c in known}

    # 2. the shards: samples into a tar on disk, each full shard streamed to the store
    report = _ProgressReport(
        settings=settings, make_session=make_session, claim=claim, progress=progress
    )
    summary = export_files.ExportSummary.empty()
    shards = _write_shards(
        make_session=make_session, store=store, ids=ids, params=params, prefix=prefix,
        summary=summary, report=report,
    )  # fmt: skip

    # 3. the dataset card and the Croissant metadata
    card = export_files.dataset_card(
        dataset=dataset,
        job_id=claim.job_id,
        params=params,
        summary=summary,
        shards=shards,
        condition_names=condition_names,
    )
    store.put_bytes(prefix + CARD_NAME, card.encode(), content_type="text/markdown; charset=utf-8")
    metadata = croissant(
        dataset=dataset,
        job_id=claim.job_id,
        params=params,
        summary=summary,
        shards=shards,
        url=f"{settings.public_base_url.rstrip('/')}/datasets/{dataset.id}",
    )
    store.put_bytes(
        prefix + CROISSANT_NAME,
        export_files.encode_json_ld(metadata),
        content_type="application/ld+json",
    )

    # 4. a rerun that wrote fewer files than an earlier attempt leaves none of its leftovers
    kept = {prefix + s.name for s in shards} | {prefix + CARD_NAME, prefix + CROISSANT_NAME}
    for key in list(store.iter_keys(prefix)):
        if key not in kept:
            store.delete(key)

    return {
        "samples": progress.samples,
        "prefix": prefix,
        "shards": [
            {
                "key": prefix + s.name,
                "url": store.url(prefix + s.name),
                "samples": s.samples,
                "sha256": s.sha256,
                "size_bytes": s.size_bytes,
            }
            for s in shards
        ],
        "card": {"key": prefix + CARD_NAME, "url": store.url(prefix + CARD_NAME)},
        "croissant": {"key": prefix + CROISSANT_NAME, "url": store.url(prefix + CROISSANT_NAME)},
    }


class _ProgressReport:
    """Progress, and the cancel check: between shards, and as often as progress."""

    def __init__(
        self,
        *,
        settings: Settings,
        make_session: sessionmaker[Session],
        claim: engine.ChunkClaim,
        progress: ExportProgress,
    ) -> None:
        self.settings = settings
        self.claim = claim
        self.progress = progress
        self._make_session = make_session
        self._last = 0.0

    def __call__(self, *, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.settings.progress_update_interval_s:
            return
        self._last = now
        with self._make_session() as session:
            engine.record_progress(
                session=session,
                job_id=self.claim.job_id,
                index=self.claim.index,
                done=self.progress.samples,
            )
            if job_stopped(session=session, job_id=self.claim.job_id):
                raise Canceled()


def _write_shards(
    *,
    make_session: sessionmaker[Session],
    store: ObjectStore,
    ids: list[str],
    params: export_files.ExportParams,
    prefix: str,
    summary: export_files.ExportSummary,
    report: _ProgressReport,
) -> list[export_files.ShardInfo]:
    """Every sample into shards of `params.shard_size`, each uploaded when full; the summary
    counts what was written."""
    shards: list[export_files.ShardInfo] = []
    with (
        tempfile.TemporaryDirectory(prefix="synthderm-export-") as folder,
        ThreadPoolExecutor(DOWNLOAD_THREADS, thread_name_prefix="synthderm-export") as pool,
    ):
        writer: ShardWriter | None = None
        try:
            for image, data in _images(make_session, store, ids, pool):
                if writer is None:
                    writer = ShardWriter(Path(folder) / export_files.shard_name(len(shards)))
                extension = writer.add_image(image, data)
                summary.add(image, extension)
                report.progress.samples += 1
                if writer.samples >= params.shard_size:
                    shards.append(upload_shard(store, prefix=prefix, writer=writer))
                    writer = None
                    report(force=True)
                else:
                    report(force=False)
            if writer is not None:
                shards.append(upload_shard(store, prefix=prefix, writer=writer))
                report(force=True)
        finally:
            if writer is not None:
                writer.close()  # an interrupted shard's file goes with the folder
    return shards


def _images(
    make_session: sessionmaker[Session],
    store: ObjectStore,
    ids: list[str],
    pool: ThreadPoolExecutor,
) -> Iterator[tuple[Image, bytes]]:
    """The images and their bytes in shard order: READ_BATCH rows a query, their objects
    downloaded on the pool."""
    for batch in export_files.iter_batches(ids, READ_BATCH):
        with make_session() as session:
            rows = exports.images_by_ids(session=session, ids=batch)
        yield from zip(rows, pool.map(partial(read_image, store), rows), strict=True)


@app.task(name=EXPORT_TASK, bind=True, acks_late=True, ignore_result=True)
def export_dataset(self: Task, job_id: str, chunk_index: int) -> dict[str, Any]:
    """Run an export job (the database says what and whether)."""
    settings, worker, claim = claim_task_chunk(self, job_id, chunk_index)
    make_session = session_factory(settings.database_url)
    if claim is None:
        return {"job_id": job_id, "skipped": True}
    assert claim.dataset_id is not None
    store = object_store(settings)
    prefix = export_files.export_prefix(dataset_id=claim.dataset_id, job_id=job_id)
    progress = ExportProgress()
    log.info("export %s of dataset %s (attempt %s)", job_id, claim.dataset_id, claim.attempt)
    status, error, result = "succeeded", None, None
    try:
        with heartbeat(settings, job_id=job_id, index=chunk_index, worker=worker):
            result = run_export(settings, claim, progress)
    except Canceled:
        status = "canceled"
    except Exception as exc:
        log.exception("export %s failed", job_id)
        status, error = "failed", f"{type(exc).__name__}: {exc}"[:4000]
    if result is None:
        discard(store, prefix)
    with make_session() as session:
        if result is not None:
            # the result first: a client that sees `succeeded` finds the files listed
            engine.set_job_result(session=session, job_id=job_id, result=result)
        job_status = engine.finish_chunk(
            session=session,
            job_id=job_id,
            index=chunk_index,
            status=status,
            done=progress.samples,
            error=error,
        )
        if result is not None and job_status != JobStatus.SUCCEEDED:
            # canceled after the last shard was written: keep nothing, as for any cancel
            discard(store, prefix)
            engine.set_job_result(session=session, job_id=job_id, result=None)
    log.info("export %s %s with %s samples", job_id, job_status, progress.samples)
    return {"job_id": job_id, "status": job_status, "samples": progress.samples}
