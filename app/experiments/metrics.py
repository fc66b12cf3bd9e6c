"""Classifier evaluation metrics: accuracy with CIs, balanced accuracy, macro AUROC, per
Fitzpatrick group with the gap between groups, and paired bootstrap differences between arms.
Pure numpy (no torch, sklearn or scipy: app/ is the slim API image) and no database access."""

from __future__ import annotations

import math
from collections.abc import Iterator
from functools import lru_cache
from statistics import NormalDist
from typing import Any

import numpy as np

from app.fitzpatrick import FITZPATRICK_GROUPS, SKIN_TONE_GROUPS

# The gap between groups is a skin-tone gap: "unknown" is missing data, not a skin tone, so a
# model doing badly on unlabelled images must not show up as a Fitzpatrick disparity.
GAP_GROUPS = SKIN_TONE_GROUPS
GAP_METRICS = ("top1", "top3", "balanced_accuracy", "macro_auroc")
CI_METHODS = ("normal", "wilson")

# Bootstrap blocks stay near 32 MiB whatever the test set's size; a resampling that fits in
# one block is kept (a report compares many settings on the same test images).
_BLOCK_ELEMENTS = 1 << 22


def _z(level: float) -> float:
    """The two-sided standard normal quantile for a confidence level (1.959964 at 0.95)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be strictly between 0 and 1, got {level!r}")
    return NormalDist().inv_cdf(1.0 - (1.0 - level) / 2.0)


def proportion_ci(
    *, successes: int, n: int, method: str = "wilson", level: float = 0.95
) -> tuple[float, float] | None:
    """A confidence interval for successes/n ("normal" = Wald, or "wilson"); None when n == 0."""
    if method not in CI_METHODS:
        raise ValueError(f"method must be one of {CI_METHODS}, got {method!r}")
    if not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    z = _z(level)
    if n == 0:
        return None
    p = successes / n
    if method == "normal":
        # Same as statsmodels proportion_confint(method="normal"): degenerate at p = 0 or 1.
        half = z * math.sqrt(p * (1.0 - p) / n)
        low, high = p - half, p + half
    else:
        # Wilson (1927) score interval: keeps its width at p = 0 or 1 and small n.
        z2 = z * z
        denominator = 1.0 + z2 / n
        center = (p + z2 / (2.0 * n)) / denominator
        half = z / denominator * math.sqrt(p * (1.0 - p) / n + z2 / (4.0 * n * n))
        low, high = center - half, center + half
    return max(0.0, low), min(1.0, high)


def _check_predictions(*, y_true: Any, probs: Any) -> tuple[np.ndarray, np.ndarray]:
    """y_true as (N,) int64 and probs as (N, C) float64, or a ValueError saying what is off."""
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if y.ndim != 1:
        raise ValueError(f"y_true must be 1-D (N,), got shape {y.shape}")
    if y.size == 0:
        y = y.astype(np.int64)  # np.asarray([]) is float64
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y_true must hold integer class indices, got dtype {y.dtype}")
    if p.ndim != 2 or p.shape[0] != y.shape[0]:
        raise ValueError(f"probs must be (N, C) with N = {y.shape[0]}, got shape {p.shape}")
    if p.shape[1] == 0:
        raise ValueError("probs must have at least one class column")
    if y.size and (y.min() < 0 or y.max() >= p.shape[1]):
        raise ValueError(f"y_true must lie in 0..{p.shape[1] - 1}")
    return y.astype(np.int64, copy=False), p


def top_k_correct(*, y_true: np.ndarray, probs: np.ndarray, k: int) -> np.ndarray:
    """(N,) bool: is the true class among the k most probable (ties go to the lower index)."""
    y, p = _check_predictions(y_true=y_true, probs=probs)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    top = np.argsort(-p, axis=1, kind="stable")[:, :k]  # (N, min(k, C)), stable: lower index first
    return np.asarray((top == y[:, None]).any(axis=1), dtype=bool)


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of a 1-D array, tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts_tie_run = np.empty(len(values), dtype=bool)
    starts_tie_run[:1] = True
    starts_tie_run[1:] = ordered[1:] != ordered[:-1]
    run = np.cumsum(starts_tie_run) - 1  # tie run of each sorted position
    first = np.flatnonzero(starts_tie_run)  # 0-based start of each run
    last = np.append(first[1:], len(values)) - 1  # 0-based end of each run
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = ((first + last) / 2.0 + 1.0)[run]
    return ranks


def _binary_auroc(*, positive: np.ndarray, scores: np.ndarray) -> float:
    """AUROC as the Mann-Whitney U over (positive, negative) pairs, a tie counting 1/2."""
    n_positive = int(positive.sum())
    n_negative = len(positive) - n_positive
    rank_sum = float(_average_ranks(scores)[positive].sum())
    return (rank_sum - n_positive * (n_positive + 1) / 2.0) / (n_positive * n_negative)


def macro_auroc(*, y_true: np.ndarray, probs: np.ndarray) -> float | None:
    """Mean one-vs-rest AUROC over classes with both a positive and a negative; else None."""
    y, p = _check_predictions(y_true=y_true, probs=probs)
    # A class absent from (or the only class of) the labels has no defined AUROC; skipping it
    # rather than scoring it 0.5 keeps small per-group subsets from being pulled to chance.
    values = [
        _binary_auroc(positive=y == c, scores=p[:, c])
        for c in range(p.shape[1])
        if 0 < int((y == c).sum()) < len(y)
    ]
    return float(np.mean(values)) if values else None


def _accuracy(*, correct: np.ndarray, level: float) -> dict[str, Any]:
    """Value, count and both intervals for one (N,) correctness vector."""
    n, hits = len(correct), int(correct.sum())
    normal = proportion_ci(successes=hits, n=n, method="normal", level=level)
    wilson = proportion_ci(successes=hits, n=n, method="wilson", level=level)
    return {
        "value": hits / n if n else None,
        "correct": hits,
        "ci_normal": list(normal) if normal else None,
        "ci_wilson": list(wilson) if wilson else None,
    }


def classification_metrics(
    *, y_true: np.ndarray, probs: np.ndarray, class_names: list[str], level: float = 0.95
) -> dict[str, Any]:
    """Top-1/top-3 with CIs, balanced accuracy, macro AUROC, recalls and confusion, JSON-ready."""
    y, p = _check_predictions(y_true=y_true, probs=probs)
    n_classes = p.shape[1]
    if len(class_names) != n_classes or len(set(class_names)) != n_classes:
        raise ValueError(f"class_names must be {n_classes} distinct names, got {class_names!r}")
    _z(level)  # a bad level fails here too, not only once some group has images

    predicted = np.argmax(p, axis=1)  # first maximum: ties go to the lower index, as in top-k
    confusion = np.bincount(y * n_classes + predicted, minlength=n_classes * n_classes)
    confusion = confusion.reshape(n_classes, n_classes)  # (true, predicted)
    support = confusion.sum(axis=1)
    recall = [
        int(confusion[c, c]) / int(support[c]) if support[c] else None for c in range(n_classes)
    ]
    # Balanced accuracy over the classes present only: an absent class has no recall to average.
    present = [r for r in recall if r is not None]
    return {
        "n": len(y),
        "top1": _accuracy(correct=top_k_correct(y_true=y, probs=p, k=1), level=level),
        "top3": _accuracy(
            correct=top_k_correct(y_true=y, probs=p, k=min(3, n_classes)), level=level
        ),
        "balanced_accuracy": sum(present) / len(present) if present else None,
        "macro_auroc": macro_auroc(y_true=y, probs=p),
        "per_class_recall": dict(zip(class_names, recall, strict=True)),
        "per_class_support": {name: int(s) for name, s in zip(class_names, support, strict=True)},
        "confusion": confusion.tolist(),
    }


def group_metrics(
    *,
    y_true: np.ndarray,
    probs: np.ndarray,
    groups: list[str],
    class_names: list[str],
    level: float = 0.95,
) -> dict[str, Any]:
    """classification_metrics per Fitzpatrick group, and each metric's best-minus-worst gap."""
    y, p = _check_predictions(y_true=y_true, probs=probs)
    labels = np.asarray(groups, dtype=object)
    if labels.shape != y.shape:
        raise ValueError(f"groups must have one entry per image ({len(y)}), got {len(groups)}")
    unknown_labels = sorted(set(groups) - set(FITZPATRICK_GROUPS))
    if unknown_labels:
        # A typo like "V-Vl" would otherwise drop its images silently; map with fitzpatrick_group.
        raise ValueError(f"groups must be in {FITZPATRICK_GROUPS}, got {unknown_labels}")
    by_group = {
        group: classification_metrics(
            y_true=y[labels == group],
            probs=p[labels == group],
            class_names=class_names,
            level=level,
        )
        for group in FITZPATRICK_GROUPS
    }
    gap: dict[str, dict[str, Any]] = {}
    for metric in GAP_METRICS:
        # An empty group (n = 0) has every value None, so it drops out here with the rest.
        scored: dict[str, float] = {}
        for group in GAP_GROUPS:
            value = _metric_value(by_group[group], metric)
            if value is not None:
                scored[group] = value
        if len(scored) < 2:
            gap[metric] = {"value": None, "best": None, "worst": None}
            continue
        # max/min keep the first of equal values: ties go to the earlier group in GAP_GROUPS.
        best = max(scored, key=scored.__getitem__)
        worst = min(scored, key=scored.__getitem__)
        gap[metric] = {"value": scored[best] - scored[worst], "best": best, "worst": worst}
    return {"groups": by_group, "gap": gap}


