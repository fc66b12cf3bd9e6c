"""Classifier runs: the task that trains and evaluates one run of an experiment (`train` queue).

Thin: it builds no mixture (app/experiments/mixtures.py does), defines no model or loop
(models/) and computes no metric (app/experiments/metrics.py). Backbone features come from
workers/feature_bank.py, cached in the database by (sha256, backbone, transform) unless the run
asks for the uncached path (the paper's: every epoch through the body). A run whose twin (same
owner, config and data) already succeeded copies its results instead of training again; a
canceled experiment stops its run at the next epoch.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any

import numpy as np
import torch
from celery import Task

from app import engine
from app.broker import TRAIN_TASK
from app.config import Settings
from app.datasets import copies
from app.db.session import session_factory
from app.experiments import metrics, runs
from app.experiments.mixtures import (
    Example,
    ImageRef,
    Split,
    build_split,
    paper_batch_size,
    real_pool,
)
from app.experiments.mixtures import synthetic_children as load_children
from app.fitzpatrick import fitzpatrick_group
from app.schemas import JobStatus
from models.backbones import load_backbone
from models.classifier import HeadConfig, TrainOptions, predict, train_head
from models.devices import resolve_device
from models.transforms import augment, augmented_view_id, eval_transform_id
from workers.celery_app import app
from workers.chunk_task import Canceled, claim_task_chunk, heartbeat, job_canceled, object_store
from workers.feature_bank import DOWNLOAD_THREADS, FeatureBank, feature_batch, load_pixels

log = logging.getLogger(__name__)
TOP_K_PREDICTIONS = 3


def predictions_key(run_id: str) -> str:
    """The object key of a run's per-image predictions (JSON lines)."""
    return f"runs/{run_id}/predictions.jsonl"


def _labels(examples: Sequence[Example]) -> torch.Tensor:
    return torch.tensor([e.label for e in examples], dtype=torch.long)


