"""Fine-tuning: the task that trains one member of a fine-tune (`gpu` queue) and registers its
model (a `method: scratch` member goes to workers/scratch.py).

Thin: the loop is models/finetune.py, the bookkeeping app/finetunes/registry.py. What this task
adds is the plumbing (workers/finetune_member.py): the member's images from the store, captions
in the owner's words, checkpoints to the store (a restarted task resumes from the latest),
validation images, the loss per step, the cancel check, the weights uploaded and hashed, then
the model registered in the transaction that finishes the chunk.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from celery import Task

from app import engine
from app.broker import FINETUNE_TASK
from app.config import Settings
from app.db.session import session_factory
from app.finetunes import registry
from app.vocabulary import get_model
from workers.celery_app import app
from workers.chunk_task import Canceled, claim_task_chunk, heartbeat, object_store
from workers.finetune_member import MemberProgress, Trained, start_member, upload_weights
from workers.generators import FINETUNED_PARTS, local_pipeline_dir
from workers.scratch import train_scratch_member

log = logging.getLogger(__name__)


def train_member(settings: Settings, claim: engine.ChunkClaim) -> Trained:
    """Train member `claim.index` from its latest checkpoint (or the start), upload its weights
    and register its model. Canceled if the fine-tune is canceled meanwhile."""
    import torch

    from models.devices import resolve_device
    from models.finetune import FinetuneConfig, save_trained, train
    from models.pipelines import load_pipeline

    # 1. what this member trains, from where it stopped, and the model it starts from
    start = start_member(settings, claim, kind=claim.params["method"])
    plan, resume, images = start.plan, start.resume, start.images
    with session_factory(settings.database_url)() as session:
        base = get_model(session=session, model_id=claim.params["base_model"])
        if base is None:
            raise LookupError(f"the base model {claim.params['base_model']} is gone")
        session.expunge(base)
    store = object_store(settings)

    # 2. the base pipeline, in full precision, of this process alone (training changes it)
    device = resolve_device(settings.device)
    pipeline = load_pipeline(local_pipeline_dir(settings, base), device=device, dtype=torch.float32)
    params = claim.params
    hyper = dict(params["hyperparameters"])
    hyper["lora_alpha"] = hyper["lora_alpha"] or float(hyper["lora_rank"])  # null: the rank
    hyper["lora_target_modules"] = tuple(hyper["lora_target_modules"])
    config = FinetuneConfig(
        # each model its own random streams (noise, augmentation, masks), reproducible from the
        # fine-tune's seed
        method=params["method"],
        variant=params["variant"],
        seed=claim.seed + claim.index,
        **hyper,
    )
    progress = MemberProgress(settings, plan)
    captions = sorted({image.caption for image in images})
    result = train(
        pipeline,
        images,
        config,
        device=device,
        resume=resume,
        on_step=progress.on_step,
        on_checkpoint=progress.on_checkpoint,
        on_validation=progress.on_validation,
        should_stop=progress.should_stop,
        validation_prompts=captions[: max(config.validation_images, 1)],
    )
    progress.flush()
    if result.stopped:
        raise Canceled()

    # 3. the weights to the store (a DreamBooth model keeps only its UNet), then the model
    with tempfile.TemporaryDirectory(prefix="synthderm-finetune-") as tmp:
        out = Path(tmp) / "model"
        save_trained(pipeline, config, out)
        keep = _stored_files(out, lora=config.method == "lora")
        staging = Path(tmp) / "stored"
        for name in keep:
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).rename(staging / name)
        prefix, sha = upload_weights(store, staging, keep, model_id=plan.model_id)
    stored = registry.StoredWeights(
        model_id=plan.model_id,
        pipeline_class=type(pipeline).__name__,
        variant=params["variant"],
        weights_key=prefix,
        weights_sha256=sha,
        files=keep,
        final_loss=result.final_loss,
        steps=result.steps,
    )
    with session_factory(settings.database_url)() as session:
        status = registry.register_model(
            session=session, job_id=claim.job_id, index=claim.index, weights=[stored]
        )
    progress.drop_checkpoint()
    return Trained(plan.model_id, status)


def _stored_files(folder: Path, *, lora: bool) -> list[str]:
    """The files of a saved model that the store keeps (relative paths)."""
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    if lora:
        return files
    return [f for f in files if f.split("/", 1)[0] in FINETUNED_PARTS]


@app.task(name=FINETUNE_TASK, bind=True, acks_late=True, ignore_result=True)
def finetune_member(self: Task, job_id: str, chunk_index: int) -> dict[str, Any]:
    """Train one member of a fine-tune (the database says which and whether)."""
    settings, worker, claim = claim_task_chunk(self, job_id, chunk_index)
    if claim is None:
        return {"job_id": job_id, "skipped": True}
    status, error = "succeeded", None
    trained: Trained | None = None
    try:
        with heartbeat(settings, job_id=job_id, index=chunk_index, worker=worker):
            if claim.params["method"] == "scratch":
                trained = train_scratch_member(settings, claim)
            else:
                trained = train_member(settings, claim)
    except Canceled:
        status = "canceled"
    except Exception as exc:
        log.exception("fine-tune %s member %s failed", job_id, chunk_index)
        status, error = "failed", _error_text(exc)
    if trained is not None:  # registered (or closed canceled) in its finishing transaction
        return {"job_id": job_id, "model": trained.model_id, "status": trained.job_status}
    with session_factory(settings.database_url)() as session:
        # one model failing leaves the others training (their models are registered); the
        # fine-tune settles failed once none is left
        job_status = engine.finish_chunk(
            session=session,
            job_id=job_id,
            index=chunk_index,
            status=status,
            done=0,
            error=error,
            fail_fast=False,
        )
    log.info("fine-tune %s member %s %s", job_id, chunk_index, status)
    return {"job_id": job_id, "status": job_status}


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:4000]
