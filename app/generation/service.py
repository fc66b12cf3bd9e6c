"""The generation service: validate a POST /jobs body and insert its job (not committed), and
read back what a stored image was made from. Never samples: that is workers/generate.py.

Strategies' parameters, the model check, parent selection and the synthetic dataset the images
go to; the engine inserts the job and its chunks.
"""

from __future__ import annotations

import random
import secrets
import time
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Table, insert
from sqlalchemy.orm import Session

from app import engine
from app.config import Settings
from app.datasets.repository import parent_candidates
from app.db.tables import ApiKey, Dataset, GeneratorModel, Image, Job, JobParent, utcnow
from app.errors import InvalidField
from app.ids import new_id
from app.schemas import JobCreate, Strategy
from app.vocabulary import get_condition, get_model, resolve_model

# Strategies that edit a real parent image, and those that need an inpainting pipeline.
EDIT_STRATEGIES = (Strategy.INPAINT, Strategy.INPAINT_OUTPAINT, Strategy.IMAGE_TO_IMAGE)
INPAINT_STRATEGIES = (Strategy.INPAINT, Strategy.INPAINT_OUTPAINT)
MAX_COUNT = 1_000_000
GENERATE_KIND = "generate"


def _job_params(params: JobCreate) -> dict[str, Any]:
    """The body's `Job.params` (GenerationParams, which the worker reads back)."""
    return params.generation_params().stored()


# (model id, inpaint) -> (when this process read it, time.monotonic(); its pipeline class),
# for base models only: they are everyone's, never deleted, and resolve to themselves whatever
# the key and condition; a key's own (fine-tuned) models are always read.
_base_models: dict[tuple[str, bool], tuple[float, str]] = {}
BASE_MODEL_MEMO_S = 5.0
BASE_MODEL_MEMO_MAX = 1_000


def _check_model(*, session: Session, settings: Settings, params: JobCreate, owner: ApiKey) -> str:
    """The generator the job uses (a fine-tune family names its member of the job's
    condition), checked against its strategy."""
    inpaint = params.strategy in INPAINT_STRATEGIES
    model_id = params.model or (
        settings.default_inpaint_model if inpaint else settings.default_model
    )
    hit = _base_models.get((model_id, inpaint))
    if hit is not None and time.monotonic() - hit[0] < BASE_MODEL_MEMO_S:
        pipeline_class = hit[1]
    else:
        read_at = time.monotonic()
        model, problem = resolve_model(
            session=session,
            model_id=model_id,
            owner_id=owner.id,
            condition=params.condition,
            inpaint=inpaint,
        )
        if model is None:
            raise InvalidField(f"model: {problem}", field="model")
        if model.owner_id is None and model.family_id is None and model.id == model_id:
            if len(_base_models) >= BASE_MODEL_MEMO_MAX:
                _base_models.clear()
            _base_models[(model_id, inpaint)] = (read_at, model.pipeline_class)
        model_id, pipeline_class = model.id, model.pipeline_class
    is_inpaint_model = "Inpaint" in pipeline_class
    if inpaint and not is_inpaint_model:
        raise InvalidField(
            f"model: strategy {params.strategy.value} needs an inpainting pipeline; "
            f"{model_id} is a {pipeline_class}",
            field="model",
        )
    if not inpaint and is_inpaint_model:
        raise InvalidField(
            f"model: strategy {params.strategy.value} needs a text-to-image pipeline; "
            f"{model_id} is a {pipeline_class}",
            field="model",
        )
    return model_id


