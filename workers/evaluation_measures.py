"""An evaluation's numbers (issue 23) from feature matrices and decoded images: fidelity and
diversity with their real-vs-real floor, utility (classification accuracy score), skin-tone
fidelity by ITA and the memorisation audit. The measures themselves are models/quality.py,
models/ita.py and models/memorisation.py; this module chooses what they are applied to and
shapes the JSON, naming the feature space in every key (`fd_lite0`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from app.experiments import metrics
from app.experiments.mixtures import paper_batch_size
from app.fitzpatrick import FITZPATRICK_GROUPS
from models.classifier import HeadConfig, TrainOptions, predict, train_head
from models.ita import ITA_BANDS, fitzpatrick_from_ita, spearman
from models.memorisation import calibrate_threshold, copy_fraction
from models.quality import (
    bootstrap_ci,
    centred_percentile_ci,
    frechet_bootstrap,
    frechet_distance,
    kernel_inception_distance,
    kid_bootstrap,
    prdc,
    proportion_ci,
)

PRDC_K = 5
KID_SUBSET = 1000
BOOTSTRAP_RESAMPLES = 1000
# FD and KID intervals: a draw of FD is an eigenproblem (0.13 s with 2,000 rows a side on the
# 2-core CPU, at d 1280 or 2560), a draw of KID a product with kernels made once (bench/RESULTS.md)
FD_BOOTSTRAP_RESAMPLES = 50
KID_BOOTSTRAP_RESAMPLES = 1000
CI_METHOD = (
    "fd and kid (and their floors): 95% percentile bootstrap over the rows of both compared "
    "sets, each drawn with replacement (seeded by the evaluation's seed), the statistic "
    "recomputed on each draw; the percentiles are moved by the draws' mean less the reported "
    "value (the bootstrap's bias estimate: a draw repeats rows, which raises FD as a smaller "
    "sample does), so the interval is the spread of the value at these sample sizes around "
    "it, and an fd interval is clipped at 0. kid's draws leave out pairs of a row with its own "
    "repeat, so each is the unbiased MMD^2 of the whole draws (the reported kid averages "
    "subsets). The intervals err wide: a draw's repeated rows add noise of their own, and on "
    "synthetic features they were 1.4-1.7x the spread of the value over fresh sets of the same "
    "sizes. precision, recall and coverage: Wilson score intervals of the share of images "
    "counted."
)
VALIDATION_SHARE = 0.2  # of each class's training images, for the head's early stopping


def _r(value: float | None, digits: int = 6) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), digits)


def _ci(interval: tuple[float, float]) -> list[float | None]:
    return [_r(interval[0]), _r(interval[1])]


# --- fidelity and diversity -------------------------------------------------------------------


def _frechet(a: np.ndarray, b: np.ndarray) -> float:
    """FD, computed in the span of the two sets' rows when they have fewer rows than dimensions:
    the means and covariances live there, so the distance is the same (an orthogonal change of
    basis) and the eigendecompositions are of (n + m)-sized matrices, not d-sized ones."""
    union = np.concatenate([a, b]).astype(np.float64)
    if len(union) < union.shape[1]:
        basis, _ = np.linalg.qr(union.T)  # (d, n + m), orthonormal columns
        return frechet_distance(a.astype(np.float64) @ basis, b.astype(np.float64) @ basis)
    return frechet_distance(a, b)


def _pair_measures(real: np.ndarray, fake: np.ndarray, *, seed: int) -> dict[str, Any]:
    """FD and KID with their bootstrap intervals, and PRDC, of one pair of sets (None where a
    set is too small for the measure)."""
    out: dict[str, Any] = {}
    if min(len(real), len(fake)) >= 2:
        out["fd"] = _frechet(real, fake)
        draws = frechet_bootstrap(real, fake, resamples=FD_BOOTSTRAP_RESAMPLES, seed=seed)
        out["fd_ci"] = centred_percentile_ci(draws, out["fd"], lowest=0.0)
        size = min(KID_SUBSET, len(real), len(fake))
        mean, std = kernel_inception_distance(real, fake, subset_size=size, seed=seed)
        out["kid"], out["kid_std"] = mean, std
        draws = kid_bootstrap(real, fake, resamples=KID_BOOTSTRAP_RESAMPLES, seed=seed)
        out["kid_ci"] = centred_percentile_ci(draws, mean)
    if min(len(real), len(fake)) > PRDC_K:
        out.update(prdc(real, fake, k=PRDC_K, seed=seed))
    return out


def fidelity_scope(real: np.ndarray, fake: np.ndarray, *, space: str, seed: int) -> dict[str, Any]:
    """One scope's fidelity and diversity, each beside its floor, at matched sizes: the real
    images are split into two disjoint random halves A and B; the floor is every measure
    between A and B, the synthetic value the same measure between the synthetic images (a
    random subsample of |A| of them when there are more) and B. FD and the k-NN measures
    depend on the sizes compared (FD is biased by about d/n): a floor of 2,000 against 2,000
    beside a synthetic value of 50,000 against 4,000 would compare different things."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(real))
    half = len(real) // 2
    a, b = real[order[:half]], real[order[half : 2 * half]]
    total = len(fake)
    if len(fake) > half:
        fake = fake[np.sort(rng.choice(len(fake), size=half, replace=False))]
    found = _pair_measures(b, fake, seed=seed)
    floor = _pair_measures(b, a, seed=seed)
    out: dict[str, Any] = {
        "n_synthetic": total,
        "n_real": len(real),
        "n_compared": {"synthetic": len(fake), "real_half": half},
    }
    for name in ("fd", "kid", "kid_std", "precision", "recall", "density", "coverage"):
        out[f"{name}_{space}"] = _r(found.get(name))
        out[f"{name}_{space}_floor"] = _r(floor.get(name))
    for name in ("fd", "kid"):  # bootstrap intervals (CI_METHOD)
        for suffix, measured in (("", found), ("_floor", floor)):
            interval = measured.get(f"{name}_ci")
            out[f"{name}_{space}{suffix}_ci"] = _ci(interval) if interval else None
    for name, n in (("precision", len(fake)), ("recall", half), ("coverage", half)):
        value = found.get(name)
        hits = round(value * n) if value is not None else None
        out[f"{name}_{space}_ci"] = _ci(proportion_ci(hits, n)) if hits is not None else None
    return out


