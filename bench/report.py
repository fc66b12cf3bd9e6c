"""An experiment's report and figures at the paper's size, built as `GET /experiments/{id}` and
`GET /experiments/{id}/plots/NAME.png` build them on every request: n_real 8..128 and all x
k 0, 10, 25, 50, 75 x 2 strategies x augmentation x 3 seeds = 324 runs (108 settings), 9
classes, 819 test images (the Fitzpatrick17k test set's size). Metrics are made by the metrics
module from random predictions, as a worker's are; no database.

    python -m bench.report
    python -m bench.report --test-images 5000 --seeds 5

The baseline, in the same run: the report as it was built before (commit 86bd8fa), where every
comparison with real-only drew its own bootstrap indices and gathered per-image differences.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import time
from typing import Any

import numpy as np

from app.db.tables import Run
from app.experiments import metrics, plots
from app.experiments.reports import build_report

N_REAL = (8, 16, 32, 64, 128, None)
KS = (0, 10, 25, 50, 75)
STRATEGIES = ("inpaint", "text-to-image")


def fake_run(config: dict[str, Any], *, classes: list[str], test_images: int, seed: int) -> Run:
    """A succeeded run whose metrics come from the metrics module, on random predictions."""
    rng = np.random.default_rng(seed)
    y_true = np.arange(test_images) % len(classes)
    probs = rng.dirichlet(np.ones(len(classes)), size=test_images)
    groups = [metrics.FITZPATRICK_GROUPS[i % 4] for i in range(test_images)]
    correct = {
        k: metrics.correctness_string(metrics.top_k_correct(y_true=y_true, probs=probs, k=k))
        for k in (1, 3)
    }
    values = {
        **metrics.classification_metrics(y_true=y_true, probs=probs, class_names=classes),
        "by_skin_tone": metrics.group_metrics(
            y_true=y_true, probs=probs, groups=groups, class_names=classes
        ),
        "test_image_ids": [f"image-{i:08d}" for i in range(test_images)],
        "test_groups": groups,
        "test_correct_top1": correct[1],
        "test_correct_top3": correct[3],
    }
    return Run(id=f"run-{seed}", status="succeeded", config=config, metrics=values, split={},
               history=[{"epoch": 1, "train_loss": 1.0, "val_loss": 1.0, "val_accuracy": 0.5}],
               best_epoch=1)  # fmt: skip


def paper_runs(*, classes: list[str], test_images: int, seeds: int) -> list[Run]:
    runs = []
    for n, k, aug in itertools.product(N_REAL, KS, (False, True)):
        for strategy in STRATEGIES if k else (None,):
            for seed in range(seeds):
                config = {"n_real_per_class": n, "synthetic_per_real": k, "strategy": strategy,
                          "synthetic_dataset": "synthetic" if k else None, "augmentation": aug,
                          "seed": seed}  # fmt: skip
                runs.append(fake_run(config, classes=classes, test_images=test_images,
                                     seed=len(runs)))  # fmt: skip
    return runs


def gathered_bootstrap(
    *, treated: np.ndarray, control: np.ndarray, resamples: int = 2000, seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:  # fmt: skip
    """The baseline: paired_bootstrap_difference as it was, fresh indices for each call."""
    treated_matrix = np.atleast_2d(treated).astype(np.float64)
    control_matrix = np.atleast_2d(control).astype(np.float64)
    n_images = treated_matrix.shape[1]
    per_image = treated_matrix.mean(axis=0) - control_matrix.mean(axis=0)
    rng = np.random.default_rng(seed)
    statistics = per_image[rng.integers(0, n_images, size=(resamples, n_images))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(statistics, [tail, 1.0 - tail])
    p_value = min(1.0, 2.0 * min(float(np.mean(statistics <= 0)), float(np.mean(statistics >= 0))))
    return {"difference": float(per_image.mean()), "ci": [float(low), float(high)],
            "p_value": p_value}  # fmt: skip


def timed(function: Any) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--test-images", type=int, default=819)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    classes = [f"condition-{i}" for i in range(9)]
    runs = paper_runs(classes=classes, test_images=args.test_images, seeds=args.seeds)
    settings = len(build_report(runs=runs, classes=classes)["settings"])
    print(f"{len(runs)} runs, {settings} settings, {args.test_images} test images, "
          f"{platform.processor() or 'CPU'}")  # fmt: skip

    current = metrics.paired_bootstrap_difference
    metrics.paired_bootstrap_difference = gathered_bootstrap  # type: ignore[assignment]
    try:
        baseline = timed(lambda: build_report(runs=runs, classes=classes))
    finally:
        metrics.paired_bootstrap_difference = current
    report = timed(lambda: build_report(runs=runs, classes=classes))
    print(f"report, indices drawn per comparison (baseline): {baseline:.2f} s")
    print(f"report, one resampling per test set:             {report:.2f} s")
    print(f"ratio: {baseline / report:.1f}x")
    for name in plots.EXPERIMENT_PLOTS:
        seconds = timed(
            lambda n=name: plots.experiment_plot(name=n, fmt="png", runs=runs, classes=classes)
        )
        print(f"plot {name + '.png':<24} {seconds:.2f} s")


if __name__ == "__main__":
    main()
