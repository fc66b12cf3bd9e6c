"""POST /finetunes: validate a request, choose and record the images each model trains on (the
lineage), and insert the fine-tune's job and members (not committed); GET and cancel.

`method: scratch` (issue 24) has no base model: one member trains a whole generator over every
selected condition and registers two models, its text-to-image pipeline (the member's model id,
the family's) and its inpainting pipeline (`inpaint_model_id`).
"""

from __future__ import annotations

import secrets
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from app import engine
from app.config import Settings
from app.datasets.repository import get_dataset
from app.db.owned import get_owned
from app.db.tables import ApiKey, FinetuneImage, FinetuneMember, GeneratorModel, Image, Job
from app.errors import InvalidField, NotFound
from app.schemas.finetunes import (
    FinetuneCreate,
    FinetuneHyperparameters,
    FinetuneMethod,
    FinetuneVariant,
    ScratchSettings,
)
from app.vocabulary import get_condition, get_model, slugify

FINETUNE_KIND = "finetune"
# a model id is at most 120 characters (generator_models.id): name, the job's id, condition
MODEL_ID_LENGTH = 120


@dataclass(frozen=True)
class TrainingRow:
    image_id: str
    sha256: str
    storage_key: str
    condition: str
    skin_tone: int | None


@dataclass(frozen=True)
class Selection:
    """The images that train, by condition, and how they were chosen."""

    by_condition: dict[str, list[TrainingRow]]
    split: str | None
    note: str | None
    excluded: int


def new_family_id(name: str | None) -> str:
    """The id POST /jobs names: the fine-tune's name (as a slug) and 8 random hex digits."""
    stem = slugify(name or "")[:60].strip("-") or "finetune"
    return f"{stem}-{secrets.token_hex(4)}"


def member_model_id(*, family: str, condition: str | None) -> str:
    """A per-condition member's id is its family's and its condition's; a joint model's is
    the family's."""
    if condition is None:
        return family
    return f"{family}-{condition}"[:MODEL_ID_LENGTH]


def inpaint_model_id(model_id: str) -> str:
    """The id of a scratch member's inpainting model, beside its text-to-image one."""
    return f"{model_id}-inpaint"


def check_method_fields(params: FinetuneCreate) -> None:
    """What a method takes: scratch no base model, no variant but text-to-image (it makes
    both), always joint, none of the DreamBooth/LoRA hyperparameters; the others a base model
    and no scratch settings. InvalidField naming the field otherwise."""
    if params.method is not FinetuneMethod.SCRATCH:
        if params.base_model is None:
            raise InvalidField(
                f"base_model: required by method {params.method.value} (GET /models lists "
                "them; method scratch trains without one)",
                field="base_model",
            )
        if params.scratch is not None:
            raise InvalidField("scratch: only method scratch takes these settings", field="scratch")
        return
    if params.base_model is not None:
        raise InvalidField(
            "base_model: method scratch trains a generator of its own from the dataset; leave "
            "base_model out",
            field="base_model",
        )
    if params.variant is not FinetuneVariant.TEXT_TO_IMAGE:
        raise InvalidField(
            "variant: method scratch makes both a text-to-image and an inpaint model; leave "
            "variant out",
            field="variant",
        )
    if not params.joint and "joint" in params.model_fields_set:
        raise InvalidField(
            "joint: method scratch trains one model over all the conditions", field="joint"
        )
    unused = sorted(set(FinetuneHyperparameters.model_fields) & params.model_fields_set)
    if unused:
        raise InvalidField(
            f"{unused[0]}: not used by method scratch (its settings go in `scratch`); "
            f"leave out {', '.join(unused)}",
            field=unused[0],
        )


def check_base_model(*, session: Session, params: FinetuneCreate, owner: ApiKey) -> GeneratorModel:
    """The base model, visible to the caller and of the variant's kind; InvalidField if not."""
    assert params.base_model is not None  # check_method_fields
    model = get_model(session=session, model_id=params.base_model)
    if model is None or model.owner_id not in (None, owner.id):
        raise InvalidField(
            f"base_model: unknown model {params.base_model!r} (GET /models lists them)",
            field="base_model",
        )
    training = model.training or {}
    if training.get("method") == FinetuneMethod.LORA:
        raise InvalidField(
            f"base_model: {model.id} is a LoRA adapter; fine-tune its base model "
            f"{model.base_model_id} instead",
            field="base_model",
        )
    inpaint_model = "Inpaint" in model.pipeline_class
    if params.variant is FinetuneVariant.INPAINT and not inpaint_model:
        raise InvalidField(
            f"base_model: the inpaint variant trains a 9-channel inpainting UNet; {model.id} is "
            f"a {model.pipeline_class} (use an inpainting model, e.g. tiny-random-inpaint)",
            field="base_model",
        )
    if params.variant is FinetuneVariant.TEXT_TO_IMAGE and inpaint_model:
        raise InvalidField(
            f"base_model: the text-to-image variant needs a text-to-image model; {model.id} is "
            f"a {model.pipeline_class} (set variant: inpaint)",
            field="base_model",
        )
    return model


