"""Generator leakage (issue 22): an experiment whose synthetic children come from a fine-tuned
model that trained on any of the experiment's validation or test images.

The paper's DreamBooth models trained on every training-CSV row, the images later drawn as
classifier validation included (PAPER.md section 3). The service makes that visible: the
experiment is refused by name, or, with `allow_generator_leakage`, runs and says so. Images
are matched by their bytes (sha256), so a copy uploaded again under another id still counts.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, tuple_
from sqlalchemy.orm import Session

from app.db.tables import FinetuneImage, GeneratorModel, Image
from app.errors import InvalidField
from app.experiments.mixtures import hold_out, real_pool, split_real
from app.schemas import ExperimentCreate


def _trained_hashes(session: Session, synthetic_datasets: list[str]) -> dict[str, set[str]]:
    """Per fine-tuned model that made images of these datasets: the sha256s it trained on."""
    if not synthetic_datasets:
        return {}
    model_ids = session.scalars(
        select(Image.model_id).where(Image.dataset_id.in_(synthetic_datasets)).distinct()
    )
    models = list(
        session.execute(
            select(GeneratorModel.id, GeneratorModel.finetune_id, GeneratorModel.finetune_index)
            .where(GeneratorModel.id.in_([m for m in model_ids if m]))
            .where(GeneratorModel.finetune_id.is_not(None))
        )
    )
    trained: dict[str, set[str]] = {}
    for model_id, finetune_id, index in models:
        trained[model_id] = set(
            session.scalars(
                select(FinetuneImage.sha256).where(
                    tuple_(FinetuneImage.job_id, FinetuneImage.index) == (finetune_id, index)
                )
            )
        )
    return trained


def held_out_hashes(
    *, session: Session, params: ExperimentCreate, classes: list[str]
) -> tuple[set[str], set[str]]:
    """(validation, test) sha256s of the experiment: its test set, and the validation images
    of every seed of its grid (drawn as the runs draw them)."""
    pool, test = real_pool(
        session=session,
        dataset_id=params.dataset,
        test_split=params.test_split,
        test_dataset=params.test_dataset,
        test_per_class=params.test_per_class,
    )
    if params.test_per_class is not None:
        pool, test = hold_out(pool=pool, classes=classes, per_class=params.test_per_class)
    validation: set[str] = set()
    test_hashes: set[str] = set()
    for seed in params.seeds:
        _train, drawn, test_kept, _dropped = split_real(
            pool=pool,
            test=test,
            classes=classes,
            validation_per_class=params.validation_per_class,
            n_real_per_class=None,
            seed=seed,
        )
        validation.update(i.sha256 for i in drawn)
        test_hashes.update(i.sha256 for i in test_kept)
    return validation, test_hashes


def check_generator_leakage(
    *, session: Session, params: ExperimentCreate, classes: list[str]
) -> dict[str, Any] | None:
    """None when no generator behind the synthetic datasets saw a held-out image; else what
    each saw (InvalidField unless the request allows it)."""
    trained = _trained_hashes(session, params.synthetic_datasets)
    if not trained:
        return None
    validation, test = held_out_hashes(session=session, params=params, classes=classes)
    seen: dict[str, Any] = {}
    for model_id, hashes in sorted(trained.items()):
        in_validation, in_test = len(hashes & validation), len(hashes & test)
        if in_validation or in_test:
            seen[model_id] = {"validation_images": in_validation, "test_images": in_test}
    if not seen:
        return None
    if not params.allow_generator_leakage:
        named = "; ".join(
            f"{m} trained on {s['validation_images']} validation and {s['test_images']} test images"
            for m, s in seen.items()
        )
        raise InvalidField(
            f"synthetic_datasets: their images come from fine-tuned models that saw this "
            f"experiment's held-out images ({named}); exclude those images when fine-tuning "
            "(train_split, exclude_datasets) or set allow_generator_leakage: true to run "
            "anyway (the report then says so)",
            field="synthetic_datasets",
        )
    return {"models": seen}
