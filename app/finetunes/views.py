"""Row -> schema: the public view of a fine-tune, its members, samples, losses and models."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app import engine
from app.db.tables import FinetuneLoss, FinetuneMember, GeneratorModel, Job, JobChunk
from app.finetunes.service import members_of
from app.schemas import JobStatus
from app.schemas.catalog import ModelOut
from app.schemas.finetunes import (
    SCRATCH_STAGES,
    FinetuneMemberOut,
    FinetuneOut,
    FinetuneProgress,
    FinetuneSample,
    ModelTraining,
    ScratchStage,
    TrainingData,
)
from app.storage import ObjectStore


def _chunks(session: Session, job_id: str) -> dict[int, JobChunk]:
    rows = session.scalars(select(JobChunk).where(JobChunk.job_id == job_id))
    return {c.index: c for c in rows}


def _registered(session: Session, job_id: str) -> set[int]:
    return set(
        session.scalars(
            select(GeneratorModel.finetune_index).where(GeneratorModel.finetune_id == job_id)
        )
    )


class StepPlan:
    """How a member's steps run: one loop at one batch size (DreamBooth, LoRA), or a scratch
    generator's three stages one after the other, each with its steps and batch size."""

    def __init__(self, params: dict[str, Any]) -> None:
        hyper = params["hyperparameters"]
        if params["method"] == "scratch":
            steps = [hyper["vae_steps"], hyper["unet_steps"], hyper["inpaint_steps"]]
            batches = [hyper["vae_batch_size"], hyper["unet_batch_size"], hyper["unet_batch_size"]]
            self.stages: list[tuple[str | None, int, int]] = list(
                zip(SCRATCH_STAGES, steps, batches, strict=True)
            )
        else:  # the steps are known once the member starts: one open-ended stage
            self.stages = [(None, 10**12, hyper["train_batch_size"])]

    def stage_at(self, step: int) -> str | None:
        """The stage that trains step `step` + 1 (None when none is left, or no stages)."""
        for stage, steps, _batch in self.stages:
            if step < steps:
                return stage
            step -= steps
        return None

    def images_left(self, step: int, steps: int) -> int:
        """The training images the steps after `step` (of `steps`) see."""
        left, start = 0, 0
        for _stage, stage_steps, batch in self.stages:
            end = min(start + stage_steps, steps)
            left += max(end - max(start, step), 0) * batch
            start = end
        return left


def member_out(
    member: FinetuneMember,
    chunk: JobChunk | None,
    *,
    registered: bool,
    plan: StepPlan,
    now: datetime,
) -> FinetuneMemberOut:
    status = JobStatus.QUEUED
    if chunk is not None:
        status = {
            "pending": JobStatus.QUEUED,
            "running": JobStatus.RUNNING,
            "succeeded": JobStatus.SUCCEEDED,
            "failed": JobStatus.FAILED,
            "canceled": JobStatus.CANCELED,
        }[chunk.status]
    step = (chunk.step if chunk is not None else None) or 0
    steps = chunk.steps if chunk is not None else None
    elapsed = eta = None
    if chunk is not None and chunk.started_at is not None:
        end = chunk.finished_at if status not in (JobStatus.QUEUED, JobStatus.RUNNING) else now
        elapsed = round(max(((end or now) - chunk.started_at).total_seconds(), 0.0), 1)
    if status is JobStatus.RUNNING and steps and member.images_per_s:
        # the loop's images/s (a scratch member's: its current stage's); a step is one batch
        eta = round(plan.images_left(step, steps) / member.images_per_s, 1)
    stage = None
    if status in (JobStatus.QUEUED, JobStatus.RUNNING):
        stage = plan.stage_at(step)
    return FinetuneMemberOut(
        index=member.index,
        model_id=member.model_id,
        conditions=list(member.conditions),
        status=status,
        train_images=member.train_images,
        step=step,
        steps=steps,
        loss=member.loss,
        images_per_s=member.images_per_s,
        elapsed_s=elapsed,
        eta_s=eta,
        checkpoint_step=member.checkpoint_step,
        final_loss=member.final_loss,
        weights_sha256=member.weights_sha256,
        registered=registered,
        error=chunk.error if chunk is not None else None,
        stage=stage,
    )


