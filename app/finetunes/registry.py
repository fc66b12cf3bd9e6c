"""The worker's side of a fine-tune: what a member trains on, its progress, checkpoints and
validation images, and registering its model when it finishes. Every function commits.

A member's model is registered in the transaction that finishes its chunk, with the job's row
locked and its status checked there: a fine-tune canceled a moment before never gets a model,
and a registered model never lacks its weights (they are uploaded first).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.orm import Session

from app import engine
from app.db.tables import FinetuneImage, FinetuneLoss, FinetuneMember, GeneratorModel, Job, utcnow
from app.schemas import JobStatus


@dataclass(frozen=True)
class MemberPlan:
    """What one member trains: its model id, conditions, and the images (with their store
    keys, conditions and skin types), in a stable order."""

    job_id: str
    index: int
    model_id: str
    conditions: list[str]
    images: list[FinetuneImage]
    checkpoint_key: str | None
    checkpoint_step: int | None
    samples: list[dict[str, Any]]


def member_plan(*, session: Session, job_id: str, index: int) -> MemberPlan:
    member = session.get(FinetuneMember, (job_id, index))
    if member is None:
        raise LookupError(f"fine-tune {job_id} has no member {index}")
    images = list(
        session.scalars(
            select(FinetuneImage)
            .where(FinetuneImage.job_id == job_id, FinetuneImage.index == index)
            .order_by(FinetuneImage.sha256, FinetuneImage.image_id)
        )
    )
    for image in images:
        session.expunge(image)
    return MemberPlan(
        job_id=job_id,
        index=index,
        model_id=member.model_id,
        conditions=list(member.conditions),
        images=images,
        checkpoint_key=member.checkpoint_key,
        checkpoint_step=member.checkpoint_step,
        samples=list(member.samples or []),
    )


def record_losses(
    *,
    session: Session,
    job_id: str,
    index: int,
    losses: list[tuple[int, float]],
    steps: int,
    images_per_s: float | None,
) -> None:
    """Store (step, loss) pairs and show the last as the member's progress (a heartbeat too)."""
    if not losses:
        return
    session.execute(
        insert(FinetuneLoss),
        [{"job_id": job_id, "index": index, "step": s, "loss": v} for s, v in losses],
    )
    step, loss = losses[-1]
    session.execute(
        update(FinetuneMember)
        .where(FinetuneMember.job_id == job_id, FinetuneMember.index == index)
        .values(loss=loss, images_per_s=images_per_s)
    )
    engine.record_step(session=session, job_id=job_id, index=index, step=step, steps=steps)


def forget_after(*, session: Session, job_id: str, index: int, step: int) -> None:
    """A resumed member trains the steps after its checkpoint again: their losses and
    validation images go (they are made again)."""
    session.execute(
        delete(FinetuneLoss).where(
            FinetuneLoss.job_id == job_id, FinetuneLoss.index == index, FinetuneLoss.step > step
        )
    )
    member = session.get(FinetuneMember, (job_id, index))
    if member is not None:
        member.samples = [s for s in member.samples or [] if s["step"] <= step]
    session.commit()


def record_checkpoint(*, session: Session, job_id: str, index: int, step: int, key: str) -> None:
    """The checkpoint at `step` is complete in the store under `key`: the member resumes there."""
    session.execute(
        update(FinetuneMember)
        .where(FinetuneMember.job_id == job_id, FinetuneMember.index == index)
        .values(checkpoint_key=key, checkpoint_step=step)
    )
    session.commit()


def record_samples(
    *, session: Session, job_id: str, index: int, samples: list[dict[str, Any]]
) -> None:
    """Replace the member's validation image list (each {step, prompt, seed, key})."""
    session.execute(
        update(FinetuneMember)
        .where(FinetuneMember.job_id == job_id, FinetuneMember.index == index)
        .values(samples=samples)
    )
    session.commit()


@dataclass(frozen=True)
class StoredWeights:
    """A trained model's files in the store, ready to register: a DreamBooth or LoRA member
    has one, a scratch member two (its text-to-image and its inpainting pipeline)."""

    model_id: str
    pipeline_class: str
    variant: str
    weights_key: str
    weights_sha256: str
    files: list[str]
    final_loss: float | None
    steps: int


def register_model(
    *,
    session: Session,
    job_id: str,
    index: int,
    weights: list[StoredWeights],
    summary: dict[str, Any] | None = None,
) -> str:
    """Register member `index`'s models and finish its chunk in one transaction, unless its job
    stopped meanwhile (then the chunk is closed canceled and nothing is registered). The
    member's own loss and hash are the first model's (for scratch: its text-to-image pipeline);
    `summary` is added to each model's training record. Returns the job's status."""
    job = session.get(Job, job_id, with_for_update={"key_share": True}, populate_existing=True)
    member = session.get(FinetuneMember, (job_id, index))
    if job is None or member is None:
        raise LookupError(f"no fine-tune member {job_id}/{index}")
    if job.status != JobStatus.RUNNING:
        return engine.finish_chunk(
            session=session,
            job_id=job_id,
            index=index,
            status="canceled",
            done=0,
            fail_fast=False,
        )
    params = job.params
    joint = bool(params.get("joint"))
    now = utcnow()
    # a fine-tune samples as its base model does (its sampler defaults); a scratch one has none
    base = session.get(GeneratorModel, params["base_model"]) if params.get("base_model") else None
    for stored in weights:
        training = {
            "method": params["method"],
            "variant": stored.variant,
            "conditions": list(member.conditions),
            "hyperparameters": params["hyperparameters"],
            "caption_skin_tone": params.get("caption_skin_tone", False),
            "train_images": member.train_images,
            "steps": stored.steps,
            "final_loss": stored.final_loss,
            "files": stored.files,
            "dataset": params["dataset"],
            **(summary or {}),
        }
        session.add(
            GeneratorModel(
                id=stored.model_id,
                path="",  # fine-tuned weights live in the object store, not on one machine
                pipeline_class=stored.pipeline_class,
                weights_sha256=stored.weights_sha256,
                weights_signature=None,
                description=_describe(params, member.conditions, variant=stored.variant),
                created_at=now,
                updated_at=now,
                owner_id=job.owner_id,
                finetune_id=job_id,
                finetune_index=index,
                family_id=params["family_id"],
                base_model_id=params["base_model"],
                condition=None if joint else member.conditions[0],
                weights_key=stored.weights_key,
                training=training,
                sampling_defaults=base.sampling_defaults if base is not None else None,
            )
        )
    member.final_loss = weights[0].final_loss
    member.weights_sha256 = weights[0].weights_sha256
    # a member that failed leaves the others going: the job settles when none is left
    return engine.finish_chunk(
        session=session,
        job_id=job_id,
        index=index,
        status="succeeded",
        done=1,
        fail_fast=False,
    )


def _describe(params: dict[str, Any], conditions: list[str], *, variant: str) -> str:
    where = f"on {', '.join(conditions)} from dataset {params['dataset']}"
    if params["method"] == "scratch":
        return f"Trained from scratch ({variant}) {where}"
    what = "LoRA" if params["method"] == "lora" else "DreamBooth"
    return f"{what} ({variant}) of {params['base_model']} {where}"
