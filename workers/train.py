"""Classifier runs: the task that trains and evaluates one run of an experiment (`train` queue).

Thin: the mixture comes from app/mixtures.py, the model and its loop from models/, the
metrics from app/metrics.py. A run whose twin (same owner, config and data) already succeeded
copies its results instead of training again; a canceled experiment stops its run at the next
epoch. Features of the frozen backbone are cached in the database by (sha256, backbone,
transform) unless the run asks for the uncached path (the paper's: every epoch through the body).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch
from celery import Task

from app import engine
from app.broker import TRAIN_TASK
from app.config import Settings
from app.db.session import session_factory
from app.experiments import features as feature_cache
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
from app.storage import ObjectStore
from models.backbones import Backbone, load_backbone
from models.classifier import HeadConfig, TrainOptions, predict, train_head
from models.devices import resolve_device
from models.transforms import (
    augment,
    augmented_view_id,
    augmented_views,
    decode_image,
    eval_transform_id,
    resize_crop,
)
from workers.celery_app import app
from workers.chunk_task import Canceled, claim_task_chunk, heartbeat, job_canceled, object_store

log = logging.getLogger(__name__)
DOWNLOAD_THREADS = 8
TOP_K_PREDICTIONS = 3
# Images per backbone pass when the setting is unset. On the CPU, Lite0's expanded activations
# at batch 32 spill the caches: batch 8 runs ~1.3x faster (bench/RESULTS.md, bench.backbone).
CPU_FEATURE_BATCH = 8
GPU_FEATURE_BATCH = 64


def feature_batch(settings: Settings, device: torch.device) -> int:
    """Images per backbone forward pass on `device`: the setting, or the device's default."""
    if settings.classifier_feature_batch is not None:
        return settings.classifier_feature_batch
    return GPU_FEATURE_BATCH if device.type == "cuda" else CPU_FEATURE_BATCH


def predictions_key(run_id: str) -> str:
    return f"runs/{run_id}/predictions.jsonl"


def load_pixels(
    store: ObjectStore, images: Sequence[ImageRef], *, size: int, pool: ThreadPoolExecutor
) -> torch.Tensor:
    """(N, 3, size, size) float in [0, 1]: each image decoded, short side resized, centre
    cropped (fastai's Resize in crop mode)."""

    def one(image: ImageRef) -> torch.Tensor:
        return resize_crop(decode_image(store.get_bytes(image.storage_key)), size=size)

    if not images:
        return torch.zeros(0, 3, size, size)
    return torch.stack(list(pool.map(one, images)))


