"""The generation task: one chunk of a job, images [start, stop), on the `gpu` queue.

A chunk that runs twice (worker killed, broker redelivery, recovery) writes the same
deterministic keys and rows: images already stored are skipped, an object is stored before its
row, and rows are upserted. PNG encoding and upload run in a thread pool while the next batch
samples.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery import Task
from PIL import Image as PILImage

from app import datasets, jobs
from app.broker import GENERATE_TASK, send_generate_chunk
from app.config import Settings, get_settings
from app.db.session import session_factory
from app.db.tables import utcnow
from app.ids import image_seed, synthetic_image_id
from app.schemas import JobStatus
from app.storage import ObjectStore, image_key, make_store
from app.vocabulary import get_condition, get_model
from workers.celery_app import app

log = logging.getLogger(__name__)


class ChunkCanceled(Exception):
    """The job was canceled while the chunk ran."""


@dataclass(frozen=True)
class ChunkOutcome:
    status: str
    done: int


_state_lock = threading.Lock()
_pipelines: Any = None
_store: ObjectStore | None = None


def pipeline_cache(settings: Settings) -> Any:
    """The worker's one PipelineCache (models are loaded once per process)."""
    global _pipelines
    with _state_lock:
        if _pipelines is None:
            from models.pipelines import PipelineCache, resolve_device

            _pipelines = PipelineCache(
                device=resolve_device(settings.device), max_models=settings.pipeline_cache_size
            )
        return _pipelines


def object_store(settings: Settings) -> ObjectStore:
    global _store
    with _state_lock:
        if _store is None:
            _store = make_store(settings)
        return _store


def worker_name(task: Task) -> str:
    return f"{task.request.hostname or socket.gethostname()}:{os.getpid()}"


@contextmanager
def heartbeat(settings: Settings, *, job_id: str, index: int, worker: str) -> Iterator[None]:
    """Touch the chunk's heartbeat every `heartbeat_interval_s` while the body runs."""
    stop = threading.Event()
    make_session = session_factory(settings.database_url)

    def beat() -> None:
        while not stop.wait(settings.heartbeat_interval_s):
            try:
                with make_session() as session:
                    jobs.heartbeat(session=session, job_id=job_id, index=index, worker=worker)
            except Exception:
                log.exception("heartbeat of chunk %s/%s failed", job_id, index)

    thread = threading.Thread(target=beat, name="synthderm-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def encode_png(image: PILImage.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _store_image(store: ObjectStore, key: str, image: PILImage.Image) -> tuple[str, int]:
    data = encode_png(image)
    store.put_bytes(key, data, content_type="image/png")
    return hashlib.sha256(data).hexdigest(), len(data)


def run_chunk(settings: Settings, claim: jobs.ChunkClaim, worker: str) -> ChunkOutcome:
    """Generate the chunk's missing images; raises ChunkCanceled through its outcome."""
    import diffusers
    import torch

    from models.text_to_image import SampleParams, build_prompt, default_size, generate

    make_session = session_factory(settings.database_url)
    store = object_store(settings)

    # 1. what is already stored (a rerun skips it)
    with make_session() as session:
        existing = datasets.images_of_job_range(
            session=session, job_id=claim.job_id, start=claim.start, stop=claim.stop
        )
        model = get_model(session=session, model_id=claim.model_id)
        condition = get_condition(session=session, slug=claim.condition)
        if model is None or condition is None:
            raise RuntimeError(
                f"model {claim.model_id!r} or condition {claim.condition!r} vanished"
            )
        model_path = settings.resolved_models_dir / model.id
        if not (model_path / "model_index.json").is_file():
            model_path = Path(model.path)
    done = {i for i, row in existing.items() if store.head(row.storage_key) is not None}
    if len(done) == claim.stop - claim.start:
        return ChunkOutcome("succeeded", len(done))

    # 2. the pipeline (kept loaded between tasks)
    loaded = pipeline_cache(settings).get(model.id, model_path)
    pipe = loaded.pipeline
    width, height = default_size(pipe)
    params = SampleParams(
        prompt=build_prompt(
            condition_name=condition.name,
            skin_tone=claim.skin_tone,
            template=settings.prompt_template,
            suffix=settings.skin_tone_prompt_suffix,
        ),
        negative_prompt=claim.params.get("negative_prompt"),
        num_inference_steps=int(
            claim.params.get("num_inference_steps", settings.default_num_inference_steps)
        ),
        guidance_scale=float(claim.params.get("guidance_scale", settings.default_guidance_scale)),
        width=int(claim.params.get("width", width)),
        height=int(claim.params.get("height", height)),
    )
    batch_size = settings.generation_batch_size
    # Batches are fixed groups of indices, so a rerun samples each image in the same batch as
    # the first run did: the same bytes (numerics depend on the batch, PAPER.md section 2).
    batches = [
        list(range(first, min(first + batch_size, claim.stop)))
        for first in range(claim.start, claim.stop, batch_size)
    ]
    provenance = {
        "model_id": model.id,
        "model_path": str(model_path),
        "pipeline_class": type(pipe).__name__,
        "scheduler": type(pipe.scheduler).__name__,
        "device": str(loaded.device),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "batch_size": batch_size,
        "diffusers_version": diffusers.__version__,
        "torch_version": torch.__version__,
        "job_seed": claim.seed,
        "worker": worker,
    }

    # 3. sample batch by batch; encode and upload overlap the next batch
    pending: list[tuple[int, int, str, Future[tuple[str, int]]]] = []
    written = len(done)
    last_progress = 0.0

    def write_rows(wait_all: bool) -> None:
        nonlocal written, last_progress
        ready = [p for p in pending if wait_all or p[3].done()]
        if not ready:
            return
        with make_session() as session:
            for index, seed, key, future in ready:
                sha256, size = future.result()  # the object is stored before its row
                datasets.upsert_image(
                    session=session,
                    values={
                        "id": synthetic_image_id(claim.job_id, index),
                        "dataset_id": claim.dataset_id,
                        "job_id": claim.job_id,
                        "index": index,
                        "source": "synthetic",
                        "condition": claim.condition,
                        "skin_tone": claim.skin_tone,
                        "strategy": claim.strategy,
                        "model_id": model.id,
                        "prompt": params.prompt,
                        "negative_prompt": params.negative_prompt,
                        "seed": seed,
                        "steps": params.num_inference_steps,
                        "guidance_scale": params.guidance_scale,
                        "width": params.width,
                        "height": params.height,
                        "sha256": sha256,
                        "size_bytes": size,
                        "storage_key": key,
                        "parent_image_id": None,
                        "provenance": provenance,
                        "created_at": utcnow(),
                    },
                )
            session.commit()
            for item in ready:
                pending.remove(item)
            written += len(ready)
            now = time.monotonic()
            if wait_all or now - last_progress >= settings.progress_update_interval_s:
                jobs.record_progress(
                    session=session, job_id=claim.job_id, index=claim.index, done=written
                )
                last_progress = now

    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="synthderm-upload") as pool:
        try:
            for indices in batches:
                if done.issuperset(indices):
                    continue
                with make_session() as session:
                    if jobs.job_status(session=session, job_id=claim.job_id) != JobStatus.RUNNING:
                        raise ChunkCanceled()
                seeds = [image_seed(claim.seed, i) for i in indices]
                with loaded.lock:  # one sampler call at a time per pipeline
                    images = generate(pipe, params=params, seeds=seeds, device=loaded.device)
                for index, seed, image in zip(indices, seeds, images, strict=True):
                    if index in done:
                        continue
                    image_id = synthetic_image_id(claim.job_id, index)
                    key = image_key(
                        dataset_id=claim.dataset_id, condition=claim.condition, image_id=image_id
                    )
                    pending.append((index, seed, key, pool.submit(_store_image, store, key, image)))
                write_rows(wait_all=False)
        except ChunkCanceled:
            write_rows(wait_all=True)
            return ChunkOutcome("canceled", written)
        write_rows(wait_all=True)
    return ChunkOutcome("succeeded", written)


