"""A `method: scratch` fine-tune's member (issue 24): the project's own generator trained on the
member's images with models/scratch.py, the same code `make default-model` runs
(workers/default_model.py), here with the store and database around it.

Its three stages count as one run of steps (autoencoder, then text-to-image, then inpaint): the
loss rows, checkpoints and validation images carry that global step, and the stage is a
function of it (app/finetunes/views.py shows it). The product is two full pipeline
directories in the store, registered together: the member's model (text-to-image) and
`{model}-inpaint`.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path
from typing import Any

from app import engine
from app.config import Settings
from app.db.session import session_factory
from app.finetunes import registry
from app.finetunes.service import inpaint_model_id
from app.vocabulary import read_pipeline_class
from workers.chunk_task import Canceled, object_store
from workers.default_model import all_prompts, prompt
from workers.finetune_member import (
    MemberProgress,
    Trained,
    condition_names,
    start_member,
    upload_weights,
)

log = logging.getLogger(__name__)
# the validation images' skin types, cycled over the conditions (light and dark alike)
VALIDATION_TONES = (2, 5, 1, 4, 3, 6)
VALIDATION_IMAGES = 8  # models/scratch.py samples the first eight prompts


def stage_offsets(hyperparameters: dict[str, Any]) -> dict[str, int]:
    """The global step each stage starts after: autoencoder 0, text-to-image vae_steps, ..."""
    vae, unet = hyperparameters["vae_steps"], hyperparameters["unet_steps"]
    return {"autoencoder": 0, "text-to-image": vae, "inpaint": vae + unet}


class StageProgress:
    """models/scratch.py's per-stage callbacks onto a member's progress, in global steps."""

    def __init__(self, progress: MemberProgress, hyperparameters: dict[str, Any]) -> None:
        self.progress = progress
        self.offsets = stage_offsets(hyperparameters)
        self.total = self.offsets["inpaint"] + hyperparameters["inpaint_steps"]
        self.stage: str | None = None
        self.stage_step = 0

    def on_step(self, stage: str, report: Any) -> None:
        self.stage, self.stage_step = stage, report.step
        self.progress.on_step(
            dataclasses.replace(
                report, step=self.offsets[stage] + report.step, total_steps=self.total
            )
        )

    def on_checkpoint(self, stage: str, data: bytes) -> None:
        # within a stage: after its last step; at a stage's start (the one before done): its 0
        inner = self.stage_step if self.stage == stage else 0
        self.progress.on_checkpoint(self.offsets[stage] + inner, data)

    def on_validation(self, stage: str, step: int, images: list[Any]) -> None:
        self.progress.on_validation(self.offsets[stage] + step, images, stage=stage)


def _prompts(
    settings: Settings, names: list[str], *, with_tone: bool
) -> tuple[list[str], list[str]]:
    """(the validation prompts, every prompt a job may send): the conditions in turn, each with
    a skin type when the captions have them."""
    tones = VALIDATION_TONES if with_tone else (None,)
    validation = [
        prompt(settings, names[k % len(names)], tones[k % len(tones)])
        for k in range(VALIDATION_IMAGES)
    ]
    return validation, all_prompts(settings, names)


def _summary(result: Any) -> dict[str, Any]:
    """What GET /models says of a scratch model's training, from models/scratch.py's result."""
    from models.scratch import STAGES

    return {
        "stages": [
            {
                "stage": stage,
                "steps": len(result.losses.get(stage, [])),
                "final_loss": (result.losses.get(stage) or [None])[-1],
                "seconds": round(result.elapsed_s.get(stage, 0.0), 1),
            }
            for stage in STAGES
        ],
        "reconstruction_psnr_db": round(result.reconstruction_psnr_db, 2),
        "latent_scaling_factor": result.scaling_factor,
    }


def train_scratch_member(settings: Settings, claim: engine.ChunkClaim) -> Trained:
    """Train the member's generator from its latest checkpoint (or the start), upload both
    pipelines and register them. Canceled if the fine-tune is canceled meanwhile."""
    import torch

    from models.devices import resolve_device
    from models.scratch import save_generator, train_generator
    from models.scratch_parts import config_from_dict

    # 1. what this member trains, from where it stopped
    start = start_member(settings, claim, kind="scratch")
    plan, resume, images = start.plan, start.resume, start.images
    store = object_store(settings)

    # 2. the settings (the fine-tune's seed), the prompts, and the three stages
    hyper = claim.params["hyperparameters"]
    config = config_from_dict({**hyper, "seed": claim.seed + claim.index})
    names = condition_names(settings, claim, plan.conditions)
    validation, every_prompt = _prompts(
        settings,
        [names[c] for c in plan.conditions],
        with_tone=bool(claim.params.get("caption_skin_tone")),
    )
    progress = MemberProgress(settings, plan)
    stages = StageProgress(progress, hyper)
    result = train_generator(
        images,
        config,
        device=resolve_device(settings.device),
        prompts=validation + every_prompt,
        resume=resume,
        on_step=stages.on_step,
        on_checkpoint=stages.on_checkpoint,
        on_validation=stages.on_validation,
        should_stop=progress.should_stop,
    )
    progress.flush()
    if result.stopped:
        raise Canceled()

    # 3. both pipelines to the store (fp16 safetensors), then both models in one transaction
    stored = []
    with tempfile.TemporaryDirectory(prefix="synthderm-scratch-") as tmp:
        written = save_generator(result, Path(tmp), dtype=torch.float16)
        for variant, model_id in (
            ("text-to-image", plan.model_id),
            ("inpaint", inpaint_model_id(plan.model_id)),
        ):
            folder = written[variant]
            files = sorted(
                p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()
            )
            prefix, sha = upload_weights(store, folder, files, model_id=model_id)
            losses = result.losses[variant]
            stored.append(
                registry.StoredWeights(
                    model_id=model_id,
                    pipeline_class=read_pipeline_class(folder),
                    variant=variant,
                    weights_key=prefix,
                    weights_sha256=sha,
                    files=files,
                    final_loss=losses[-1] if losses else None,
                    steps=stages.total,
                )
            )
    with session_factory(settings.database_url)() as session:
        status = registry.register_model(
            session=session,
            job_id=claim.job_id,
            index=claim.index,
            weights=stored,
            summary=_summary(result),
        )
    progress.drop_checkpoint()
    return Trained(plan.model_id, status)