def fidelity(
    *,
    real: np.ndarray,
    fake: np.ndarray,
    real_keys: dict[str, list[str]],
    fake_keys: dict[str, list[str]],
    space: str,
    seed: int,
) -> dict[str, Any]:
    """Overall, per condition and per Fitzpatrick group (the synthetic images' requested
    type's group), and how the intervals are made; `*_keys` name each row's condition and
    group."""
    out: dict[str, Any] = {
        "ci_method": CI_METHOD,
        "bootstrap_resamples": {"fd": FD_BOOTSTRAP_RESAMPLES, "kid": KID_BOOTSTRAP_RESAMPLES},
        "overall": fidelity_scope(real, fake, space=space, seed=seed),
    }
    for scope, values in (("by_condition", sorted(set(fake_keys["condition"]))),
                          ("by_skin_tone", list(FITZPATRICK_GROUPS))):  # fmt: skip
        key = "condition" if scope == "by_condition" else "group"
        out[scope] = {}
        for value in values:
            r = real[[k == value for k in real_keys[key]]]
            f = fake[[k == value for k in fake_keys[key]]]
            if len(f):
                out[scope][value] = fidelity_scope(r, f, space=space, seed=seed)
    return out


# --- utility: the classification accuracy score (Ravuri and Vinyals 2019) --------------------