def _metric_value(metrics: dict[str, Any], name: str) -> float | None:
    """One headline number of a classification_metrics result."""
    value = metrics[name]
    return value["value"] if isinstance(value, dict) else value


def summarize(values: list[float | None]) -> dict[str, Any]:
    """Mean and sample sd (ddof=1) over seeds, ignoring None; the values kept as given."""
    present = np.asarray([v for v in values if v is not None], dtype=np.float64)
    return {
        "mean": float(present.mean()) if len(present) else None,
        "sd": float(present.std(ddof=1)) if len(present) >= 2 else None,
        "n": len(present),
        "values": [None if v is None else float(v) for v in values],
    }


def _correctness_matrix(value: np.ndarray, *, name: str) -> np.ndarray:
    """A (runs, images) 0/1 matrix as float64; a single run may come as (images,)."""
    matrix = np.atleast_2d(np.asarray(value))
    if matrix.ndim != 2 or matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty (runs, images) matrix, got {matrix.shape}")
    if not np.isin(matrix, (0, 1)).all():
        raise ValueError(f"{name} must hold correctness (bool or 0/1), not scores")
    return matrix.astype(np.float64)


def _draw_counts(rng: np.random.Generator, rows: int, n_images: int) -> np.ndarray:
    """(rows, n_images) float64: how often each image is drawn in each of `rows` resamples of
    n_images draws with replacement."""
    indices = rng.integers(0, n_images, size=(rows, n_images))
    flat = (np.arange(rows)[:, None] * n_images + indices).ravel()
    return np.bincount(flat, minlength=rows * n_images).reshape(rows, n_images).astype(np.float64)


