"""What every fine-tune member's task uses, whatever its method: the member's images from the
store captioned in the owner's words, the loop's callbacks (losses in batches, checkpoints and
validation images to the store, the cancel flag), the store keys, and uploading trained weights.
workers/finetune.py (DreamBooth, LoRA) and workers/scratch.py (issue 24) train with it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app import engine
from app.config import Settings
from app.db.session import session_factory
from app.db.tables import Job
from app.finetunes import registry
from app.storage import ObjectStore
from app.vocabulary import get_condition, weights_sha256
from workers.chunk_task import job_canceled, object_store
from workers.sampling import encode_png

log = logging.getLogger(__name__)

DOWNLOAD_THREADS = 8
# how often the loss rows are written and the cancel flag read
FLUSH_EVERY_S = 1.0


def checkpoint_key(job_id: str, index: int, step: int) -> str:
    return f"finetunes/{job_id}/{index}/checkpoints/step-{step:08d}.pt"


def sample_key(job_id: str, index: int, step: int, number: int) -> str:
    return f"finetunes/{job_id}/{index}/samples/step-{step:08d}-{number:02d}.png"


def weights_prefix(model_id: str, sha256: str) -> str:
    return f"models/{model_id}/{sha256[:16]}"


@dataclass
class Trained:
    model_id: str
    job_status: str


class MemberProgress:
    """The loop's callbacks: losses written in batches, checkpoints and validation images to
    the store, and the cancel flag read, at most every FLUSH_EVERY_S."""

    def __init__(self, settings: Settings, plan: registry.MemberPlan) -> None:
        self.settings = settings
        self.plan = plan
        self.store = object_store(settings)
        self.make_session = session_factory(settings.database_url)
        self.pending: list[tuple[int, float]] = []
        self.steps = 0
        self.images_per_s: float | None = None
        self.samples = list(plan.samples)
        self.checkpoint: str | None = plan.checkpoint_key
        self.last_flush = time.monotonic()
        self.stop = False
        self.lock = threading.Lock()

    def on_step(self, report: Any) -> None:
        self.pending.append((report.step, float(report.loss)))
        self.steps = report.total_steps
        self.images_per_s = report.images_per_s
        if time.monotonic() - self.last_flush >= FLUSH_EVERY_S:
            self.flush()

    def flush(self) -> None:
        with self.make_session() as session:
            registry.record_losses(
                session=session,
                job_id=self.plan.job_id,
                index=self.plan.index,
                losses=self.pending,
                steps=self.steps,
                images_per_s=self.images_per_s,
            )
            self.stop = job_canceled(session=session, job_id=self.plan.job_id)
        self.pending = []
        self.last_flush = time.monotonic()

    def should_stop(self) -> bool:
        return self.stop

    def on_checkpoint(self, step: int, data: bytes) -> None:
        """The checkpoint is stored whole before the member points at it; the one before goes."""
        self.flush()  # the losses up to the checkpoint are kept by a resume
        key = checkpoint_key(self.plan.job_id, self.plan.index, step)
        self.store.put_bytes(key, data, content_type="application/octet-stream")
        with self.make_session() as session:
            registry.record_checkpoint(
                session=session, job_id=self.plan.job_id, index=self.plan.index, step=step, key=key
            )
        if self.checkpoint and self.checkpoint != key:
            self.store.delete(self.checkpoint)
        self.checkpoint = key

    def on_validation(self, step: int, images: list[Any], *, stage: str | None = None) -> None:
        for number, image in enumerate(images):
            key = sample_key(self.plan.job_id, self.plan.index, step, number)
            self.store.put_bytes(key, encode_png(image.image), content_type="image/png")
            sample = {"step": step, "prompt": image.prompt, "seed": image.seed, "key": key}
            self.samples.append(sample if stage is None else {**sample, "stage": stage})
        with self.make_session() as session:
            registry.record_samples(
                session=session,
                job_id=self.plan.job_id,
                index=self.plan.index,
                samples=self.samples,
            )

    def drop_checkpoint(self) -> None:
        if self.checkpoint:
            self.store.delete(self.checkpoint)


def condition_names(
    settings: Settings, claim: engine.ChunkClaim, slugs: list[str]
) -> dict[str, str]:
    """The owner's words for each condition slug (what its generation jobs' prompts say)."""
    names: dict[str, str] = {}
    with session_factory(settings.database_url)() as session:
        job = session.get(Job, claim.job_id)
        assert job is not None
        for slug in slugs:
            known = get_condition(session=session, slug=slug, owner_id=job.owner_id)
            names[slug] = known.name if known is not None else slug.replace("-", " ")
    return names


def training_images(
    settings: Settings, claim: engine.ChunkClaim, plan: registry.MemberPlan
) -> list[Any]:
    """The member's images, decoded, each captioned in the owner's words (with its
    Fitzpatrick type when the fine-tune asks)."""
    from models.finetune import TrainingImage
    from models.strategies import build_prompt
    from models.transforms import decode_image

    store = object_store(settings)
    names = condition_names(settings, claim, sorted({image.condition for image in plan.images}))
    with_tone = bool(claim.params.get("caption_skin_tone"))
    with ThreadPoolExecutor(DOWNLOAD_THREADS) as pool:
        blobs = list(pool.map(lambda image: store.get_bytes(image.storage_key), plan.images))
    return [
        TrainingImage(
            image_id=image.image_id,
            pixels=decode_image(data),
            caption=build_prompt(
                condition_name=names[image.condition],
                skin_tone=image.skin_tone if with_tone else None,
                template=settings.prompt_template,
                suffix=settings.skin_tone_prompt_suffix,
            ),
        )
        for image, data in zip(plan.images, blobs, strict=True)
    ]


@dataclass
class MemberStart:
    """Where a member's task starts: its plan, the checkpoint it resumes from (None: the
    start) and its decoded, captioned images."""

    plan: registry.MemberPlan
    resume: bytes | None
    images: list[Any]


def start_member(settings: Settings, claim: engine.ChunkClaim, *, kind: str) -> MemberStart:
    """Read the member's plan, forget the losses and validation images past its latest
    checkpoint (a restarted task redoes those steps), fetch that checkpoint and the images."""
    with session_factory(settings.database_url)() as session:
        plan = registry.member_plan(session=session, job_id=claim.job_id, index=claim.index)
        resume_step = plan.checkpoint_step or 0
        registry.forget_after(
            session=session, job_id=claim.job_id, index=claim.index, step=resume_step
        )
    store = object_store(settings)
    resume = store.get_bytes(plan.checkpoint_key) if plan.checkpoint_key else None
    images = training_images(settings, claim, plan)
    log.info(
        "%s fine-tune %s member %s (%s): %s images, %s",
        kind, claim.job_id, claim.index, plan.model_id, len(images),
        f"resuming at step {resume_step}" if resume else "from the start",
    )  # fmt: skip
    return MemberStart(plan, resume, images)


def upload_weights(
    store: ObjectStore, folder: Path, files: Iterable[str], *, model_id: str
) -> tuple[str, str]:
    """Upload `files` (relative to `folder`) under the model's key; (key prefix, sha256 of the
    weight files). The model is registered only after this returns."""
    sha = weights_sha256(folder)
    prefix = weights_prefix(model_id, sha)
    for name in files:
        with (folder / name).open("rb") as handle:
            store.put_file(f"{prefix}/{name}", handle, content_type="application/octet-stream")
    return prefix, sha