def _holdout(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, validation rows): VALIDATION_SHARE of each class (one at least, when it has
    two or more), seeded."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        n_val = max(1, int(len(rows) * VALIDATION_SHARE)) if len(rows) > 1 else 0
        val += rows[:n_val].tolist()
        train += rows[n_val:].tolist()
    return np.array(sorted(train), dtype=np.int64), np.array(sorted(val), dtype=np.int64)


def _head_scores(
    features: np.ndarray, labels: np.ndarray, test: np.ndarray, *, classes: int, seed: int,
    device: torch.device,
) -> np.ndarray:  # fmt: skip
    train, val = _holdout(labels, seed)
    if not len(val):  # a single image per class: it validates on what it trains on
        val = train
    x = torch.from_numpy(features.astype(np.float32))
    y = torch.from_numpy(labels)
    trained = train_head(
        train_features=lambda _epoch, rows: x[train][rows],
        train_labels=y[train],
        val_features=lambda: x[val],
        val_labels=y[val],
        config=HeadConfig(in_features=features.shape[1], n_classes=classes),
        options=TrainOptions(batch_size=paper_batch_size(len(train)), seed=seed),
        device=device,
    )
    return predict(trained.head, torch.from_numpy(test.astype(np.float32))).double().numpy()


def _scored(
    probs: np.ndarray, y: np.ndarray, groups: list[str], classes: list[str], seed: int
) -> dict[str, Any]:
    overall = metrics.classification_metrics(y_true=y, probs=probs, class_names=classes)
    by_group = metrics.group_metrics(y_true=y, probs=probs, groups=groups, class_names=classes)
    correct = probs.argmax(axis=1) == y

    def balanced(rows: np.ndarray) -> float:
        recalls = [correct[rows][y[rows] == c].mean() for c in np.unique(y[rows])]
        return float(np.mean(recalls))

    top1_ci = bootstrap_ci(lambda rows: float(correct[rows].mean()), len(y),
                           resamples=BOOTSTRAP_RESAMPLES, seed=seed)  # fmt: skip
    balanced_ci = bootstrap_ci(balanced, len(y), resamples=BOOTSTRAP_RESAMPLES, seed=seed)
    return {
        "top1": _r(overall["top1"]["value"]),
        "top1_ci": _ci(top1_ci),
        "balanced_accuracy": _r(overall["balanced_accuracy"]),
        "balanced_accuracy_ci": _ci(balanced_ci),
        "by_skin_tone": {
            g: {
                "n": m["n"],
                "top1": _r(m["top1"]["value"]),
                "top1_ci": m["top1"]["ci_wilson"],
                "balanced_accuracy": _r(m["balanced_accuracy"]),
            }
            for g, m in by_group["groups"].items()
        },
    }


def utility(
    *,
    synthetic: np.ndarray,
    synthetic_conditions: Sequence[str],
    real: np.ndarray,
    real_conditions: Sequence[str],
    test: np.ndarray,
    test_conditions: Sequence[str],
    test_groups: list[str],
    seed: int,
    device: torch.device,
) -> dict[str, Any]:
    """The experiments' head trained on the synthetic images alone and, beside it, on as many
    real reference images per class (seeded), both tested on the real test split."""
    classes = sorted(set(synthetic_conditions) & set(test_conditions))
    if len(classes) < 2:
        return {"classes": classes, "note": "fewer than two conditions with test images"}
    index = {c: i for i, c in enumerate(classes)}
    keep_test = np.array([c in index for c in test_conditions])
    y_test = np.array([index[c] for c in test_conditions if c in index], dtype=np.int64)
    groups = [g for g, keep in zip(test_groups, keep_test, strict=True) if keep]
    s_rows = np.array([i for i, c in enumerate(synthetic_conditions) if c in index], dtype=np.int64)
    y_syn = np.array([index[synthetic_conditions[i]] for i in s_rows], dtype=np.int64)
    rng = np.random.default_rng(seed)
    r_rows: list[int] = []
    for c in classes:  # as many real images per class as synthetic ones (all, when fewer)
        pool = [i for i, rc in enumerate(real_conditions) if rc == c]
        want = int((y_syn == index[c]).sum())
        r_rows += sorted(rng.permutation(pool)[:want].tolist())
    y_real = np.array([index[real_conditions[i]] for i in r_rows], dtype=np.int64)
    out: dict[str, Any] = {
        "classes": classes,
        "test_images": len(y_test),
        "train_images": {
            "synthetic": {c: int((y_syn == index[c]).sum()) for c in classes},
            "real": {c: int((y_real == index[c]).sum()) for c in classes},
        },
        "validation_share": VALIDATION_SHARE,
    }
    for name, x, y in (("synthetic", synthetic[s_rows], y_syn), ("real", real[r_rows], y_real)):
        probs = _head_scores(x, y, test[keep_test], classes=len(classes), seed=seed,
                             device=device)  # fmt: skip
        out[name] = _scored(probs, y_test, groups, classes, seed)
    return out


