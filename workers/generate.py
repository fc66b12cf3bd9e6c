"""The generation task: one chunk of a job, images [start, stop), on the `gpu` queue (the
sampling it shares with regeneration is workers/sampling.py). It validates no request
(app/generation/ did) and decides no job state (app/engine does).

A chunk that runs twice (worker killed, broker redelivery, recovery) writes the same
deterministic keys and rows: images already stored are skipped, an object is stored before its
row, and rows are upserted. PNG encoding and upload run in a thread pool while the next batch
samples.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery import Task
from PIL import Image as PILImage

from app import engine
from app.broker import GENERATE_TASK, send_chunk
from app.config import Settings
from app.datasets import repository as datasets
from app.db.session import session_factory
from app.db.tables import GeneratorModel, utcnow
from app.ids import image_seed, synthetic_image_id
from app.schemas.jobs import GenerationParams
from app.storage import ObjectStore, image_key
from app.vocabulary import get_model, job_condition
from workers.celery_app import app
from workers.chunk_task import Canceled, claim_task_chunk, heartbeat, job_stopped, object_store
from workers.generators import load_generator
from workers.sampling import (
    BatchLimit,
    ParentImages,
    batch_limit,
    encode_png,
    fixed_batches,
    sample_batch,
    sample_params,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChunkOutcome:
    status: str
    done: int


def _store_image(store: ObjectStore, key: str, image: PILImage.Image) -> tuple[str, int]:
    data = encode_png(image)
    store.put_bytes(key, data, content_type="image/png")
    return hashlib.sha256(data).hexdigest(), len(data)


class StepControl:
    """The per-step callback: heartbeat and step progress (throttled), cancel at the next step."""

    def __init__(self, settings: Settings, *, job_id: str, index: int, worker: str) -> None:
        self.settings = settings
        self.job_id = job_id
        self.index = index
        self.worker = worker
        self.canceled = False
        self._last = 0.0

    def __call__(self, step: int, total: int) -> bool:
        now = time.monotonic()
        if now - self._last < self.settings.step_update_interval_s and step < total:
            return self.canceled
        self._last = now
        with session_factory(self.settings.database_url)() as session:
            engine.record_step(
                session=session, job_id=self.job_id, index=self.index, step=step, steps=total
            )
            self.canceled = job_stopped(session=session, job_id=self.job_id)
        return self.canceled


class ChunkWriter:
    """The rows of a chunk's new images: each PNG encoded and stored in the pool, its row
    upserted once its object is stored (an object before its row); progress throttled."""

    def __init__(
        self,
        settings: Settings,
        claim: engine.ChunkClaim,
        *,
        params: Any,
        model_id: str,
        parents: ParentImages,
        pool: ThreadPoolExecutor,
        written: int,
    ) -> None:
        self.settings = settings
        self.claim = claim
        self.params = params
        self.model_id = model_id
        self.parents = parents
        self.pool = pool
        self.written = written
        self.pending: list[tuple[int, dict[str, Any], str, Future[tuple[str, int]]]] = []
        self._last_progress = 0.0

    def submit(self, index: int, image: PILImage.Image, provenance: dict[str, Any]) -> None:
        """Start storing image `index`; its row waits for `write`."""
        assert self.claim.dataset_id and self.claim.condition
        key = image_key(
            dataset_id=self.claim.dataset_id,
            condition=self.claim.condition,
            image_id=synthetic_image_id(self.claim.job_id, index),
        )
        future = self.pool.submit(_store_image, object_store(self.settings), key, image)
        self.pending.append((index, provenance, key, future))

    def write(self, *, wait_all: bool) -> None:
        """Upsert the rows of the images stored so far (all of them, waiting, if `wait_all`)."""
        ready = [p for p in self.pending if wait_all or p[3].done()]
        if not ready:
            return
        with session_factory(self.settings.database_url)() as session:
            for index, provenance, key, future in ready:
                sha256, size = future.result()  # the object is stored before its row
                datasets.upsert_image(
                    session=session, values=self._row(index, provenance, key, sha256, size)
                )
            session.commit()
            for item in ready:
                self.pending.remove(item)
            self.written += len(ready)
            now = time.monotonic()
            if wait_all or now - self._last_progress >= self.settings.progress_update_interval_s:
                engine.record_progress(
                    session=session,
                    job_id=self.claim.job_id,
                    index=self.claim.index,
                    done=self.written,
                )
                self._last_progress = now

    def _row(
        self, index: int, provenance: dict[str, Any], key: str, sha256: str, size: int
    ) -> dict[str, Any]:
        claim, params = self.claim, self.params
        return {
            "id": synthetic_image_id(claim.job_id, index),
            "dataset_id": claim.dataset_id,
            "job_id": claim.job_id,
            "index": index,
            "source": "synthetic",
            "condition": claim.condition,
            "skin_tone": claim.skin_tone,
            "strategy": claim.strategy,
            "model_id": self.model_id,
            "prompt": params.prompt,
            "negative_prompt": params.negative_prompt,
            "seed": provenance["seed"],
            "steps": params.num_inference_steps,
            "guidance_scale": params.guidance_scale,
            "width": params.width,
            "height": params.height,
            "sha256": sha256,
            "size_bytes": size,
            "storage_key": key,
            "parent_image_id": self.parents.image_id(index),
            "provenance": provenance,
            "created_at": utcnow(),
        }


def _chunk_state(
    settings: Settings, claim: engine.ChunkClaim
) -> tuple[set[int], GeneratorModel, Any]:
    """The chunk's images already stored (a rerun skips them), its model and its condition."""
    assert claim.condition and claim.model_id
    store = object_store(settings)
    with session_factory(settings.database_url)() as session:
        existing = datasets.images_of_job_range(
            session=session, job_id=claim.job_id, start=claim.start, stop=claim.stop
        )
        model = get_model(session=session, model_id=claim.model_id)
        # the condition in the words of the job's owner (an uploaded label is the key's own)
        condition = job_condition(session=session, job_id=claim.job_id)
        if model is None or condition is None:
            raise RuntimeError(
                f"model {claim.model_id!r} or condition {claim.condition!r} vanished"
            )
    done = {i for i, row in existing.items() if store.head(row.storage_key) is not None}
    return done, model, condition