def _excluded_hashes(*, session: Session, params: FinetuneCreate, owner: ApiKey) -> set[str]:
    hashes: set[str] = set()
    for dataset_id in params.exclude_datasets:
        try:
            get_dataset(session=session, dataset_id=dataset_id, owner=owner)
        except NotFound:
            raise InvalidField(
                f"exclude_datasets: no dataset {dataset_id!r}", field="exclude_datasets"
            ) from None
        hashes.update(session.scalars(select(Image.sha256).where(Image.dataset_id == dataset_id)))
    return hashes


def select_images(*, session: Session, params: FinetuneCreate, owner: ApiKey) -> Selection:
    """The images each condition trains on: the dataset's `train_split` (all of a dataset
    without splits), less what `exclude_datasets` hold, of the conditions asked for."""
    try:
        dataset = get_dataset(session=session, dataset_id=params.dataset, owner=owner)
    except NotFound:
        raise InvalidField(f"dataset: no dataset {params.dataset!r}", field="dataset") from None
    if dataset.kind != "real":
        raise InvalidField(
            f"dataset: {dataset.id} is a {dataset.kind} dataset; fine-tunes train on real images",
            field="dataset",
        )
    splits = set(
        session.scalars(select(Image.split).where(Image.dataset_id == dataset.id).distinct())
    )
    split: str | None = params.train_split
    note = None
    if params.train_split not in splits:
        if splits - {None}:
            named = ", ".join(sorted(s for s in splits if s is not None))
            raise InvalidField(
                f"train_split: dataset {dataset.id} has no {params.train_split!r} images "
                f"(its splits: {named})",
                field="train_split",
            )
        if not splits:
            raise InvalidField(f"dataset: dataset {dataset.id} has no images", field="dataset")
        split, note = None, "the dataset has no splits: every image trains"
    query = select(
        Image.id, Image.sha256, Image.storage_key, Image.condition, Image.skin_tone
    ).where(Image.dataset_id == dataset.id)
    if split is not None:
        query = query.where(Image.split == split)
    if params.conditions is not None:
        query = query.where(Image.condition.in_(params.conditions))
    excluded_hashes = _excluded_hashes(session=session, params=params, owner=owner)
    by_condition: dict[str, list[TrainingRow]] = defaultdict(list)
    excluded = 0
    for row in session.execute(query.order_by(Image.sha256, Image.id)):
        if row.sha256 in excluded_hashes:
            excluded += 1
            continue
        by_condition[row.condition].append(TrainingRow(*row))
    wanted = params.conditions or sorted(by_condition)
    for condition in wanted:
        if condition not in by_condition:
            where = f"split {split!r} of " if split else ""
            left = " (after exclude_datasets)" if excluded else ""
            raise InvalidField(
                f"conditions: no training images of {condition!r} in {where}dataset "
                f"{dataset.id}{left}",
                field="conditions",
            )
    if not wanted:
        raise InvalidField(f"dataset: no training images in dataset {dataset.id}", field="dataset")
    return Selection(
        by_condition={c: by_condition[c] for c in wanted}, split=split, note=note, excluded=excluded
    )


def _check_sizes(
    params: FinetuneCreate, members: list[tuple[list[str], list[TrainingRow]]]
) -> None:
    if params.method is FinetuneMethod.SCRATCH:
        batch = (params.scratch or ScratchSettings()).unet_batch_size
        images = len(members[0][1])
        if batch > images:
            raise InvalidField(
                f"scratch.unet_batch_size: {batch} is larger than the {images} training images",
                field="scratch.unet_batch_size",
            )
        return
    for conditions, rows in members:
        if params.train_batch_size > len(rows):
            raise InvalidField(
                f"train_batch_size: {params.train_batch_size} is larger than the "
                f"{len(rows)} training images of {', '.join(conditions)}",
                field="train_batch_size",
            )