# --- skin-tone fidelity ----------------------------------------------------------------------


def _summary(values: list[float], skin_type: int) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    a = np.array(values)
    inside = sum(fitzpatrick_from_ita(v) == skin_type for v in values)
    q1, median, q3 = np.percentile(a, [25, 50, 75])
    return {
        "n": len(a), "median": _r(median, 3), "q1": _r(q1, 3), "q3": _r(q3, 3),
        "in_band": _r(inside / len(a)), "in_band_ci": _ci(proportion_ci(inside, len(a))),
    }  # fmt: skip


def skin_tone(
    *, synthetic: list[tuple[int | None, float | None]], real: list[tuple[int | None, float | None]]
) -> dict[str, Any]:
    """ITA per requested type (synthetic) beside real images of that type: median, quartiles,
    the share in the type's band (Groh et al. 2021) with a Wilson CI; Spearman(type, ITA)."""
    out: dict[str, Any] = {"bands": [[t, _r(lower)] for t, lower in ITA_BANDS], "by_type": {}}
    for name, rows in (("synthetic", synthetic), ("real", real)):
        pairs = [(t, v) for t, v in rows if t is not None and v is not None]
        out[f"unmeasured_{name}"] = sum(1 for t, v in rows if t is not None and v is None)
        types = np.array([t for t, _ in pairs], dtype=float)
        values = np.array([v for _, v in pairs], dtype=float)
        ok = len(pairs) > 2 and len(set(types.tolist())) > 1
        out[f"spearman_{name}"] = _r(spearman(types, values)) if ok else None
        for skin_type in range(1, 7):
            found = [v for t, v in pairs if t == skin_type]
            out["by_type"].setdefault(str(skin_type), {})[name] = _summary(found, skin_type)
    return out


# --- memorisation ----------------------------------------------------------------------------