@app.task(name=GENERATE_TASK, bind=True, acks_late=True, ignore_result=True)
def generate_chunk(self: Task, job_id: str, chunk_index: int) -> dict[str, Any]:
    """Run one chunk of a generation job (the database says what and whether)."""
    settings = get_settings()
    make_session = session_factory(settings.database_url)
    worker = worker_name(self)
    with make_session() as session:
        claim = jobs.claim_chunk(
            session=session, settings=settings, job_id=job_id, index=chunk_index, worker=worker
        )
    if claim is None:
        return {"job_id": job_id, "chunk": chunk_index, "skipped": True}
    log.info(
        "chunk %s/%s: images %s..%s (attempt %s)",
        job_id,
        chunk_index,
        claim.start,
        claim.stop - 1,
        claim.attempt,
    )
    try:
        with heartbeat(settings, job_id=job_id, index=chunk_index, worker=worker):
            outcome = run_chunk(settings, claim, worker)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"[:4000]
        log.exception("chunk %s/%s failed (attempt %s)", job_id, chunk_index, claim.attempt)
        if claim.attempt <= settings.task_max_retries:
            # Back off, then send a plain message: an ETA retry would run in Celery's timer
            # thread on the embedded transport, beside the task the main thread is running.
            time.sleep(min(30.0, 2.0 ** (claim.attempt - 1)))
            with make_session() as session:
                jobs.release_for_retry(
                    session=session, job_id=job_id, index=chunk_index, error=error
                )
            send_generate_chunk(settings, job_id=job_id, chunk_index=chunk_index)
            return {"job_id": job_id, "chunk": chunk_index, "status": "retrying"}
        with make_session() as session:
            jobs.finish_chunk(
                session=session,
                job_id=job_id,
                index=chunk_index,
                status="failed",
                done=None,
                error=error,
            )
        return {"job_id": job_id, "chunk": chunk_index, "status": "failed"}
    with make_session() as session:
        status = jobs.finish_chunk(
            session=session,
            job_id=job_id,
            index=chunk_index,
            status=outcome.status,
            done=outcome.done,
        )
    log.info(
        "chunk %s/%s %s with %s images; job %s",
        job_id,
        chunk_index,
        outcome.status,
        outcome.done,
        status,
    )
    return {"job_id": job_id, "chunk": chunk_index, "status": outcome.status, "done": outcome.done}