def _select_parents(
    *, session: Session, params: JobCreate, owner: ApiKey, seed: int
) -> tuple[list[str], int]:
    """The parent images (in the order the job uses them) and the job's image count."""
    # Parents are the source dataset's images of the job's condition (and skin tone when set),
    # in a seeded shuffle; image i derives from parent i // k (PAPER.md section 4).
    k = params.synthetic_per_real
    if params.source_dataset is None:
        if params.strategy in EDIT_STRATEGIES:
            raise InvalidField(
                f"source_dataset: strategy {params.strategy.value} edits real images; "
                "name the real dataset to take them from",
                field="source_dataset",
            )
        if params.count is None:
            raise InvalidField("count: required (1..1,000,000)", field="count")
        return [], params.count
    source = session.get(Dataset, params.source_dataset)
    if source is None or source.owner_id != owner.id:
        raise InvalidField(
            f"source_dataset: no dataset {params.source_dataset!r}", field="source_dataset"
        )
    if source.kind != "real":
        raise InvalidField("source_dataset: must be a real dataset", field="source_dataset")
    candidates = parent_candidates(
        session=session,
        dataset_id=source.id,
        condition=params.condition,
        skin_tone=params.skin_tone,
    )
    tone = f" on skin type {params.skin_tone}" if params.skin_tone else ""
    if not candidates:
        raise InvalidField(
            f"source_dataset: no {params.condition} images{tone} in dataset {source.id}",
            field="source_dataset",
        )
    random.Random(seed).shuffle(candidates)
    count = params.count if params.count is not None else len(candidates) * k
    if count > len(candidates) * k:
        raise InvalidField(
            f"count: {count} images at synthetic_per_real={k} need {-(-count // k)} parents; "
            f"the source has {len(candidates)} {params.condition} images{tone}",
            field="count",
        )
    if count > MAX_COUNT:
        raise InvalidField(
            f"count: {len(candidates)} parents x {k} is {count} images, more than "
            f"{MAX_COUNT:,}; give a smaller count",
            field="count",
        )
    return candidates[: -(-count // k)], count


_INSERT_DATASET = insert(cast(Table, Dataset.__table__))

# (condition slug, key id) -> when this process last found that key may use it
# (time.monotonic()). Only a yes is remembered: a label a key uploads is usable at once, and
# no condition is ever taken from a key, so a remembered yes never goes stale.
_usable_conditions: dict[tuple[str, str], float] = {}
CONDITION_MEMO_S = 5.0
CONDITION_MEMO_MAX = 10_000


def _check_condition(*, session: Session, slug: str, owner_id: str) -> None:
    """InvalidField (422 naming `condition`) unless key `owner_id` may use condition `slug`."""
    memo = (slug, owner_id)
    if time.monotonic() - _usable_conditions.get(memo, -CONDITION_MEMO_S) < CONDITION_MEMO_S:
        return
    checked_at = time.monotonic()
    if get_condition(session=session, slug=slug, owner_id=owner_id) is None:
        raise InvalidField(
            f"condition: unknown condition {slug!r} (GET /conditions lists them)",
            field="condition",
        )
    if len(_usable_conditions) >= CONDITION_MEMO_MAX:
        _usable_conditions.clear()
    _usable_conditions[memo] = checked_at


def create_job(
    *, session: Session, settings: Settings, params: JobCreate, owner: ApiKey
) -> tuple[Job, bool]:
    """Validate and insert a job, its dataset, parents and chunks (uncommitted); (job, created)."""
    # 1. idempotency: the same key and request return the job they made before (a key is
    # scoped to the owner and the kind; another request with it is a Conflict)
    digest = engine.request_hash(
        "POST /jobs", params.model_dump(mode="json", exclude={"idempotency_key"})
    )
    existing = engine.job_for_request(session=session, owner_id=owner.id, kind=GENERATE_KIND,
                                      key=params.idempotency_key, request_hash=digest)  # fmt: skip
    if existing is not None:
        return existing, False

    # 2. vocabulary, model, parents
    _check_condition(session=session, slug=params.condition, owner_id=owner.id)
    model_id = _check_model(session=session, settings=settings, params=params, owner=owner)
    seed = params.seed if params.seed is not None else secrets.randbits(62)
    parents, count = _select_parents(session=session, params=params, owner=owner, seed=seed)
    webhook = engine.subscription(settings=settings, params=params)

    # 3. the synthetic dataset the images go to
    if params.dataset_id is not None:
        dataset = session.get(Dataset, params.dataset_id)
        if dataset is None or dataset.owner_id != owner.id:
            raise InvalidField(f"dataset_id: no dataset {params.dataset_id!r}", field="dataset_id")
        if dataset.kind != "synthetic":
            raise InvalidField("dataset_id: must be a synthetic dataset", field="dataset_id")
        dataset_id = dataset.id
    else:
        tone = f"fst{params.skin_tone}" if params.skin_tone else "fst-any"
        dataset_id = new_id()
        session.execute(  # a Core insert, as insert_job's (no unit of work to flush)
            _INSERT_DATASET,
            {"id": dataset_id, "owner_id": owner.id, "kind": "synthetic", "description": "",
             "name": params.dataset_name or f"{params.condition}-{tone}-{params.strategy.value}",
             "created_at": utcnow()},
        )  # fmt: skip

    # 4. the job and its chunks
    try:
        job = engine.insert_job(
            session=session,
            owner=owner,
            kind=GENERATE_KIND,
            dataset_id=dataset_id,
            condition=params.condition,
            skin_tone=params.skin_tone,
            strategy=params.strategy.value,
            model_id=model_id,
            count=count,
            seed=seed,
            chunk_size=settings.chunk_size,
            params=_job_params(params),
            idempotency_key=params.idempotency_key,
            request_hash=digest,
            **webhook,
        )
    except engine.KeyRace as race:  # a concurrent request with this key made it first
        return race.job, False
    if parents:
        session.execute(
            insert(JobParent),
            [{"job_id": job.id, "position": p, "image_id": i} for p, i in enumerate(parents)],
        )
    return job, True


@dataclass(frozen=True)
class MadeFrom:
    """What a generated image was made from: its row's index, bytes and provenance, its job's
    seed and its model."""

    image_id: str
    index: int
    sha256: str
    provenance: dict[str, Any]
    job_id: str
    job_seed: int
    model: GeneratorModel


def made_from(*, session: Session, image_id: str) -> MadeFrom:
    """The image's MadeFrom; LookupError if it is no generated image or its job or model is gone."""
    row = session.get(Image, image_id)
    if row is None or row.job_id is None or row.index is None:
        raise LookupError(f"no generated image {image_id!r}")
    job = session.get(Job, row.job_id)
    model = get_model(session=session, model_id=row.model_id or "")
    if job is None or model is None:
        raise LookupError(f"the job or model of image {image_id} is gone")
    return MadeFrom(
        image_id=image_id,
        index=row.index,
        sha256=row.sha256,
        provenance=dict(row.provenance),
        job_id=job.id,
        job_seed=job.seed,
        model=model,
    )