class FeatureMemo:
    """The vectors this worker process has read or computed, kept for its next runs: a grid's
    runs share most of their images, so later runs take them from memory instead of reading
    them from the database again (at the paper's sizes a run reads gigabytes). Up to a byte
    budget. When it is full, groups of other backbones go first (least recently used first);
    vectors of the backbone in use are then simply not added: every run of a grid reads the
    same groups in the same order, and evicting among them would make each run drop what the
    next one needs. The values are the database's: a (sha256, backbone, transform) vector
    never changes."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.used = 0
        self._groups: OrderedDict[tuple[str, str], dict[str, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    def held(self, backbone: str, transform: str) -> dict[str, np.ndarray]:
        """sha256 -> vector of that group (read it, do not change it)."""
        with self._lock:
            group = self._groups.get((backbone, transform))
            if group is None:
                return {}
            self._groups.move_to_end((backbone, transform))
            return group

    def add(self, backbone: str, transform: str, sha: str, vector: np.ndarray) -> None:
        if vector.nbytes > self.budget:  # never fits (a memo of budget 0: off)
            return
        key = (backbone, transform)
        with self._lock:
            group = self._groups.setdefault(key, {})
            self._groups.move_to_end(key)
            if sha in group:
                return
            if self.used + vector.nbytes > self.budget:
                for other in [k for k in self._groups if k[0] != backbone]:
                    self.used -= sum(v.nbytes for v in self._groups.pop(other).values())
                    if self.used + vector.nbytes <= self.budget:
                        break
            if self.used + vector.nbytes <= self.budget:
                group[sha] = vector
                self.used += vector.nbytes


_memo: FeatureMemo | None = None
_memo_lock = threading.Lock()


CGROUP_MEMORY_LIMITS = (
    Path("/sys/fs/cgroup/memory.max"),  # cgroup v2
    Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),  # cgroup v1
)


def usable_memory() -> int:
    """Bytes of memory this process may use: the machine's, or its container's limit when
    lower (a container sees the host's memory in sysconf)."""
    usable = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in CGROUP_MEMORY_LIMITS:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            usable = min(usable, int(text))
    return usable


def feature_memo(settings: Settings) -> FeatureMemo:
    """This process's memo, sized by the setting (unset: a quarter of usable_memory())."""
    global _memo
    with _memo_lock:
        if _memo is None:
            megabytes = settings.classifier_feature_memory_mb
            if megabytes is None:
                megabytes = usable_memory() // 4 // 2**20
            _memo = FeatureMemo(megabytes * 2**20)
        return _memo


class FeatureBank:
    """Backbone features by (image, transform): from this worker's memory, else the cache in
    the database, else computed once and stored in both."""

    def __init__(
        self,
        settings: Settings,
        backbone: Backbone,
        *,
        size: int,
        check: Callable[[], None],
        memo: FeatureMemo | None = None,
    ) -> None:
        self.settings = settings
        self.backbone = backbone
        self.size = size
        self.check = check
        self.key = backbone.cache_key
        self.memo = memo if memo is not None else feature_memo(settings)
        self.computed = 0
        self.reused = 0  # from the database or this worker's memory
        self.remembered = 0  # of those, from memory

    def transformed(
        self, pixels: torch.Tensor, images: list[ImageRef], transform: str
    ) -> torch.Tensor:
        """(B, 3, S, S) -> the batch under `transform` (one of eval, or an augmented view)."""
        if transform == eval_transform_id(size=self.size):
            return pixels
        view = int(transform.rsplit("-v", 1)[1])
        return augmented_views(pixels, image_sha256s=[i.sha256 for i in images], view=view)

    def get(self, images: Sequence[ImageRef], transforms: list[str]) -> dict[str, torch.Tensor]:
        """transform -> (len(images), dim) float16 (as stored), rows in the order of `images`.
        Each vector goes straight into its rows, from the memo, the cache or the body: besides
        what the memo keeps, memory holds the result and one batch, not the result again as
        bytes."""
        make_session = session_factory(self.settings.database_url)
        dim = 2 * self.backbone.feature_dim
        rows_of: dict[str, list[int]] = {}
        for row, image in enumerate(images):
            rows_of.setdefault(image.sha256, []).append(row)
        unique = {image.sha256: image for image in images}
        out = {
            t: np.empty((len(images), dim), dtype=feature_cache.STORED_DTYPE) for t in transforms
        }
        have: dict[str, set[str]] = {t: set() for t in transforms}

        def place(transform: str, sha: str, vector: np.ndarray) -> None:
            rows = rows_of[sha]
            if len(rows) == 1:  # a plain row index copies ~5x faster than a list of one
                out[transform][rows[0]] = vector
            else:
                out[transform][rows] = vector
            have[transform].add(sha)

        # 1. what this worker holds, then what the database cache has
        for transform in transforms:
            held = self.memo.held(self.key, transform)
            for sha in unique:
                if sha in held:
                    place(transform, sha, held[sha])
        self.remembered += sum(len(h) for h in have.values())
        with make_session() as session:
            for transform in transforms:
                wanted = [sha for sha in unique if sha not in have[transform]]
                for sha, vector in feature_cache.iter_cached_features(
                    session=session, backbone=self.key, transform=transform, sha256s=wanted
                ):
                    array = feature_cache.decode_vector(vector, dim=dim)
                    place(transform, sha, array)
                    self.memo.add(self.key, transform, sha, array)
        self.reused += sum(len(h) for h in have.values())
        missing = [
            image for sha, image in unique.items() if any(sha not in have[t] for t in transforms)
        ]
        # 2. the rest: each image decoded once, run through the body once per transform
        store = object_store(self.settings)
        batch = feature_batch(self.settings, self.backbone.device)
        with ThreadPoolExecutor(DOWNLOAD_THREADS) as pool:
            for start in range(0, len(missing), batch):
                self.check()
                part = missing[start : start + batch]
                pixels = load_pixels(store, part, size=self.size, pool=pool)
                for transform in transforms:
                    done = have[transform]
                    rows = [i for i, image in enumerate(part) if image.sha256 not in done]
                    if not rows:
                        continue
                    inputs = self.transformed(pixels[rows], [part[i] for i in rows], transform)
                    # rounded as stored: a vector is the same whether computed or read back
                    vectors = (
                        self.backbone.features(inputs)
                        .float()
                        .cpu()
                        .numpy()
                        .astype(feature_cache.STORED_DTYPE)
                    )
                    new = []
                    for j, i in enumerate(rows):
                        place(transform, part[i].sha256, vectors[j])
                        self.memo.add(self.key, transform, part[i].sha256, vectors[j].copy())
                        new.append((part[i].sha256, feature_cache.encode_vector(vectors[j])))
                    self.computed += len(new)
                    with make_session() as session:
                        feature_cache.store_features(
                            session=session, backbone=self.key, transform=transform, dim=dim,
                            vectors=new,
                        )  # fmt: skip
        return {t: torch.from_numpy(out[t]) for t in transforms}


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
    """Features, head training and test evaluation of one mixture: the values a run is
    closed with, and its per-image predictions."""
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