def _common_provenance(
    claim: engine.ChunkClaim,
    *,
    model: GeneratorModel,
    path: Path,
    loaded: Any,
    params: Any,
    k: int,
    worker: str,
) -> dict[str, Any]:
    """The provenance every image of the chunk shares."""
    import diffusers
    import torch

    return {
        "model_id": model.id,
        "model_path": str(path),
        "weights_sha256": model.weights_sha256,
        # a fine-tuned model's base and fine-tune (its lineage: GET /finetunes/{id})
        **(
            {"base_model_id": model.base_model_id, "finetune_id": model.finetune_id}
            if model.finetune_id
            else {}
        ),
        "pipeline_class": type(loaded.pipeline).__name__,
        "scheduler": type(loaded.pipeline.scheduler).__name__,
        "device": str(loaded.device),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "diffusers_version": diffusers.__version__,
        "torch_version": torch.__version__,
        "job_seed": claim.seed,
        "synthetic_per_real": k,
        "worker": worker,
        **params.provenance(),
    }


def _sample_group(
    group: list[int],
    *,
    sample: Callable[[list[int]], list[PILImage.Image]],
    limit: BatchLimit,
    done: set[int],
    writer: ChunkWriter,
    provenance: Callable[[int, list[int]], dict[str, Any]],
) -> None:
    """Sample one fixed group in batches of the current limit; hand each new image to `writer`."""
    from models import strategies

    first = 0
    while first < len(group):
        # the limit may shrink inside a batch (out of memory): step by what was taken, not by
        # the limit of the group's start, or the images between the two are never sampled
        sub = group[first : first + limit.limit]
        for batch, images in strategies.generate_adaptive(sample, sub, on_oom=limit.shrink):
            for index, image in zip(batch, images, strict=True):
                if index not in done:
                    writer.submit(index, image, provenance(index, batch))
        writer.write(wait_all=False)
        first += len(sub)


