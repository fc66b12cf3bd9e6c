"""POST /evaluations: validate a request (datasets of the caller and of the right kinds,
conditions both have, non-empty reference and test images) and insert its job (not
committed); the image rows the worker reads; GET and cancel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select, tuple_
from sqlalchemy.orm import Session

from app import engine
from app.config import Settings
from app.datasets.copies import EVALUATION_KIND
from app.datasets.repository import get_dataset
from app.db.owned import get_owned
from app.db.tables import ApiKey, Dataset, FinetuneImage, GeneratorModel, Image, Job
from app.errors import InvalidField, NotFound
from app.schemas.evaluations import EvaluationCreate

DEFAULT_TRAIN_SPLIT = "train"
ROW_COLUMNS = (
    Image.id, Image.sha256, Image.condition, Image.storage_key, Image.skin_tone,
    Image.skin_tone_group, Image.parent_image_id, Image.strategy, Image.split,
)  # fmt: skip


@dataclass(frozen=True)
class Reference:
    """Which real images an evaluation compares with: a split, or a generator's lineage."""

    source: str  # "lineage" or "split"
    split: str | None
    finetunes: list[list[Any]]  # [[fine-tune job id, member index], ...] for "lineage"
    images: int
    note: str | None


def _dataset(*, session: Session, owner: ApiKey, dataset_id: str, field: str, kind: str) -> Dataset:
    try:
        dataset = get_dataset(session=session, dataset_id=dataset_id, owner=owner)
    except NotFound:
        raise InvalidField(f"{field}: no dataset {dataset_id!r}", field=field) from None
    if dataset.kind != kind:
        raise InvalidField(
            f"{field}: {dataset.id} is a {dataset.kind} dataset; {field} must be a {kind} one",
            field=field,
        )
    return dataset


def _conditions(*, session: Session, dataset_id: str) -> set[str]:
    query = select(Image.condition).where(Image.dataset_id == dataset_id).distinct()
    return set(session.scalars(query))


def choose_conditions(
    *, session: Session, params: EvaluationCreate, synthetic: str, real: str
) -> list[str]:
    """The conditions asked for (each in both datasets), or every condition both have."""
    have = _conditions(session=session, dataset_id=synthetic)
    shared = have & _conditions(session=session, dataset_id=real)
    if params.conditions is not None:
        missing = [c for c in params.conditions if c not in shared]
        if missing:
            raise InvalidField(
                f"conditions: {', '.join(missing)} not in both datasets (shared: "
                f"{', '.join(sorted(shared)) or 'none'})",
                field="conditions",
            )
        return list(dict.fromkeys(params.conditions))
    if not shared:
        raise InvalidField(
            f"synthetic_dataset: {synthetic} has no condition in common with the reference "
            f"{real} (its conditions: {', '.join(sorted(have)) or 'none: it is empty'})",
            field="synthetic_dataset",
        )
    return sorted(shared)


def lineage(*, session: Session, dataset_id: str, conditions: list[str]) -> list[list[Any]]:
    """The fine-tune members every synthetic image of the conditions came from, when each
    came from one ([] when any came from a base model or a model without lineage)."""
    model_ids = set(
        session.scalars(
            select(Image.model_id)
            .where(Image.dataset_id == dataset_id, Image.condition.in_(conditions))
            .distinct()
        )
    )
    if not model_ids or None in model_ids:
        return []
    rows = session.execute(
        select(GeneratorModel.finetune_id, GeneratorModel.finetune_index).where(
            GeneratorModel.id.in_(model_ids)
        )
    ).all()
    if len(rows) != len(model_ids) or any(job is None for job, _index in rows):
        return []
    return sorted([job, index] for job, index in rows)


def _reference_query(*, dataset_id: str, conditions: Sequence[str], reference: Reference) -> Any:
    query = select(*ROW_COLUMNS).where(
        Image.dataset_id == dataset_id, Image.condition.in_(list(conditions))
    )
    if reference.source == "lineage":
        members = [tuple(m) for m in reference.finetunes]
        trained = select(FinetuneImage.sha256).where(
            tuple_(FinetuneImage.job_id, FinetuneImage.index).in_(members)
        )
        return query.where(Image.sha256.in_(trained))
    return query.where(Image.split == reference.split)


def choose_reference(
    *, session: Session, params: EvaluationCreate, real: str, synthetic: str, conditions: list[str]
) -> Reference:
    """The reference images: `real_split`, else the generator's lineage (as far as the
    reference holds those photos), else the `train` split; InvalidField when empty."""
    if params.real_split is None:
        members = lineage(session=session, dataset_id=synthetic, conditions=conditions)
        if members:
            found = Reference("lineage", None, members, 0, "the generator's own training images")
            count = _count(session, _reference_query(dataset_id=real, conditions=conditions,
                                                     reference=found))  # fmt: skip
            if count:
                return Reference("lineage", None, members, count, found.note)
        note = "the reference's train split (the generator's training images are not known)"
        split = DEFAULT_TRAIN_SPLIT
    else:
        note, split = None, params.real_split
    reference = Reference("split", split, [], 0, note)
    count = _count(session, _reference_query(dataset_id=real, conditions=conditions,
                                             reference=reference))  # fmt: skip
    if not count:
        raise InvalidField(
            f"real_split: dataset {real} has no {split!r} images of {', '.join(conditions)}",
            field="real_split",
        )
    return Reference("split", split, [], count, note)