def finetune_out(session: Session, job: Job) -> FinetuneOut:
    params = job.params
    now = datetime.now(UTC)
    chunks = _chunks(session, job.id)
    registered = _registered(session, job.id)
    hyper = params["hyperparameters"]
    plan = StepPlan(params)
    members = [
        member_out(
            m,
            chunks.get(m.index),
            registered=m.index in registered,
            plan=plan,
            now=now,
        )
        for m in members_of(session=session, job_id=job.id)
    ]
    all_started = all(m.steps is not None for m in members)
    return FinetuneOut(
        id=job.id,
        name=params.get("name"),
        status=JobStatus(job.status),
        family_id=params["family_id"],
        dataset=params["dataset"],
        base_model=params["base_model"],
        method=params["method"],
        variant=params["variant"],
        joint=params["joint"],
        conditions=params["conditions"],
        caption_skin_tone=params["caption_skin_tone"],
        seed=job.seed,
        hyperparameters=hyper,
        training_data=TrainingData(**params["training_data"]),
        progress=FinetuneProgress(
            step=sum(m.step for m in members),
            steps=sum(m.steps or 0 for m in members) if all_started else None,
            models_done=sum(m.registered for m in members),
            models=len(members),
        ),
        members=members,
        timings=engine.job_timings(job),
        error=job.error,
        idempotency_key=job.idempotency_key,
        webhook=job.webhook_url,
        webhook_events=job.webhook_events,
    )


def samples_of(
    session: Session, job: Job, store: ObjectStore, *, model_id: str | None = None
) -> list[FinetuneSample]:
    found = []
    for member in members_of(session=session, job_id=job.id):
        if model_id is not None and member.model_id != model_id:
            continue
        for sample in member.samples or []:
            found.append(
                FinetuneSample(
                    model_id=member.model_id,
                    step=sample["step"],
                    prompt=sample["prompt"],
                    seed=sample["seed"],
                    url=store.url(sample["key"]),
                    stage=sample.get("stage"),
                )
            )
    return found


def loss_curves(session: Session, job: Job) -> dict[str, list[tuple[int, float]]]:
    """Each member's (step, loss) in step order, by model id."""
    names = {m.index: m.model_id for m in members_of(session=session, job_id=job.id)}
    curves: dict[str, list[tuple[int, float]]] = {name: [] for name in names.values()}
    rows = session.execute(
        select(FinetuneLoss.index, FinetuneLoss.step, FinetuneLoss.loss)
        .where(FinetuneLoss.job_id == job.id)
        .order_by(FinetuneLoss.index, FinetuneLoss.step)
    )
    for index, step, loss in rows:
        curves[names[index]].append((step, loss))
    return curves


def model_out(model: GeneratorModel) -> ModelOut:
    training = None
    if model.finetune_id and model.training:
        t = model.training
        training = ModelTraining(
            finetune_id=model.finetune_id,
            family_id=model.family_id or model.id,
            method=t["method"],
            variant=t["variant"],
            conditions=t["conditions"],
            hyperparameters=t["hyperparameters"],
            train_images=t["train_images"],
            steps=t["steps"],
            final_loss=t["final_loss"],
            created_at=model.created_at,
            stages=[ScratchStage(**stage) for stage in t["stages"]] if "stages" in t else None,
            reconstruction_psnr_db=t.get("reconstruction_psnr_db"),
        )
    return ModelOut(
        id=model.id,
        pipeline_class=model.pipeline_class,
        description=model.description,
        created_at=model.created_at,
        base_model=model.base_model_id,
        condition=model.condition,
        weights_sha256=model.weights_sha256,
        sampling_defaults=model.sampling_defaults,
        training=training,
    )


def models_out(models: Sequence[GeneratorModel]) -> list[ModelOut]:
    return [model_out(m) for m in models]