def evaluate(
    *, probs: torch.Tensor, test: Sequence[Example], classes: list[str]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Test metrics, overall and per Fitzpatrick group, and the per-image predictions."""
    y_true = np.array([e.label for e in test], dtype=np.int64)
    p = probs.double().numpy()
    groups = [
        fitzpatrick_group(skin_tone=e.image.skin_tone, skin_tone_group=e.image.skin_tone_group)
        for e in test
    ]
    overall = metrics.classification_metrics(y_true=y_true, probs=p, class_names=classes)
    by_group = metrics.group_metrics(y_true=y_true, probs=p, groups=groups, class_names=classes)
    top1 = metrics.top_k_correct(y_true=y_true, probs=p, k=1)
    top3 = metrics.top_k_correct(y_true=y_true, probs=p, k=min(3, len(classes)))
    result = {
        **overall,
        "by_skin_tone": by_group,
        "test_image_ids": [e.image.id for e in test],
        "test_groups": groups,
        "test_correct_top1": metrics.correctness_string(top1),
        "test_correct_top3": metrics.correctness_string(top3),
    }
    rows = []
    order = np.argsort(-p, axis=1, kind="stable")[:, :TOP_K_PREDICTIONS]
    for i, example in enumerate(test):
        rows.append(
            {
                "image_id": example.image.id,
                "sha256": example.image.sha256,
                "true_label": classes[example.label],
                "skin_tone": example.image.skin_tone,
                "fitzpatrick_group": groups[i],
                "correct": bool(top1[i]),
                "predictions": [
                    {"label": classes[j], "probability": round(float(p[i, j]), 6)} for j in order[i]
                ],
            }
        )
    return result, rows


def run_training(
    settings: Settings, claim: runs.RunClaim, *, chunk: engine.ChunkClaim, worker: str
) -> dict[str, Any]:
    """Train and evaluate one run; returns the values its row is closed with."""
    config = claim.config
    make_session = session_factory(settings.database_url)
    clock = time.perf_counter()

    def check() -> None:
        with make_session() as session:
            if job_canceled(session=session, job_id=claim.experiment_id):
                raise Canceled()

    # 1. the mixture
    with make_session() as session:
        pool, test = real_pool(
            session=session,
            dataset_id=config["dataset"],
            test_split=config["test_split"],
            test_dataset=config["test_dataset"],
            test_per_class=config.get("test_per_class"),
        )
        k = int(config["synthetic_per_real"])
        children, parent_sha = load_children(
            session=session,
            dataset_ids=[config["synthetic_dataset"]] if k and config["synthetic_dataset"] else [],
            strategy=config["strategy"],
        )
        audit = (config.get("copy_audits") or {}).get(config["synthetic_dataset"] or "")
        flagged = copies.flagged_ids(session=session, evaluation_id=audit) if audit else set()
    copies_excluded = sum(c.id in flagged for c in children)
    children = [c for c in children if c.id not in flagged]  # exclude_copies (issue 23)
    classes = list(chunk.params["classes"])
    split = build_split(
        pool=pool,
        test=test,
        children=children,
        parent_sha256=parent_sha,
        classes=classes,
        validation_per_class=int(config["validation_per_class"]),
        n_real_per_class=config["n_real_per_class"],
        synthetic_per_real=k,
        seed=int(config["seed"]),
        test_per_class=config.get("test_per_class"),
    )
    if audit:
        split.summary["copies_excluded"] = copies_excluded
        split.summary["copies_evaluation"] = audit
    data_s = time.perf_counter() - clock

    def on_epoch(epoch: int, history: list[dict[str, Any]]) -> None:
        with make_session() as session:
            runs.record_epoch(
                session=session, run_id=claim.run_id, epoch=epoch, history=history,
                split=split.summary,
            )  # fmt: skip
            engine.record_step(
                session=session, job_id=claim.experiment_id, index=claim.index, step=epoch,
                steps=int(config["max_epochs"]),
            )  # fmt: skip
        check()

    values, rows = fit_split(settings, split, config=config, check=check, on_epoch=on_epoch)
    key = predictions_key(claim.run_id)
    body = "".join(json.dumps(row) + "\n" for row in rows).encode()
    object_store(settings).put_bytes(key, body, content_type="application/x-ndjson")
    values["predictions_key"] = key
    values["timings"].update(data_s=data_s, worker=worker)
    return values


def fit_split(
    settings: Settings,
    split: Split,
    *,
    config: dict[str, Any],
    check: Callable[[], None],
    on_epoch: Callable[[int, list[dict[str, Any]]], None],
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Features, head and test evaluation of a mixture: the run's closing values, predictions."""
    with ExitStack() as stack:
        return _fit(settings, split, config=config, check=check, on_epoch=on_epoch, stack=stack)


def _fit(
    settings: Settings,
    split: Split,
    *,
    config: dict[str, Any],
    check: Callable[[], None],
    on_epoch: Callable[[int, list[dict[str, Any]]], None],
    stack: ExitStack,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    timings: dict[str, Any] = {}
    batch_size = config["batch_size"] or paper_batch_size(len(split.train))
    split.summary["batch_size"] = batch_size

    # 1. features: cached vectors, or a function that runs the body every epoch
    clock = time.perf_counter()
    size = int(config["image_size"])
    device = resolve_device(settings.device)
    backbone = load_backbone(config["backbone"], device=device)
    augmentation = bool(config["augmentation"])
    train_images = [e.image for e in split.train]
    bank = FeatureBank(settings, backbone, size=size, check=check)
    eval_id = eval_transform_id(size=size)
    if config["cache_features"]:
        views = [
            augmented_view_id(v, size=size) for v in range(settings.classifier_augmented_views)
        ]
        # moved once to where the head trains, in float16 as stored (half the memory of a
        # paper-size run's views); each batch becomes float32 for the head
        train_views = [
            v.to(device)
            for v in bank.get(train_images, views if augmentation else [eval_id]).values()
        ]
        val = bank.get([e.image for e in split.validation], [eval_id])[eval_id].float().to(device)
        test_features = bank.get([e.image for e in split.test], [eval_id])[eval_id].float()

        def train_features(epoch: int, rows: torch.Tensor) -> torch.Tensor:
            return train_views[(epoch - 1) % len(train_views)][rows.to(device)].float()

        def val_features() -> torch.Tensor:
            return val

    else:
        # the paper's path, as its data loader does: every batch of every epoch read from the
        # store, decoded, resized and run through the frozen body (nothing held in memory)
        batch = feature_batch(settings, backbone.device)
        store = object_store(settings)
        threads = stack.enter_context(ThreadPoolExecutor(DOWNLOAD_THREADS))
        augment_generator = torch.Generator().manual_seed(int(config["seed"]))

        def streamed(images: Sequence[ImageRef], augmented: bool = False) -> torch.Tensor:
            parts = [torch.zeros(0, 2 * backbone.feature_dim, device=backbone.device)]
            for start in range(0, len(images), batch):
                pixels = load_pixels(store, images[start : start + batch], size=size, pool=threads)
                if augmented:
                    pixels = augment(pixels, generator=augment_generator)
                parts.append(backbone.features(pixels))
            return torch.cat(parts)

        def train_features(epoch: int, rows: torch.Tensor) -> torch.Tensor:
            return streamed([train_images[i] for i in rows.tolist()], augmented=augmentation)

        def val_features() -> torch.Tensor:
            return streamed([e.image for e in split.validation])

        test_features = streamed([e.image for e in split.test])
    timings["features_s"] = time.perf_counter() - clock

    # 2. the head, with early stopping; progress and cancel at every epoch
    clock = time.perf_counter()
    trained = train_head(
        train_features=train_features,
        train_labels=_labels(split.train),
        val_features=val_features,
        val_labels=_labels(split.validation),
        config=HeadConfig(in_features=2 * backbone.feature_dim, n_classes=len(split.classes)),
        options=TrainOptions(
            max_epochs=int(config["max_epochs"]),
            patience=int(config["patience"]),
            learning_rate=float(config["learning_rate"]),
            weight_decay=float(config["weight_decay"]),
            batch_size=batch_size,
            seed=int(config["seed"]),
        ),
        on_epoch=on_epoch,
        device=device,
    )
    timings["train_s"] = time.perf_counter() - clock

    # 3. the test set: metrics and per-image predictions
    clock = time.perf_counter()
    result, rows = evaluate(
        probs=predict(trained.head, test_features), test=split.test, classes=split.classes
    )
    result["best_val_loss"] = trained.best_val_loss
    timings["evaluate_s"] = time.perf_counter() - clock
    timings["features_computed"] = bank.computed
    timings["features_reused"] = bank.reused
    timings["features_remembered"] = bank.remembered
    timings["device"] = str(device)
    values = {
        "split": split.summary,
        "history": trained.history,
        "epoch": len(trained.history),
        "best_epoch": trained.best_epoch,
        "metrics": result,
        "timings": timings,
    }
    return values, rows


@app.task(name=TRAIN_TASK, bind=True, acks_late=True, ignore_result=True)
def train_run(self: Task, job_id: str, chunk_index: int) -> dict[str, Any]:
    """Train and evaluate run `chunk_index` of experiment `job_id`."""
    settings, worker, chunk = claim_task_chunk(self, job_id, chunk_index)
    if chunk is None:
        return {"job_id": job_id, "skipped": True}
    make_session = session_factory(settings.database_url)
    with make_session() as session:
        claim = runs.run_of_chunk(session=session, job_id=job_id, index=chunk_index)
        twin = runs.finished_twin(session=session, claim=claim)
        if twin is not None:
            runs.copy_results(session=session, run_id=claim.run_id, twin=twin)
            engine.finish_chunk(
                session=session, job_id=job_id, index=chunk_index, status="succeeded", done=1,
                fail_fast=False,
            )  # fmt: skip
            log.info("run %s reuses the results of run %s", claim.run_id, twin.id)
            return {"job_id": job_id, "status": "succeeded", "reused_from": twin.id}
        runs.start_run(session=session, run_id=claim.run_id)
    status, error, values = JobStatus.SUCCEEDED.value, None, {}
    try:
        with heartbeat(settings, job_id=job_id, index=chunk_index, worker=worker):
            values = run_training(settings, claim, chunk=chunk, worker=worker)
    except Canceled:
        status = JobStatus.CANCELED.value
    except Exception as exc:  # reported on the run; the other runs go on
        log.exception("run %s failed", claim.run_id)
        status, error = JobStatus.FAILED.value, f"{type(exc).__name__}: {exc}"[:4000]
    with make_session() as session:
        runs.finish_run(session=session, run_id=claim.run_id, status=status, error=error, **values)
        engine.finish_chunk(
            session=session,
            job_id=job_id,
            index=chunk_index,
            status=status,
            done=1 if status == JobStatus.SUCCEEDED.value else 0,
            error=error,
            fail_fast=False,
        )
    log.info("run %s %s", claim.run_id, status)
    return {"job_id": job_id, "status": status}
