"""Evaluations (issue 23): the task that measures a synthetic dataset against real data
(`train` queue, one chunk).

Thin: the images come from app/evaluations/service.py, the features from the classifiers'
cache (workers/feature_bank.py), the numbers from workers/evaluation_measures.py (on
models/quality.py, ita.py, memorisation.py), the figures from workers/evaluation_figures.py.
Each stage is a step of the chunk (progress) and checks for cancel; a canceled or failed
evaluation keeps no result and no audit rows.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from celery import Task
from PIL import Image

from app import engine
from app.broker import EVALUATE_TASK
from app.config import Settings
from app.datasets import copies
from app.db.session import session_factory
from app.evaluations import STAGES, plot_key
from app.evaluations.service import evaluation_images
from app.experiments.mixtures import ImageRef
from app.fitzpatrick import fitzpatrick_group
from models.backbones import load_backbone
from models.devices import resolve_device
from models.ita import image_ita
from models.memorisation import nearest_neighbours, pixel_similarity
from models.quality import pca_2d
from models.transforms import augmented_view_id, decode_image, eval_transform_id
from workers import evaluation_figures as figures
from workers import evaluation_measures as measures
from workers.celery_app import app
from workers.chunk_task import Canceled, claim_task_chunk, heartbeat, job_canceled, object_store
from workers.feature_bank import DOWNLOAD_THREADS, FeatureBank

log = logging.getLogger(__name__)
IMAGE_SIZE = 224
THUMB = 64  # the SSIM's size, and the figures' thumbnails
ITA_SIZE = 128


def space_name(backbone: str) -> str:
    """The feature space as it is named in every key: efficientnet-lite0 -> lite0."""
    short = backbone.removeprefix("efficientnet-")
    return re.sub(r"[^a-z0-9]+", "_", short.lower()).strip("_") or "features"


def _group(ref: ImageRef) -> str:
    return fitzpatrick_group(skin_tone=ref.skin_tone, skin_tone_group=ref.skin_tone_group)


class Looks:
    """Each distinct image decoded once: its ITA and a THUMB x THUMB thumbnail (by sha256)."""

    def __init__(self, settings: Settings, check: Callable[[], None]) -> None:
        self.store = object_store(settings)
        self.check = check
        self.ita: dict[str, float | None] = {}
        self.thumb: dict[str, Image.Image] = {}

    def load(self, refs: list[ImageRef]) -> None:
        todo = list({r.sha256: r for r in refs if r.sha256 not in self.thumb}.values())

        def one(ref: ImageRef) -> tuple[str, float | None, Image.Image]:
            image = decode_image(self.store.get_bytes(ref.storage_key))
            side = min(image.size)  # centre square, as the features' transform
            left, top = (image.width - side) // 2, (image.height - side) // 2
            square = image.crop((left, top, left + side, top + side))
            small = square.resize((ITA_SIZE, ITA_SIZE), Image.Resampling.BILINEAR)
            thumb = small.resize((THUMB, THUMB), Image.Resampling.BILINEAR)
            return ref.sha256, image_ita(small, size=ITA_SIZE), thumb

        with ThreadPoolExecutor(DOWNLOAD_THREADS) as pool:
            for start in range(0, len(todo), 256):
                self.check()
                for sha, ita, thumb in pool.map(one, todo[start : start + 256]):
                    self.ita[sha], self.thumb[sha] = ita, thumb


def evaluate(settings: Settings, claim: engine.ChunkClaim) -> dict[str, Any]:
    """Run every stage; returns the result (the audit rows are written with it)."""
    params, seed = claim.params, claim.seed
    make_session = session_factory(settings.database_url)

    def check() -> None:
        with make_session() as session:
            if job_canceled(session=session, job_id=claim.job_id):
                raise Canceled()

    def stage(name: str) -> None:
        check()
        with make_session() as session:
            engine.record_step(session=session, job_id=claim.job_id, index=claim.index,
                               step=STAGES.index(name), steps=len(STAGES))  # fmt: skip

    timings: dict[str, float] = {}
    clock = time.perf_counter()
    # 1. the images and their features (the classifiers' cache: computed once per image)
    stage("features")
    with make_session() as session:
        rows = evaluation_images(session=session, params=params)
    synthetic = [ImageRef(*r) for r in rows.synthetic]
    reference = [ImageRef(*r) for r in rows.reference]
    test = [ImageRef(*r) for r in rows.test]
    parents = {p[0]: ImageRef(*p) for p in rows.parents}
    device = resolve_device(settings.device)
    backbone = load_backbone(params["backbone"], device=device)
    space = space_name(backbone.name)
    bank = FeatureBank(settings, backbone, size=IMAGE_SIZE, check=check)
    eval_id, view_id = eval_transform_id(size=IMAGE_SIZE), augmented_view_id(0, size=IMAGE_SIZE)
    fake = bank.get(synthetic, [eval_id])[eval_id].float().numpy()
    both = bank.get(reference, [eval_id, view_id])
    real, real_view = both[eval_id].float().numpy(), both[view_id].float().numpy()
    test_x = bank.get(test, [eval_id])[eval_id].float().numpy()
    parent_list = list(parents.values())
    parent_x = bank.get(parent_list, [eval_id])[eval_id].float().numpy() if parent_list else None
    timings["features_s"] = time.perf_counter() - clock

    # 2. fidelity and diversity, with the real-vs-real floor
    stage("fidelity")
    fake_groups = [_group(r) for r in synthetic]
    real_groups = [_group(r) for r in reference]
    fidelity = measures.fidelity(
        real=real, fake=fake, space=space, seed=seed,
        real_keys={"condition": [r.condition for r in reference], "group": real_groups},
        fake_keys={"condition": [r.condition for r in synthetic], "group": fake_groups},
    )  # fmt: skip

    # 3. utility: train on synthetic, test on real (beside as many real images)
    stage("utility")
    utility = measures.utility(
        synthetic=fake, synthetic_conditions=[r.condition for r in synthetic],
        real=real, real_conditions=[r.condition for r in reference],
        test=test_x, test_conditions=[r.condition for r in test],
        test_groups=[_group(r) for r in test], seed=seed, device=device,
    )  # fmt: skip

    # 4. skin-tone fidelity by ITA (decoding each image once, thumbnails kept for later)
    stage("skin tone")
    looks = Looks(settings, check)
    looks.load(synthetic + reference + parent_list)
    tone = measures.skin_tone(
        synthetic=[(r.skin_tone, looks.ita[r.sha256]) for r in synthetic],
        real=[(r.skin_tone, looks.ita[r.sha256]) for r in reference],
    )

    # 5. the memorisation audit: nearest OTHER patient, own parent apart, calibrated threshold
    stage("memorisation")
    codes: dict[str, int] = {}
    code = np.vectorize(lambda sha: codes.setdefault(sha, len(codes)), otypes=[np.int64])
    real_codes = code([r.sha256 for r in reference])
    threshold = measures.calibrate(eval_features=real, view_features=real_view, codes=real_codes,
                                   device=device)  # fmt: skip
    nearest, cosine = nearest_neighbours(fake, real, device=device)
    parent_of = [parents.get(r.parent_image_id or "") for r in synthetic]
    # a child whose nearest is its own parent (or a copy of its bytes): the nearest other one
    redo = [i for i, p in enumerate(parent_of) if p and reference[nearest[i]].sha256 == p.sha256]
    if redo:
        own = code([parent_of[i].sha256 for i in redo])  # type: ignore[union-attr]
        again, again_cos = measures.nearest_other(
            fake[redo], real, query_codes=own, reference_codes=real_codes, device=device
        )
        nearest[redo], cosine[redo] = again, again_cos
    parent_index = {p.id: i for i, p in enumerate(parent_list)}
    pairs: list[dict[str, Any]] = []
    for i, ref in enumerate(synthetic):
        if i % 2000 == 0:
            check()
        found = int(nearest[i]) >= 0 and not np.isnan(cosine[i])
        match = reference[int(nearest[i])] if found else None
        parent = parent_of[i]
        parent_cos = parent_ssim = None
        if parent is not None and parent_x is not None:
            row = parent_index[parent.id]
            parent_cos = float(measures.rowwise_cosine(fake[i : i + 1], parent_x[row : row + 1])[0])
            parent_ssim = pixel_similarity(looks.thumb[ref.sha256], looks.thumb[parent.sha256])
        value = float(cosine[i]) if found else -1.0
        pairs.append({
            "image_id": ref.id, "condition": ref.condition, "skin_tone": ref.skin_tone,
            "strategy": ref.strategy, "nearest_image_id": match.id if match else "",
            "cosine": round(value, 6),
            "ssim": round(pixel_similarity(looks.thumb[ref.sha256], looks.thumb[match.sha256]), 6)
            if match else None,
            "parent_image_id": ref.parent_image_id,
            "parent_cosine": None if parent_cos is None else round(parent_cos, 6),
            "parent_ssim": None if parent_ssim is None else round(parent_ssim, 6),
            "flagged": found and value >= threshold.value,
        })  # fmt: skip
    audit = measures.audit_summary(
        pairs=pairs, groups=fake_groups, threshold=threshold, space=space
    )

    # 6. figures, PNG and SVG, into the store
    stage("figures")
    drawn = _figures(settings, claim.job_id, synthetic, reference, pairs, looks, fake, real,
                     fidelity, space)  # fmt: skip
    timings["total_s"] = time.perf_counter() - clock
    result = {
        "feature_space": {
            "name": space, "backbone": backbone.name, "cache_key": backbone.cache_key,
            "transform": eval_id, "dim": int(fake.shape[1]),
        },
        "reference": {**params["reference"], "images": len(reference), "test_images": len(test)},
        "synthetic": {"dataset": params["synthetic_dataset"], "images": len(synthetic),
                      "by_condition": {c: sum(r.condition == c for r in synthetic)
                                       for c in params["conditions"]}},
        "conditions": params["conditions"],
        "fidelity": fidelity, "utility": utility, "skin_tone": tone, "memorisation": audit,
        "figures": drawn, "features_computed": bank.computed, "features_reused": bank.reused,
        "timings": {k: round(v, 2) for k, v in timings.items()}, "device": str(device),
    }  # fmt: skip
    return {"result": result, "pairs": pairs}


def _figures(
    settings: Settings, job_id: str, synthetic: list[ImageRef], reference: list[ImageRef],
    pairs: list[dict[str, Any]], looks: Looks, fake: np.ndarray, real: np.ndarray,
    fidelity: dict[str, Any], space: str,
) -> list[str]:  # fmt: skip
    by_id = {r.id: r for r in [*synthetic, *reference]}
    order = sorted(range(len(pairs)), key=lambda i: -pairs[i]["cosine"])
    closest = [
        (looks.thumb[by_id[pairs[i]["image_id"]].sha256],
         looks.thumb[by_id[pairs[i]["nearest_image_id"]].sha256],
         f"cos {pairs[i]['cosine']:.3f} ssim {pairs[i]['ssim'] or 0:.2f}"
         + (" FLAGGED" if pairs[i]["flagged"] else ""))
        for i in order[: figures.MAX_PAIRS] if pairs[i]["nearest_image_id"] in by_id
    ]  # fmt: skip
    ita_fake: dict[int, list[float]] = {}
    ita_real: dict[int, list[float]] = {}
    for refs, into in ((synthetic, ita_fake), (reference, ita_real)):
        for r in refs:
            if r.skin_tone is not None and looks.ita[r.sha256] is not None:
                into.setdefault(r.skin_tone, []).append(looks.ita[r.sha256])  # type: ignore[arg-type]
    projected_real, projected_fake, ratios = pca_2d(real, fake)
    thumbs_fake = [(r.condition, r.skin_tone, looks.thumb[r.sha256]) for r in synthetic]
    thumbs_real = [(r.condition, r.skin_tone, looks.thumb[r.sha256]) for r in reference]
    drawers: dict[str, Callable[[], Any]] = {
        "contact-sheet": lambda: figures.contact_sheet(thumbs_fake, thumbs_real),
        "closest-pairs": lambda: figures.closest_pairs(closest),
        "ita": lambda: figures.ita_boxes(ita_fake, ita_real),
        "pca": lambda: figures.pca_scatter(projected_real, projected_fake, ratios, space),
        "prdc": lambda: figures.prdc_bars(fidelity, space),
    }
    # issue 23's "contact sheet per condition x skin type": the overview above shows the first
    # rows only, so each condition has a sheet of its own (every requested type)
    conditions = sorted({r.condition for r in synthetic})
    for condition, name in figures.condition_sheet_names(conditions).items():
        drawers[name] = functools.partial(
            figures.contact_sheet, thumbs_fake, thumbs_real, condition=condition
        )
    store = object_store(settings)
    for name, formats in figures.draw_all(drawers).items():
        for fmt, data in formats.items():
            media = "image/png" if fmt == "png" else "image/svg+xml"
            store.put_bytes(plot_key(job_id, name, fmt), data, content_type=media)
    return list(drawers)


@app.task(name=EVALUATE_TASK, bind=True, acks_late=True, ignore_result=True)
def evaluate_dataset(self: Task, job_id: str, chunk_index: int) -> dict[str, Any]:
    """Evaluate one synthetic dataset (the database says which and whether)."""
    settings, worker, claim = claim_task_chunk(self, job_id, chunk_index)
    if claim is None:
        return {"job_id": job_id, "skipped": True}
    status, error, done = "succeeded", None, 0
    try:
        with heartbeat(settings, job_id=job_id, index=chunk_index, worker=worker):
            made = evaluate(settings, claim)
        with session_factory(settings.database_url)() as session:
            dataset_id = claim.params["synthetic_dataset"]
            copies.write_pairs(
                session=session, job_id=job_id, dataset_id=dataset_id, rows=made["pairs"]
            )
            engine.set_job_result(session=session, job_id=job_id, result=made["result"])
        done = 1
    except Canceled:
        status = "canceled"
    except Exception as exc:
        log.exception("evaluation %s failed", job_id)
        status, error = "failed", f"{type(exc).__name__}: {exc}"[:4000]
    with session_factory(settings.database_url)() as session:
        job_status = engine.finish_chunk(
            session=session, job_id=job_id, index=chunk_index, status=status, done=done,
            error=error,
        )  # fmt: skip
    log.info("evaluation %s %s", job_id, status)
    return {"job_id": job_id, "status": job_status}