@lru_cache(maxsize=8)  # a report's test set and its four groups, with room to spare
def _one_block_of_counts(n_images: int, resamples: int, seed: int) -> np.ndarray:
    counts = _draw_counts(np.random.default_rng(seed), resamples, n_images)
    counts.setflags(write=False)
    return counts


def _resample_counts(n_images: int, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """The resamples' draw counts in blocks; the same seed gives the same resamples, so every
    comparison over the same test images is resampled alike (and, when it fits one block,
    the counts are drawn once)."""
    if resamples * n_images <= _BLOCK_ELEMENTS:
        yield _one_block_of_counts(n_images, resamples, seed)
        return
    rng = np.random.default_rng(seed)
    block = max(1, _BLOCK_ELEMENTS // n_images)
    for start in range(0, resamples, block):
        yield _draw_counts(rng, min(block, resamples - start), n_images)


def paired_bootstrap_difference(
    *,
    treated: np.ndarray,
    control: np.ndarray,
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """Accuracy of treated minus control, with a CI from resampling the shared test images."""
    treated_matrix = _correctness_matrix(treated, name="treated")
    control_matrix = _correctness_matrix(control, name="control")
    if treated_matrix.shape[1] != control_matrix.shape[1]:
        raise ValueError(
            "treated and control must score the same test images in the same order: "
            f"{treated_matrix.shape[1]} != {control_matrix.shape[1]} columns"
        )
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    _z(level)
    n_images = treated_matrix.shape[1]

    # Every run has the same N columns, so the statistic on any column multiset equals the mean
    # of per-image differences over those columns: resample one (N,) vector, not both matrices.
    # The same draws for both arms: pairing removes between-image variance.
    per_image = treated_matrix.mean(axis=0) - control_matrix.mean(axis=0)  # (N,)
    # In whole units (per image: correct treated runs x control runs - the other way round), a
    # resample's sum is an exact integer: a resample that is 0 is exactly 0.
    seeds_t, seeds_c = treated_matrix.shape[0], control_matrix.shape[0]
    units = treated_matrix.sum(axis=0) * seeds_c - control_matrix.sum(axis=0) * seeds_t
    statistics = np.concatenate(
        [counts @ units for counts in _resample_counts(n_images, resamples, seed)]
    ) / (n_images * seeds_t * seeds_c)

    return {
        **_interval(
            statistics,
            point=float(per_image.mean()),
            level=level,
            n_images=n_images,
            resamples=resamples,
        ),
        "seeds_treated": int(treated_matrix.shape[0]),
        "seeds_control": int(control_matrix.shape[0]),
    }


def _interval(
    statistics: np.ndarray, *, point: float, level: float, n_images: int, resamples: int
) -> dict[str, Any]:
    """A difference with the percentile CI and two-sided p-value of its resampled values."""
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(statistics, [tail, 1.0 - tail])
    p_value = min(1.0, 2.0 * min(float(np.mean(statistics <= 0)), float(np.mean(statistics >= 0))))
    return {
        "difference": float(point),
        "ci": [float(low), float(high)],
        "resamples": int(resamples),
        "level": float(level),
        "n_images": int(n_images),
        "p_value": p_value,
    }


def _mean_gap(accuracies: np.ndarray) -> np.ndarray:
    """(groups, ..., seeds) accuracies -> (...,) best minus worst group, averaged over seeds
    (a run's gap, as group_metrics gives it, then the mean over seeds as the report's)."""
    return (accuracies.max(axis=0) - accuracies.min(axis=0)).mean(axis=-1)


def group_differences(
    *,
    treated: np.ndarray,
    control: np.ndarray,
    groups: list[str],
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """Per Fitzpatrick group, accuracy of treated minus control with a paired bootstrap CI over
    the group's test images; and the change of the skin-tone gap (best minus worst known group,
    per run, mean over seeds; negative: the gap narrowed) with a bootstrap that resamples each
    group's images apart, so every resample keeps the groups' sizes. A group without images
    is None; the gap needs two known groups with images."""
    treated_matrix = _correctness_matrix(treated, name="treated")
    control_matrix = _correctness_matrix(control, name="control")
    labels = np.asarray(groups, dtype=object)
    if labels.shape != (treated_matrix.shape[1],) or control_matrix.shape[1] != len(labels):
        raise ValueError(
            f"groups must have one entry per test image: {len(labels)} groups, "
            f"{treated_matrix.shape[1]} and {control_matrix.shape[1]} columns"
        )
    unknown_labels = sorted(set(groups) - set(FITZPATRICK_GROUPS))
    if unknown_labels:
        raise ValueError(f"groups must be in {FITZPATRICK_GROUPS}, got {unknown_labels}")

    by_group: dict[str, Any] = {}
    resampled: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # group -> (R, seeds) per arm
    point: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for i, group in enumerate(FITZPATRICK_GROUPS):
        columns = labels == group
        n_images = int(columns.sum())
        if not n_images:
            by_group[group] = None
            continue
        # each group its own draws: groups of one size must not be resampled in step
        group_seed = seed + 1 + i
        t, c = treated_matrix[:, columns], control_matrix[:, columns]
        by_group[group] = paired_bootstrap_difference(
            treated=t, control=c, resamples=resamples, seed=group_seed, level=level
        )
        if group in GAP_GROUPS:
            point[group] = (t.mean(axis=1), c.mean(axis=1))
            # the draws of the group's difference above, again: the same resamples
            resampled[group] = tuple(  # type: ignore[assignment]
                np.concatenate(
                    [counts @ arm.T for counts in _resample_counts(n_images, resamples, group_seed)]
                )
                / n_images
                for arm in (t, c)
            )

    gap: dict[str, Any] | None = None
    if len(point) >= 2:
        scored = list(point)
        observed = [_mean_gap(np.stack([point[g][arm] for g in scored])) for arm in (0, 1)]
        statistics = _mean_gap(np.stack([resampled[g][0] for g in scored])) - _mean_gap(
            np.stack([resampled[g][1] for g in scored])
        )
        gap = {
            **_interval(
                statistics,
                point=float(observed[0] - observed[1]),
                level=level,
                n_images=sum(int((labels == g).sum()) for g in scored),
                resamples=resamples,
            ),
            "treated": float(observed[0]),
            "control": float(observed[1]),
            "groups": scored,
        }
    return {"groups": by_group, "gap": gap}


def holm_adjust(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values, in their order: the i-th smallest
    is multiplied by (m - i + 1), kept at least the one before it and at most 1. Below the
    level, an adjusted value controls the chance of any false finding in the family."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def correctness_string(correct: np.ndarray) -> str:
    """(N,) bool -> "0110...", one character per test image, for compact storage."""
    flags = np.asarray(correct)
    if flags.ndim != 1:
        raise ValueError(f"correct must be 1-D (N,), got shape {flags.shape}")
    if flags.size and not np.isin(flags, (0, 1)).all():
        raise ValueError("correct must hold bool or 0/1 values")
    return (flags.astype(np.uint8) + ord("0")).tobytes().decode("ascii")


def parse_correctness(text: str) -> np.ndarray:
    """The inverse of correctness_string: "0110..." -> (N,) bool."""
    codes = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    if not np.isin(codes, (ord("0"), ord("1"))).all():
        raise ValueError("a correctness string holds only '0' and '1'")
    return codes == ord("1")