def nearest_other(
    queries: np.ndarray, references: np.ndarray, *, query_codes: np.ndarray,
    reference_codes: np.ndarray, device: torch.device, chunk: int = 4096,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Each query's most cosine-similar reference among those whose code differs from its own
    (a code per distinct image bytes: the image itself, its parent); -1 and NaN if none."""
    refs = F.normalize(torch.from_numpy(references.astype(np.float32)).to(device), dim=1)
    codes = torch.from_numpy(reference_codes).to(device)
    index = np.full(len(queries), -1, dtype=np.int64)
    cosine = np.full(len(queries), np.nan, dtype=np.float32)
    for start in range(0, len(queries), chunk):
        part = torch.from_numpy(queries[start : start + chunk].astype(np.float32)).to(device)
        block = F.normalize(part, dim=1) @ refs.T  # (chunk, n)
        mine = torch.from_numpy(query_codes[start : start + chunk]).to(device)
        block[mine[:, None] == codes[None, :]] = -math.inf
        best, where = block.max(dim=1)
        found = torch.isfinite(best).cpu().numpy()
        rows = np.arange(start, start + len(best))[found]
        index[rows] = where.cpu().numpy()[found]
        cosine[rows] = best.cpu().numpy()[found]
    return index, cosine


def rowwise_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    x = F.normalize(torch.from_numpy(a.astype(np.float32)), dim=1)
    y = F.normalize(torch.from_numpy(b.astype(np.float32)), dim=1)
    return (x * y).sum(dim=1).numpy()


def audit_summary(
    *, pairs: list[dict[str, Any]], groups: list[str], threshold: Any, space: str
) -> dict[str, Any]:
    """The copy fraction (nearest OTHER real image at or above the threshold) with its CI,
    per condition and group, the flagged ids, and the children's likeness to their parents."""
    cosines = np.array([p["cosine"] for p in pairs], dtype=float)
    fraction, interval, flagged = copy_fraction(cosines, threshold.value)

    def share(rows: list[int]) -> dict[str, Any]:
        hits = sum(pairs[i]["flagged"] for i in rows)
        return {"n": len(rows), "copies": hits, "fraction": _r(hits / len(rows)) if rows else None,
                "ci": _ci(proportion_ci(hits, len(rows)))}  # fmt: skip

    children = [p for p in pairs if p["parent_cosine"] is not None]
    parent_hits = sum(p["parent_cosine"] >= threshold.value for p in children)
    ssims = [p["ssim"] for p in pairs if p["ssim"] is not None]
    return {
        "threshold": {
            **{k: _r(v) if isinstance(v, float) else v for k, v in asdict(threshold).items()},
            "measure": f"cosine_{space}",
            "rule": "the threshold on the feature cosine that best separates real reference "
            "images' cosine to their own augmented view (copies) from their cosine to the "
            "nearest other reference image (others), by balanced accuracy",
        },
        "audited": len(pairs),
        f"copy_fraction_{space}": _r(fraction),
        f"copy_fraction_{space}_ci": _ci(interval),
        "flagged": [pairs[i]["image_id"] for i in flagged],
        "by_condition": {
            c: share([i for i, p in enumerate(pairs) if p["condition"] == c])
            for c in sorted({p["condition"] for p in pairs})
        },
        "by_skin_tone": {
            g: share([i for i, x in enumerate(groups) if x == g])
            for g in FITZPATRICK_GROUPS
            if g in groups
        },
        f"nearest_cosine_{space}_median": _r(float(np.median(cosines))) if len(pairs) else None,
        "nearest_ssim_median": _r(float(np.median(ssims))) if ssims else None,
        "parents": {
            "note": "children of an edit strategy against their own parent, apart: resembling "
            "its parent is a child's design; resembling another patient is the leak",
            "images": len(children),
            f"cosine_{space}_median": _r(float(np.median([p["parent_cosine"] for p in children])))
            if children
            else None,
            "ssim_median": _r(
                float(
                    np.median(
                        [p["parent_ssim"] for p in children if p["parent_ssim"] is not None]
                        or [np.nan]
                    )
                )
            )
            if children
            else None,
            "at_or_above_threshold": parent_hits,
            "fraction": _r(parent_hits / len(children)) if children else None,
            "ci": _ci(proportion_ci(parent_hits, len(children))),
        },
    }


def calibrate(
    *, eval_features: np.ndarray, view_features: np.ndarray, codes: np.ndarray, device: torch.device
) -> Any:
    """The copy threshold from the reference itself: each image against its augmented view,
    and against its nearest other image."""
    copies = rowwise_cosine(eval_features, view_features)
    _index, others = nearest_other(eval_features, eval_features, query_codes=codes,
                                   reference_codes=codes, device=device)  # fmt: skip
    others = others[~np.isnan(others)]
    if not len(others):  # a single reference image: nothing to tell copies from
        others = np.array([-1.0], dtype=np.float32)
    return calibrate_threshold(copies, others)