def run_chunk(settings: Settings, claim: engine.ChunkClaim, worker: str) -> ChunkOutcome:
    """Generate the chunk's missing images; a cancel ends it as `canceled`."""
    import torch

    from models import strategies

    assert claim.dataset_id and claim.condition and claim.strategy and claim.model_id

    # 1. what is already stored (a rerun skips it)
    done, model, condition = _chunk_state(settings, claim)
    if len(done) == claim.stop - claim.start:
        return ChunkOutcome("succeeded", len(done))

    # 2. the pipeline (kept loaded between tasks), the parameters and the parents
    generator = load_generator(settings, model)
    loaded, path = generator.loaded, generator.path
    job = GenerationParams.model_validate(claim.params)
    params = sample_params(
        settings,
        strategy=claim.strategy,
        condition_name=condition.name,
        skin_tone=claim.skin_tone,
        options=job,
        pipeline=loaded.pipeline,
        model_defaults=model.sampling_defaults,
    )
    k = job.synthetic_per_real
    parents = ParentImages(settings, job_id=claim.job_id, k=k, size=params.width)
    if job.source_dataset:
        parents.load_rows(range(claim.start, claim.stop))
    control = StepControl(settings, job_id=claim.job_id, index=claim.index, worker=worker)
    common = _common_provenance(
        claim, model=model, path=path, loaded=loaded, params=params, k=k, worker=worker
    )

    def provenance(index: int, batch: list[int]) -> dict[str, Any]:
        return {
            **common,
            "seed": image_seed(claim.seed, index),
            "batch_indices": batch,
            "batch_size": len(batch),
            "parent_position": index // k if parents.image_id(index) else None,
        }

    def sample(indices: list[int]) -> list[PILImage.Image]:
        if settings.fault_oom_above_batch and len(indices) > settings.fault_oom_above_batch:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected by settings)")
        return sample_batch(
            loaded,
            params,
            job_seed=claim.seed,
            indices=indices,
            parents=parents,
            on_step=control,
            adapter=generator.adapter,
        )

    # 3. sample batch by batch; encode and upload overlap the next batch
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="synthderm-upload") as pool:
        writer = ChunkWriter(
            settings, claim, params=params, model_id=model.id, parents=parents, pool=pool,
            written=len(done),
        )  # fmt: skip
        try:
            for group in fixed_batches(claim.start, claim.stop, settings.generation_batch_size):
                if done.issuperset(group):
                    continue
                if control.canceled or not _job_running(settings, claim.job_id):
                    raise Canceled()
                _sample_group(
                    group, sample=sample, limit=batch_limit(settings), done=done, writer=writer,
                    provenance=provenance,
                )  # fmt: skip
        except (Canceled, strategies.Interrupted):
            writer.write(wait_all=True)
            return ChunkOutcome("canceled", writer.written)
        writer.write(wait_all=True)
    return ChunkOutcome("succeeded", writer.written)


def _job_running(settings: Settings, job_id: str) -> bool:
    with session_factory(settings.database_url)() as session:
        return not job_stopped(session=session, job_id=job_id)


@app.task(name=GENERATE_TASK, bind=True, acks_late=True, ignore_result=True)
def generate_chunk(self: Task, job_id: str, chunk_index: int) -> dict[str, Any]:
    """Run one chunk of a generation job (the database says what and whether)."""
    settings, worker, claim = claim_task_chunk(self, job_id, chunk_index)
    make_session = session_factory(settings.database_url)
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
                engine.release_for_retry(
                    session=session, job_id=job_id, index=chunk_index, error=error
                )
            send_chunk(settings, kind="generate", job_id=job_id, chunk_index=chunk_index)
            return {"job_id": job_id, "chunk": chunk_index, "status": "retrying"}
        with make_session() as session:
            engine.finish_chunk(
                session=session,
                job_id=job_id,
                index=chunk_index,
                status="failed",
                done=None,
                error=error,
            )
        return {"job_id": job_id, "chunk": chunk_index, "status": "failed"}
    with make_session() as session:
        status = engine.finish_chunk(
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
