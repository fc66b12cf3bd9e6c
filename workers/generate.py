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
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery import Task
from PIL import Image as PILImage

from app import engine
from app.broker import GENERATE_TASK, send_generate_chunk
from app.config import Settings
from app.datasets import repository as datasets
from app.db.session import session_factory
from app.db.tables import utcnow
from app.ids import image_seed, synthetic_image_id
from app.storage import ObjectStore, image_key
from app.vocabulary import get_condition, get_model
from workers.celery_app import app
from workers.chunk_task import Canceled, claim_task_chunk, heartbeat, job_stopped, object_store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChunkOutcome:
    status: str
    done: int


_state_lock = threading.Lock()
_pipelines: Any = None


def pipeline_cache(settings: Settings) -> Any:
    """The worker's one PipelineCache (models are loaded once per process)."""
    global _pipelines
    with _state_lock:
        if _pipelines is None:
            from models.devices import resolve_device
            from models.pipelines import PipelineCache

            _pipelines = PipelineCache(
                device=resolve_device(settings.device),
                max_models=settings.pipeline_cache_size,
                memory_budget_bytes=int(settings.pipeline_memory_budget_gb * 2**30),
                compile_unet=settings.torch_compile,
            )
        return _pipelines


def encode_png(image: PILImage.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _store_image(store: ObjectStore, key: str, image: PILImage.Image) -> tuple[str, int]:
    data = encode_png(image)
    store.put_bytes(key, data, content_type="image/png")
    return hashlib.sha256(data).hexdigest(), len(data)


def sample_params(
    settings: Settings,
    *,
    strategy: str,
    condition_name: str,
    skin_tone: int | None,
    job_params: dict[str, Any],
    pipeline: Any,
) -> Any:
    """The SampleParams of a job: its own values, else the settings' and the paper's."""
    from models import strategies

    width, height = strategies.default_size(pipeline)
    return strategies.SampleParams(
        strategy=strategy,
        prompt=strategies.build_prompt(
            condition_name=condition_name,
            skin_tone=skin_tone,
            template=settings.prompt_template,
            suffix=settings.skin_tone_prompt_suffix,
        ),
        negative_prompt=job_params.get("negative_prompt"),
        num_inference_steps=int(
            job_params.get("num_inference_steps", settings.default_num_inference_steps)
        ),
        guidance_scale=float(job_params.get("guidance_scale", settings.default_guidance_scale)),
        width=int(job_params.get("width", width)),
        height=int(job_params.get("height", height)),
        strength=job_params.get("strength"),
        outpaint_strength=float(
            job_params.get("outpaint_strength", strategies.DEFAULT_OUTPAINT_STRENGTH)
        ),
        mask_fraction=float(job_params.get("mask_fraction", strategies.DEFAULT_MASK_FRACTION)),
        frame_px=int(job_params.get("frame_px", strategies.DEFAULT_FRAME_PX)),
    )


class ParentImages:
    """The real parents of a job's images, read from the store and prepared once each."""

    def __init__(self, settings: Settings, *, job_id: str, k: int, size: int) -> None:
        self.settings = settings
        self.job_id = job_id
        self.k = k
        self.size = size
        self._rows: dict[int, Any] = {}
        self._images: dict[int, PILImage.Image] = {}

    def load_rows(self, indices: range | list[int]) -> None:
        positions = sorted({i // self.k for i in indices})
        with session_factory(self.settings.database_url)() as session:
            self._rows.update(
                datasets.parents_of_job(session=session, job_id=self.job_id, positions=positions)
            )

    def image_id(self, index: int) -> str | None:
        row = self._rows.get(index // self.k)
        return row.id if row is not None else None

    def image(self, index: int) -> PILImage.Image:
        from models.parents import load_parent

        position = index // self.k
        if position not in self._images:
            row = self._rows.get(position)
            if row is None:
                raise RuntimeError(f"job {self.job_id} has no parent at position {position}")
            data = object_store(self.settings).get_bytes(row.storage_key)
            self._images[position] = load_parent(data, size=self.size)
        return self._images[position]


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


class BatchLimit:
    """The largest batch this process can sample; halved on out-of-memory, for good."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def shrink(self, tried: int, new: int) -> None:
        log.warning("out of memory at batch %s: retrying with batch %s", tried, new)
        self.limit = min(self.limit, new)


_batch_limit: BatchLimit | None = None


def batch_limit(settings: Settings) -> BatchLimit:
    global _batch_limit
    with _state_lock:
        if _batch_limit is None:
            _batch_limit = BatchLimit(settings.generation_batch_size)
        return _batch_limit


def fixed_batches(start: int, stop: int, size: int) -> list[list[int]]:
    """Fixed groups of indices: a rerun samples each image in the same batch as before (the
    exact bytes depend on the batch)."""
    return [list(range(first, min(first + size, stop))) for first in range(start, stop, size)]


def run_chunk(settings: Settings, claim: engine.ChunkClaim, worker: str) -> ChunkOutcome:
    """Generate the chunk's missing images; a cancel ends it as `canceled`."""
    import diffusers
    import torch

    from models import strategies

    make_session = session_factory(settings.database_url)
    store = object_store(settings)
    assert claim.dataset_id and claim.condition and claim.strategy and claim.model_id

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

    # 2. the pipeline (kept loaded between tasks), the parameters and the parents
    loaded = pipeline_cache(settings).get(model.id, model_path)
    params = sample_params(
        settings,
        strategy=claim.strategy,
        condition_name=condition.name,
        skin_tone=claim.skin_tone,
        job_params=claim.params,
        pipeline=loaded.pipeline,
    )
    k = int(claim.params.get("synthetic_per_real", 1))
    parents = ParentImages(settings, job_id=claim.job_id, k=k, size=params.width)
    if claim.params.get("source_dataset"):
        parents.load_rows(range(claim.start, claim.stop))
    edits = claim.strategy in strategies.EDITS_PARENT
    img2img = (
        loaded.variant("img2img", strategies.image_to_image_pipeline)
        if (claim.strategy == strategies.IMAGE_TO_IMAGE)
        else None
    )
    control = StepControl(settings, job_id=claim.job_id, index=claim.index, worker=worker)
    limit = batch_limit(settings)
    common_provenance = {
        "model_id": model.id,
        "model_path": str(model_path),
        "weights_sha256": model.weights_sha256,
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

    def sample(indices: list[int]) -> list[PILImage.Image]:
        if settings.fault_oom_above_batch and len(indices) > settings.fault_oom_above_batch:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected by settings)")
        with loaded.lock:  # one sampler call at a time per pipeline
            return strategies.generate(
                loaded.pipeline,
                params=params,
                seeds=[image_seed(claim.seed, i) for i in indices],
                device=loaded.device,
                parents=[parents.image(i) for i in indices] if edits else None,
                on_step=control,
                img2img=img2img,
            )

    # 3. sample batch by batch; encode and upload overlap the next batch
    pending: list[tuple[int, dict[str, Any], str, Future[tuple[str, int]]]] = []
    written = len(done)
    last_progress = 0.0

    def write_rows(wait_all: bool) -> None:
        nonlocal written, last_progress
        ready = [p for p in pending if wait_all or p[3].done()]
        if not ready:
            return
        with make_session() as session:
            for index, provenance, key, future in ready:
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
                        "seed": provenance["seed"],
                        "steps": params.num_inference_steps,
                        "guidance_scale": params.guidance_scale,
                        "width": params.width,
                        "height": params.height,
                        "sha256": sha256,
                        "size_bytes": size,
                        "storage_key": key,
                        "parent_image_id": parents.image_id(index),
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
                engine.record_progress(
                    session=session, job_id=claim.job_id, index=claim.index, done=written
                )
                last_progress = now

    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="synthderm-upload") as pool:
        try:
            for group in fixed_batches(claim.start, claim.stop, settings.generation_batch_size):
                if done.issuperset(group):
                    continue
                if control.canceled or not _job_running(settings, claim.job_id):
                    raise Canceled()
                for first in range(0, len(group), limit.limit):
                    sub = group[first : first + limit.limit]
                    for batch, images in strategies.generate_adaptive(
                        sample, sub, on_oom=limit.shrink
                    ):
                        for index, image in zip(batch, images, strict=True):
                            if index in done:
                                continue
                            provenance = {
                                **common_provenance,
                                "seed": image_seed(claim.seed, index),
                                "batch_indices": batch,
                                "batch_size": len(batch),
                                "parent_position": index // k if parents.image_id(index) else None,
                            }
                            key = image_key(
                                dataset_id=claim.dataset_id,
                                condition=claim.condition,
                                image_id=synthetic_image_id(claim.job_id, index),
                            )
                            future = pool.submit(_store_image, store, key, image)
                            pending.append((index, provenance, key, future))
                    write_rows(wait_all=False)
        except (Canceled, strategies.Interrupted):
            write_rows(wait_all=True)
            return ChunkOutcome("canceled", written)
        write_rows(wait_all=True)
    return ChunkOutcome("succeeded", written)


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
            send_generate_chunk(settings, job_id=job_id, chunk_index=chunk_index)
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