def _count(session: Session, query: Any) -> int:
    return int(session.scalar(query.with_only_columns(func.count(Image.id))) or 0)


def create_evaluation(
    *, session: Session, settings: Settings, params: EvaluationCreate, owner: ApiKey
) -> tuple[Job, bool]:
    """Validate an evaluation and insert its job (one chunk; not committed); (job, created)."""
    # 1. idempotency: the same key and request return the evaluation they made before
    digest = engine.request_hash(
        "POST /evaluations", params.model_dump(mode="json", exclude={"idempotency_key"})
    )
    existing = engine.job_for_request(session=session, owner_id=owner.id, kind=EVALUATION_KIND,
                                      key=params.idempotency_key, request_hash=digest)  # fmt: skip
    if existing is not None:
        return existing, False

    # 2. the datasets, the conditions, the reference and test images
    synthetic = _dataset(session=session, owner=owner, dataset_id=params.synthetic_dataset,
                         field="synthetic_dataset", kind="synthetic").id  # fmt: skip
    real = _dataset(session=session, owner=owner, dataset_id=params.real_dataset,
                    field="real_dataset", kind="real").id  # fmt: skip
    conditions = choose_conditions(session=session, params=params, synthetic=synthetic, real=real)
    reference = choose_reference(session=session, params=params, real=real, synthetic=synthetic,
                                 conditions=conditions)  # fmt: skip
    test = select(Image.id).where(Image.dataset_id == real, Image.condition.in_(conditions),
                                  Image.split == params.test_split)  # fmt: skip
    if not _count(session, test):
        raise InvalidField(
            f"test_split: dataset {real} has no {params.test_split!r} images of "
            f"{', '.join(conditions)}",
            field="test_split",
        )
    if reference.source == "split" and reference.split == params.test_split:
        raise InvalidField(
            f"test_split: {params.test_split!r} is also the reference split", field="test_split"
        )
    webhook = engine.subscription(settings=settings, params=params)

    # 3. the job: one chunk, its stages counted as steps
    stored = {
        **params.model_dump(mode="json", exclude={"idempotency_key", "webhook", "webhook_events"}),
        "conditions": conditions,
        "backbone": params.backbone or settings.classifier_backbone,
        "reference": {
            "source": reference.source,
            "split": reference.split,
            "finetunes": reference.finetunes,
            "images": reference.images,
            "note": reference.note,
        },
    }
    try:
        job = engine.insert_job(
            session=session, owner=owner, kind=EVALUATION_KIND, count=1, chunk_size=1,
            params=stored, dataset_id=synthetic, seed=params.seed,
            condition=conditions[0] if len(conditions) == 1 else None,
            idempotency_key=params.idempotency_key, request_hash=digest, **webhook,
        )  # fmt: skip
    except engine.KeyRace as race:
        return race.job, False
    return job, True


def get_evaluation(*, session: Session, evaluation_id: str, owner: ApiKey) -> Job:
    """The caller's evaluation; NotFound otherwise."""
    return get_owned(session=session, table=Job, row_id=evaluation_id, owner_id=owner.id,
                     what="evaluation", kind=EVALUATION_KIND)  # fmt: skip


def cancel_evaluation(*, session: Session, evaluation_id: str, owner: ApiKey) -> Job:
    """Cancel: a queued evaluation never starts; a running one stops at its next stage or batch
    of features and keeps no result."""
    get_evaluation(session=session, evaluation_id=evaluation_id, owner=owner)
    return engine.cancel_job(session=session, job_id=evaluation_id, owner=owner)


# --- the worker's reads ---------------------------------------------------------------------


@dataclass(frozen=True)
class EvaluationImages:
    """The rows (ROW_COLUMNS tuples) an evaluation reads."""

    synthetic: list[tuple[Any, ...]]
    reference: list[tuple[Any, ...]]
    test: list[tuple[Any, ...]]
    parents: list[tuple[Any, ...]]


def evaluation_images(*, session: Session, params: dict[str, Any]) -> EvaluationImages:
    """The synthetic images of the conditions, the reference and test images, and the parents
    of the synthetic children, each in a stable order (sha256, id)."""
    conditions = params["conditions"]
    ref = params["reference"]
    reference = Reference(ref["source"], ref["split"], ref["finetunes"], 0, None)
    order = (Image.sha256, Image.id)
    synthetic = select(*ROW_COLUMNS).where(
        Image.dataset_id == params["synthetic_dataset"], Image.condition.in_(conditions)
    )
    real = _reference_query(dataset_id=params["real_dataset"], conditions=conditions,
                            reference=reference)  # fmt: skip
    test = select(*ROW_COLUMNS).where(
        Image.dataset_id == params["real_dataset"], Image.condition.in_(conditions),
        Image.split == params["test_split"],
    )  # fmt: skip
    synthetic_rows = [tuple(r) for r in session.execute(synthetic.order_by(*order))]
    parent_ids = sorted({r[6] for r in synthetic_rows if r[6]})
    parents: list[tuple[Any, ...]] = []
    for start in range(0, len(parent_ids), 500):
        batch = parent_ids[start : start + 500]
        parents += [
            tuple(r) for r in session.execute(select(*ROW_COLUMNS).where(Image.id.in_(batch)))
        ]
    return EvaluationImages(
        synthetic=synthetic_rows,
        reference=[tuple(r) for r in session.execute(real.order_by(*order))],
        test=[tuple(r) for r in session.execute(test.order_by(*order))],
        parents=parents,
    )