def create_finetune(
    *, session: Session, settings: Settings, params: FinetuneCreate, owner: ApiKey
) -> tuple[Job, bool]:
    """Validate a fine-tune and insert its job, members and lineage (not committed);
    (job, created)."""
    # 1. idempotency: the same key and request return the fine-tune they made before
    digest = engine.request_hash(
        "POST /finetunes", params.model_dump(mode="json", exclude={"idempotency_key"})
    )
    existing = engine.job_for_request(session=session, owner_id=owner.id, kind=FINETUNE_KIND,
                                      key=params.idempotency_key, request_hash=digest)  # fmt: skip
    if existing is not None:
        return existing, False

    # 2. the method's fields, the base model, the conditions and the images that train
    check_method_fields(params)
    scratch = params.method is FinetuneMethod.SCRATCH
    base = None if scratch else check_base_model(session=session, params=params, owner=owner)
    for condition in params.conditions or []:
        if get_condition(session=session, slug=condition, owner_id=owner.id) is None:
            raise InvalidField(
                f"conditions: unknown condition {condition!r} (GET /conditions lists them)",
                field="conditions",
            )
    selection = select_images(session=session, params=params, owner=owner)
    conditions = list(selection.by_condition)
    joint = params.joint or scratch
    if joint:
        rows = [r for c in conditions for r in selection.by_condition[c]]
        members = [(conditions, rows)]
    else:
        members = [([c], selection.by_condition[c]) for c in conditions]
    _check_sizes(params, members)
    webhook = engine.subscription(settings=settings, params=params)
    seed = params.seed if params.seed is not None else secrets.randbits(62)
    # scratch captions with the skin type by default: its own prompts are all its text encoder
    # ever learns
    with_tone = scratch if params.caption_skin_tone is None else params.caption_skin_tone

    # 3. the job (one chunk per member), the members and their images
    family = new_family_id(params.name)
    stored: dict[str, Any] = {
        "family_id": family,
        "dataset": params.dataset,
        "base_model": None if base is None else base.id,
        "method": params.method.value,
        "variant": params.variant.value,
        "joint": joint,
        "conditions": conditions,
        "caption_skin_tone": with_tone,
        "name": params.name,
        "hyperparameters": params.hyperparameters(),
        "training_data": {
            "dataset": params.dataset,
            "split": selection.split,
            "note": selection.note,
            "images": sum(len(rows) for _c, rows in members),
            "excluded": selection.excluded,
        },
    }
    try:
        job = engine.insert_job(
            session=session,
            owner=owner,
            kind=FINETUNE_KIND,
            count=len(members),
            chunk_size=1,
            params=stored,
            seed=seed,
            model_id=None if base is None else base.id,
            condition=conditions[0] if len(conditions) == 1 else None,
            strategy=params.variant.value,
            idempotency_key=params.idempotency_key,
            request_hash=digest,
            **webhook,
        )
    except engine.KeyRace as race:
        return race.job, False
    session.execute(
        insert(FinetuneMember),
        [
            {
                "job_id": job.id,
                "index": index,
                "model_id": member_model_id(
                    family=family, condition=None if joint else member_conditions[0]
                ),
                "conditions": member_conditions,
                "train_images": len(rows),
                "samples": [],
            }
            for index, (member_conditions, rows) in enumerate(members)
        ],
    )
    session.execute(
        insert(FinetuneImage),
        [
            {
                "job_id": job.id,
                "index": index,
                "image_id": row.image_id,
                "sha256": row.sha256,
                "storage_key": row.storage_key,
                "condition": row.condition,
                "skin_tone": row.skin_tone,
            }
            for index, (_conditions, rows) in enumerate(members)
            for row in rows
        ],
    )
    return job, True


def get_finetune(*, session: Session, finetune_id: str, owner: ApiKey) -> Job:
    """The caller's fine-tune; NotFound otherwise."""
    return get_owned(session=session, table=Job, row_id=finetune_id, owner_id=owner.id,
                     what="fine-tune", kind=FINETUNE_KIND)  # fmt: skip


def members_of(*, session: Session, job_id: str) -> list[FinetuneMember]:
    return list(
        session.scalars(
            select(FinetuneMember)
            .where(FinetuneMember.job_id == job_id)
            .order_by(FinetuneMember.index)
        )
    )


def cancel_finetune(*, session: Session, finetune_id: str, owner: ApiKey) -> Job:
    """Cancel: members not started never start; a training member stops at its next step and
    registers nothing. Models already registered stay."""
    get_finetune(session=session, finetune_id=finetune_id, owner=owner)
    return engine.cancel_job(session=session, job_id=finetune_id, owner=owner)
