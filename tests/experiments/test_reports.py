"""Report labels and the figures' series: settings that differ only by strategy or by
synthetic dataset must stay apart in the table and in every plot."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from app.db.tables import Run
from app.experiments import metrics, plots
from app.experiments.report_text import (
    experiment_markdown,
    report_rows,
    setting_label,
    skin_tone_difference_rows,
)
from app.experiments.reports import build_report

CLASSES = ["a", "b", "c"]
INPAINT_SET = "11111111-aaaa-4aaa-8aaa-aaaaaaaaaaaa"
TEXT_SET = "22222222-bbbb-4bbb-8bbb-bbbbbbbbbbbb"


def finished_run(
    config: dict[str, Any], *, accuracy: float, seed: int, skin_tones: bool = True
) -> Run:
    """A succeeded run whose metrics come from the metrics module, as a worker's do; without
    `skin_tones` every test image is `unknown` (a dermoscopy set)."""
    rng = np.random.default_rng(seed)
    y_true = np.arange(30) % 3
    probs = rng.dirichlet(np.ones(3), size=30)
    right = rng.random(30) < accuracy
    probs[right, y_true[right]] += 2  # those rows predict their label
    probs /= probs.sum(1, keepdims=True)
    groups = [metrics.FITZPATRICK_GROUPS[i % 4] if skin_tones else "unknown" for i in range(30)]
    values = {
        **metrics.classification_metrics(y_true=y_true, probs=probs, class_names=CLASSES),
        "by_skin_tone": metrics.group_metrics(
            y_true=y_true, probs=probs, groups=groups, class_names=CLASSES
        ),
        "test_image_ids": [f"img-{i}" for i in range(30)],
        "test_groups": groups,
        "test_correct_top1": metrics.correctness_string(
            metrics.top_k_correct(y_true=y_true, probs=probs, k=1)
        ),
        "test_correct_top3": metrics.correctness_string(
            metrics.top_k_correct(y_true=y_true, probs=probs, k=3)
        ),
    }
    return Run(
        id=f"run-{seed}",
        status="succeeded",
        config={**config, "seed": seed},
        metrics=values,
        split={"train_real": dict.fromkeys(CLASSES, config["n_real_per_class"])},
        history=[{"epoch": 1, "train_loss": 1.0, "val_loss": 0.9, "val_accuracy": 0.5}],
        best_epoch=1,
    )


def grid_runs(datasets: dict[str, str]) -> list[Run]:
    """n_real 4 and 8, real-only and k 2 and 4 of each (strategy, dataset), two seeds."""
    settings = [(0, None, None)] + [
        (k, strategy, dataset) for k in (2, 4) for strategy, dataset in datasets.items()
    ]
    runs, seed = [], 0
    for n in (4, 8):
        for k, strategy, dataset in settings:
            for _ in range(2):
                seed += 1
                config = {"n_real_per_class": n, "synthetic_per_real": k, "strategy": strategy,
                          "synthetic_dataset": dataset, "augmentation": False}  # fmt: skip
                runs.append(finished_run(config, accuracy=0.5 + 0.05 * k, seed=seed))
    return runs


def legend(figure: Any) -> list[str]:
    labels = figure.axes[0].get_legend_handles_labels()[1]
    plots.plt.close(figure)
    return labels


def test_labels_name_the_strategy_and_leave_out_an_only_dataset() -> None:
    setting = {"n_real_per_class": 16, "synthetic_per_real": 10, "strategy": "inpaint",
               "synthetic_dataset": INPAINT_SET, "augmentation": True}  # fmt: skip
    assert setting_label(setting) == "n=16 k=10 inpaint aug"
    assert setting_label(setting, omit=("synthetic_per_real",)) == "n=16 inpaint aug"
    assert setting_label(setting, datasets={INPAINT_SET: "inpaint-v1"}) == (
        "n=16 k=10 inpaint inpaint-v1 aug"
    )
    real_only = {**setting, "synthetic_per_real": 0, "strategy": None, "synthetic_dataset": None}
    assert setting_label(real_only) == "n=16 k=0 aug"
    assert setting_label({**real_only, "n_real_per_class": None}) == "n=all k=0 aug"

    report = build_report(
        runs=grid_runs({"inpaint": INPAINT_SET}), classes=CLASSES,
        dataset_names={INPAINT_SET: "inpaint-v1"},
    )  # fmt: skip
    assert report["synthetic_datasets"] == {}  # one dataset: not in the labels
    assert [e["label"] for e in report["settings"]] == [
        "n=4 k=0", "n=4 k=2 inpaint", "n=4 k=4 inpaint", "n=8 k=0", "n=8 k=2 inpaint",
        "n=8 k=4 inpaint",
    ]  # fmt: skip


def test_two_strategies_stay_apart_in_the_table_and_the_figures() -> None:
    report = build_report(
        runs=grid_runs({"inpaint": INPAINT_SET, "text-to-image": TEXT_SET}),
        classes=CLASSES,
        dataset_names={INPAINT_SET: "inpaint-v1", TEXT_SET: "t2i-v1"},
    )
    labels = [e["label"] for e in report["settings"]]
    assert len(labels) == len(set(labels)) == 10
    assert "n=4 k=2 inpaint inpaint-v1" in labels and "n=4 k=2 text-to-image t2i-v1" in labels
    _header, rows = report_rows(report)
    assert [row[0] for row in rows] == labels
    # one dose-response line per (n_real, strategy), each from k = 0 (real-only) to k = 4
    assert sorted(legend(plots.dose_response(report))) == [
        "n=4 inpaint inpaint-v1", "n=4 text-to-image t2i-v1", "n=8 inpaint inpaint-v1",
        "n=8 text-to-image t2i-v1",
    ]  # fmt: skip
    figure = plots.dose_response(report)
    for line in figure.axes[0].lines:
        if line.get_label().startswith("n="):
            assert list(line.get_xdata()) == [0.0, 2.0, 4.0]
    plots.plt.close(figure)
    # one accuracy-vs-n_real line per (k, strategy, dataset), and real-only
    assert sorted(legend(plots.accuracy_vs_n_real(report))) == [
        "k=0", "k=2 inpaint inpaint-v1", "k=2 text-to-image t2i-v1", "k=4 inpaint inpaint-v1",
        "k=4 text-to-image t2i-v1",
    ]  # fmt: skip


def test_a_dataset_without_a_name_shows_the_start_of_its_id() -> None:
    report = build_report(
        runs=grid_runs({"inpaint": INPAINT_SET, "text-to-image": TEXT_SET}), classes=CLASSES
    )
    assert report["synthetic_datasets"] == {INPAINT_SET: "11111111", TEXT_SET: "22222222"}
    assert "n=8 k=4 text-to-image 22222222" in [e["label"] for e in report["settings"]]


@pytest.mark.parametrize("name", plots.EXPERIMENT_PLOTS)
def test_every_figure_draws_with_two_datasets(name: str) -> None:
    runs = grid_runs({"inpaint": INPAINT_SET, "text-to-image": TEXT_SET})
    png = plots.experiment_plot(
        name=name, fmt="png", runs=runs, classes=CLASSES,
        dataset_names={INPAINT_SET: "inpaint-v1", TEXT_SET: "t2i-v1"},
    )  # fmt: skip
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_curves_show_at_most_limit_settings() -> None:
    runs = grid_runs({"inpaint": INPAINT_SET, "text-to-image": TEXT_SET})
    figure = plots.training_curves(runs, {INPAINT_SET: "inpaint-v1"}, limit=4)
    title = figure.axes[0].get_title()
    labels = legend(figure)
    assert len(labels) == 4
    # evenly spread over the 10 settings: the first and the last are kept
    assert labels[0] == "n=4 k=0" and labels[-1] == "n=8 k=4 text-to-image 22222222"
    assert "4 of 10 settings" in title
    assert len(legend(plots.training_curves(runs))) == 10


def test_table_panels_fit_the_width_keep_the_order_and_lead_with_the_setting() -> None:
    from app.cli.experiments import table_panels

    header = ["setting", "a", "bb", "a long header", "d", "e"]
    rows = [["n=8 k=10 inpaint", "1", "22", "x", "48.6 ± 1.9", "+2.3 [-4.1, +8.2]"]]
    width = 50
    panels = table_panels(header, rows, width=width)
    assert all(panel[0] == 0 for panel in panels) and len(panels) > 1
    assert [i for panel in panels for i in panel[1:]] == list(range(1, len(header)))
    for panel in panels:  # each column at its widest cell or header, 3 for borders, 1 closing
        assert sum(max(len(header[i]), len(rows[0][i])) + 3 for i in panel) + 1 <= width
    # a terminal wider than the whole table: one panel; one narrower than a column: it alone
    assert table_panels(header, rows, width=500) == [list(range(len(header)))]
    assert table_panels(header, rows, width=10) == [[0, i] for i in range(1, len(header))]


def test_skin_tone_legend_sits_beside_the_bars() -> None:
    """Bars fill the whole plot: a legend inside would hide some of them."""
    report = build_report(runs=grid_runs({"inpaint": INPAINT_SET}), classes=CLASSES)
    figure = plots.skin_tone_bars(report)
    assert plots.render(figure, "png")[:4] == b"\x89PNG"  # render keeps the figure's legend
    box = figure.axes[0].get_legend().get_window_extent()
    assert box.x0 > figure.axes[0].get_window_extent().x1
    assert len(legend(figure)) == len(report["settings"])


def test_pooled_skin_tone_counts_say_what_they_count() -> None:
    report = build_report(runs=grid_runs({"inpaint": INPAINT_SET}), classes=CLASSES)
    for entry in report["settings"]:
        for group, images in (("I-II", 8), ("III-IV", 8), ("V-VI", 7), ("unknown", 7)):
            pooled = entry["by_skin_tone"][group]["pooled"]
            # two seeds scored the group's test images: correct counts both seeds' predictions
            assert (pooled["n"], pooled["predictions"], pooled["seeds"]) == (images, 2 * images, 2)
            assert pooled["value"] == pytest.approx(pooled["correct"] / pooled["predictions"])


def experiment_of(report: dict[str, Any], **params: Any) -> dict[str, Any]:
    """GET /experiments/{id} as the API returns it, around `report`."""
    return {
        "id": "e0e0e0e0-0000-4000-8000-000000000000", "name": "dose", "status": "succeeded",
        "timings": {"finished_at": "2026-12-02T10:00:00Z"}, "report": report,
        "params": {
            "dataset": "real-id", "test_split": "test", "test_dataset": None,
            "validation_per_class": 40, "n_real_per_class": [4, 8], "synthetic_per_real": [0, 2, 4],
            "strategies": ["inpaint"], "synthetic_datasets": [INPAINT_SET], "augmentation": [False],
            "seeds": [1, 2], "backbone": "efficientnet-lite0", "learning_rate": 0.001,
            "weight_decay": 0.01, "patience": 3, "max_epochs": 50, "image_size": 224,
            "batch_size": None, "cache_features": True, **params,
        },
    }  # fmt: skip


def test_the_markdown_report_says_what_was_trained_on_what_and_how() -> None:
    report = build_report(runs=grid_runs({"inpaint": INPAINT_SET}), classes=CLASSES)
    text = experiment_markdown(
        experiment_of(report), figures=["accuracy-vs-n-real.png", "skin-tone.png"],
        dataset_names={"real-id": "fitz-real", INPAINT_SET: "inpaint-v1"},
    )  # fmt: skip
    lines = text.splitlines()
    assert lines[0] == "# dose"
    assert "runs: 12 succeeded." in text and "finished 2026-12-02T10:00:00Z" in text
    assert "Real dataset `real-id` (fitz-real)" in text
    assert "the `test` split of the real dataset, 30 images (by Fitzpatrick group: I-II 8, " \
        "III-IV 8, V-VI 7, unknown 7)" in text  # fmt: skip
    assert "Classes (3): a, b, c." in text and "Validation: 40 real images per class" in text
    assert f"Synthetic: `{INPAINT_SET}` (inpaint-v1); strategies inpaint." in text
    assert "n_real 4, 8; k 0, 2, 4; augmentation off; seeds 1, 2." in text
    assert "patience 3, at most 50 epochs" in text and "by the paper's rule" in text
    assert "features cached" in text
    # the table: header, rule, a row per setting, in the report's order
    start = lines.index(next(line for line in lines if line.startswith("| setting |")))
    end = lines.index("", start)
    rows = lines[start + 2 : end]
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows] == [
        e["label"] for e in report["settings"]
    ]
    # then the k > 0 settings against real-only, per Fitzpatrick group
    start = lines.index("### Per Fitzpatrick group: real+synthetic minus real-only", end)
    start = lines.index(next(line for line in lines[start:] if line.startswith("| setting |")))
    rows = lines[start + 2 : lines.index("", start)]
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows] == [
        e["label"] for e in report["settings"] if e["setting"]["synthetic_per_real"]
    ]
    assert lines[-1] == "![skin-tone](skin-tone.png)"
    assert "![accuracy-vs-n-real](accuracy-vs-n-real.png)" in lines


def test_the_markdown_report_of_a_held_out_test_set_and_no_finished_runs() -> None:
    empty = {"classes": CLASSES, "runs": {"failed": 2}, "synthetic_datasets": {}, "settings": []}
    text = experiment_markdown(
        experiment_of(empty, test_dataset="held-id", synthetic_datasets=[], batch_size=32,
                      cache_features=False, n_real_per_class=[None], augmentation=[False, True]),
    )  # fmt: skip
    assert "Test set: the held-out dataset `held-id`. Classes (3)" in text
    assert "runs: 2 failed." in text and "No finished runs." in text
    assert "Synthetic:" not in text and "## Figures" not in text
    assert "n_real all;" in text and "augmentation off, on;" in text
    assert "batch size 32;" in text and "computed every epoch (the paper's path)" in text
    held = experiment_markdown(experiment_of(build_report(runs=[], classes=CLASSES),
                                             test_per_class=40))  # fmt: skip
    assert "Test set: 40 images per class held out of the real dataset (one fixed draw" in held


def test_real_per_class_shows_the_range_when_classes_differ() -> None:
    runs = grid_runs({"inpaint": INPAINT_SET})
    for run in runs:
        if run.config["n_real_per_class"] == 8:  # as n_real=all gives: classes short of it
            run.split = {"train_real": {"a": 8, "b": 5, "c": 2}}
    header, rows = report_rows(build_report(runs=runs, classes=CLASSES))
    column = header.index("real/class")
    assert {row[0]: row[column] for row in rows if row[0].endswith("k=0")} == {
        "n=4 k=0": "4",  # every class had 4
        "n=8 k=0": "5 (2-8)",
    }


def test_a_test_set_without_skin_tones_leaves_out_the_group_columns() -> None:
    """ISIC or PH2: no image has a Fitzpatrick type, so four columns of '-' and an empty gap
    would say nothing; the table and report.md leave them out and say why."""
    runs = [
        finished_run({"n_real_per_class": n, "synthetic_per_real": 0, "strategy": None,
                      "synthetic_dataset": None, "augmentation": False},
                     accuracy=0.6, seed=seed, skin_tones=False)
        for n, seed in ((4, 1), (4, 2), (8, 3), (8, 4))
    ]  # fmt: skip
    report = build_report(runs=runs, classes=CLASSES)
    header, rows = report_rows(report)
    # and three classes: top-3 is every run's 100%, no column either
    assert header == ["setting", "seeds", "real/class", "synthetic", "top-1 %", "balanced %",
                      "AUROC", "Δ top-1 vs real-only (pts, 95% CI)", "seeds gaining"]  # fmt: skip
    assert all(len(row) == len(header) for row in rows) and len(rows) == 2
    text = experiment_markdown(experiment_of(report))
    assert "30 images, none with a Fitzpatrick type." in text
    assert "no per-group columns: no test image has a Fitzpatrick type" in text
    assert "*gap*" not in text and "top-1 V-VI" not in text
    figure = plots.skin_tone_bars(report)
    assert figure.axes[0].get_title().endswith("(no test image has a Fitzpatrick type)")
    plots.plt.close(figure)
    # with skin tones, the columns are there (the other tests read them); with four classes,
    # top-3 too
    header, _rows = report_rows(build_report(runs=grid_runs({}), classes=CLASSES))
    assert "top-1 V-VI %" in header and "gap (pts)" in header and "top-3 %" not in header
    header, rows = report_rows(build_report(runs=grid_runs({}), classes=[*CLASSES, "d"]))
    assert "top-3 %" in header and all(len(row) == len(header) for row in rows)


def test_missing_synthetic_children_are_said() -> None:
    """k=2 asked, but only one class's images had children: the table's synthetic count
    alone does not say so; the report warns, by class."""
    runs = grid_runs({"inpaint": INPAINT_SET})
    for run in runs:
        k, n = run.config["synthetic_per_real"], run.config["n_real_per_class"]
        if k:
            run.split = {"train_real": dict.fromkeys(CLASSES, n),
                         "train_synthetic": {"a": n * k, "b": 0, "c": 0},
                         "synthetic_missing": {"a": 0, "b": n * k, "c": n * k}}  # fmt: skip
    report = build_report(runs=runs, classes=CLASSES)
    entry = next(e for e in report["settings"] if e["label"] == "n=4 k=2 inpaint")
    assert entry["synthetic_missing"] == {"total": 16.0, "by_class": {"b": 8.0, "c": 8.0}}
    assert report["warnings"][0] == (
        "n=4 k=2 inpaint: 16 of the 24 synthetic images asked for were missing per run (b 8, "
        "c 8): their parents have fewer than k children in the synthetic dataset"
    )
    assert len(report["warnings"]) == 4  # every k > 0 setting
    text = experiment_markdown(experiment_of(report))
    assert f"**Warning.** {report['warnings'][0]}." in text
    # nothing missing, nothing said
    assert build_report(runs=grid_runs({"inpaint": INPAINT_SET}), classes=CLASSES)["warnings"] == []


def test_classes_the_test_set_barely_covers_are_said() -> None:
    runs = grid_runs({})
    for run in runs:
        run.split = {**(run.split or {}), "test": {"a": 16, "b": 1, "c": 0}}
    warnings = build_report(runs=runs, classes=CLASSES)["warnings"]
    assert warnings == [
        "the test set has fewer than 5 images of some classes (b 1, c 0): their recall is "
        "undefined (0 images) or rests on one or a few images"
    ]


def test_the_markdown_report_says_where_validation_came_from() -> None:
    runs = grid_runs({})
    assert "Validation: 40 real images per class, drawn with each run's seed; training: " \
        "n_real per class from the rest, plus k" in experiment_markdown(
            experiment_of(build_report(runs=runs, classes=CLASSES)))  # fmt: skip
    for run in runs:
        run.split = {**(run.split or {}), "validation_from": "validation split"}
    text = experiment_markdown(experiment_of(build_report(runs=runs, classes=CLASSES)))
    assert "Validation: up to 40 real images per class from the dataset's validation split" in text
    assert "(none of that split trains)" in text


def scored_run(config: dict[str, Any], *, top1: str, seed: int) -> Run:
    """A finished run of `finished_run`'s kind whose eight test images (two per Fitzpatrick
    group, in FITZPATRICK_GROUPS order) were right where `top1` says '1'."""
    run = finished_run(config, accuracy=0.5, seed=seed)
    run.metrics = {
        **(run.metrics or {}),
        "test_image_ids": [f"img-{i}" for i in range(8)],
        "test_groups": [g for g in metrics.FITZPATRICK_GROUPS for _ in range(2)],
        "test_correct_top1": top1,
        "test_correct_top3": "11111111",
    }
    return run


def test_the_difference_per_skin_tone_says_whom_synthetic_data_helped() -> None:
    """Synthetic data fixed the two V-VI images and nothing else: V-VI +100 points, the other
    groups 0, and the gap between the best and the worst skin tone closed (-100 points)."""
    real = {"n_real_per_class": 4, "synthetic_per_real": 0, "strategy": None,
            "synthetic_dataset": None, "augmentation": False}  # fmt: skip
    synthetic = {**real, "synthetic_per_real": 2, "strategy": "inpaint",
                 "synthetic_dataset": INPAINT_SET}  # fmt: skip
    runs = [scored_run(real, top1="11110010", seed=s) for s in (1, 2)]
    runs += [scored_run(synthetic, top1="11111110", seed=s) for s in (1, 2)]
    report = build_report(runs=runs, classes=CLASSES)
    by_tone = report["settings"][1]["versus_real_only"]["by_skin_tone"]["top1"]
    assert by_tone["groups"]["V-VI"]["difference"] == 1.0
    assert by_tone["groups"]["V-VI"]["ci"] == [1.0, 1.0]
    assert by_tone["groups"]["I-II"]["difference"] == 0.0
    assert by_tone["gap"]["control"] == 1.0 and by_tone["gap"]["treated"] == 0.0
    assert report["settings"][0]["versus_real_only"] is None  # real-only: no comparison

    header, rows = skin_tone_difference_rows(report)
    assert header == ["setting", "Δ top-1 I-II (pts, 95% CI)", "Δ top-1 III-IV (pts, 95% CI)",
                      "Δ top-1 V-VI (pts, 95% CI)", "Δ top-1 unknown (pts, 95% CI)",
                      "Δ gap (pts, 95% CI)"]  # fmt: skip
    # starred: every resample moved V-VI and the gap (p = 0, after Holm's correction too)
    assert rows == [
        ["n=4 k=2 inpaint", "+0.0 [+0.0, +0.0]", "+0.0 [+0.0, +0.0]",
         "+100.0 [+100.0, +100.0] *", "+0.0 [+0.0, +0.0]", "-100.0 [-100.0, -100.0] *"],
    ]  # fmt: skip
    assert report["comparisons"] == {"top1": 1, "top3": 1, "by_skin_tone": 5}
    text = experiment_markdown(experiment_of(report))
    assert "### Per Fitzpatrick group: real+synthetic minus real-only" in text
    assert "\\*: p < 0.05 after Holm's correction for the 5 comparisons of the table" in text
    assert "| n=4 k=2 inpaint | +0.0 [+0.0, +0.0] |" in text

    figure = plots.skin_tone_difference(report)
    ax = figure.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == [
        "I-II\n(n=2)", "III-IV\n(n=2)", "V-VI\n(n=2)", "unknown\n(n=2)",
        "gap change\n(< 0: narrower)",
    ]  # fmt: skip
    points = ax.lines[0].get_ydata()  # one setting: its differences in points, left to right
    assert list(points) == [0.0, 0.0, 100.0, 0.0, -100.0]
    assert legend(figure) == ["n=4 k=2 inpaint"]


def test_no_difference_per_skin_tone_without_skin_tones_or_groups() -> None:
    # runs stored before test_groups was: no per-group comparison, the rest stands
    runs = grid_runs({"inpaint": INPAINT_SET})
    for run in runs:
        del (run.metrics or {})["test_groups"]
    report = build_report(runs=runs, classes=CLASSES)
    versus = report["settings"][1]["versus_real_only"]
    assert versus["top1"] is not None and versus["by_skin_tone"] is None
    assert skin_tone_difference_rows(report)[1] == []
    assert "### Per Fitzpatrick group" not in experiment_markdown(experiment_of(report))
    figure = plots.skin_tone_difference(report)
    assert "no real+synthetic setting with a real-only control" in figure.axes[0].get_title()
    plots.plt.close(figure)
    # a dermoscopy set (every image unknown): no table either
    runs = [
        finished_run({"n_real_per_class": 4, "synthetic_per_real": k, "strategy": s,
                      "synthetic_dataset": d, "augmentation": False},
                     accuracy=0.6, seed=seed, skin_tones=False)
        for k, s, d, seed in ((0, None, None, 1), (2, "inpaint", INPAINT_SET, 2))
    ]  # fmt: skip
    report = build_report(runs=runs, classes=CLASSES)
    assert skin_tone_difference_rows(report)[1] == []
    figure = plots.skin_tone_difference(report)
    assert "no test image has a Fitzpatrick type" in figure.axes[0].get_title()
    plots.plt.close(figure)


def test_differences_are_starred_only_after_holms_correction() -> None:
    """Many settings x groups: a raw p under 0.05 is not enough for a star; the family's
    Holm-adjusted p is."""
    report = build_report(
        runs=grid_runs({"inpaint": INPAINT_SET, "text-to-image": TEXT_SET}), classes=CLASSES
    )
    assert report["comparisons"] == {"top1": 8, "top3": 8, "by_skin_tone": 8 * 5}
    family = []
    for entry in report["settings"][1:]:
        if not entry["setting"]["synthetic_per_real"]:
            continue
        by_tone = entry["versus_real_only"]["by_skin_tone"]["top1"]
        family += [*by_tone["groups"].values(), by_tone["gap"]]
    p_values = [d["p_value"] for d in family]
    assert [d["p_holm"] for d in family] == pytest.approx(metrics.holm_adjust(p_values))
    assert all(d["p_holm"] >= d["p_value"] for d in family)
    _header, rows = skin_tone_difference_rows(report)
    cells = [cell for row in rows for cell in row[1:]]
    assert [cell.endswith(" *") for cell in cells] == [d["p_holm"] < 0.05 for d in family]
    # this grid has raw p-values under 0.05 that the correction does not star
    assert any(d["p_value"] < 0.05 <= d["p_holm"] for d in family)


def test_the_skin_tone_figure_keeps_every_significant_setting() -> None:
    """With more settings than the figure shows, a significant one is never the one left out
    (an even spread alone dropped the one significant setting of a real experiment)."""
    report = build_report(
        runs=grid_runs({"inpaint": INPAINT_SET, "text-to-image": TEXT_SET}), classes=CLASSES
    )
    compared = [e for e in report["settings"] if e["setting"]["synthetic_per_real"]]
    assert len(compared) == 8
    for entry in compared:  # nothing significant: the figure's spread keeps the first and last
        entry["versus_real_only"]["top1"]["p_holm"] = 0.5
        by_tone = entry["versus_real_only"]["by_skin_tone"]["top1"]
        for part in [*by_tone["groups"].values(), by_tone["gap"]]:
            part["p_holm"] = 0.5
    figure = plots.skin_tone_difference(report, limit=3)
    spread = legend(figure)
    assert spread[0] == compared[0]["label"] and spread[-1] == compared[-1]["label"]
    assert "3 of 8 settings" in figure.axes[0].get_title()
    plots.plt.close(figure)
    left_out = next(e for e in compared if e["label"] not in spread)
    left_out["versus_real_only"]["top1"]["p_holm"] = 0.015
    figure = plots.skin_tone_difference(report, limit=3)
    shown = legend(figure)
    assert left_out["label"] in shown and len(shown) == 3
    order = [e["label"] for e in compared]
    assert shown == sorted(shown, key=order.index)  # the report's order
    plots.plt.close(figure)
    # a group's significance counts as much as the overall one
    left_out["versus_real_only"]["top1"]["p_holm"] = 0.5
    other = next(e for e in compared if e["label"] not in spread and e is not left_out)
    other["versus_real_only"]["by_skin_tone"]["top1"]["groups"]["V-VI"]["p_holm"] = 0.01
    figure = plots.skin_tone_difference(report, limit=3)
    assert other["label"] in legend(figure) and left_out["label"] not in legend(figure)
    plots.plt.close(figure)


def test_the_table_says_how_many_seeds_gain() -> None:
    """The paired CI pools the seeds' predictions; the table also says, seed by seed, whether
    the real+synthetic run beat the real-only run of the same seed."""
    base = {"n_real_per_class": 4, "augmentation": False}
    control = {**base, "synthetic_per_real": 0, "strategy": None, "synthetic_dataset": None}
    treated = {**base, "synthetic_per_real": 2, "strategy": "inpaint",
               "synthetic_dataset": INPAINT_SET}  # fmt: skip
    runs = [finished_run(control, accuracy=0.5, seed=s) for s in (1, 2, 3)]
    runs += [finished_run(treated, accuracy=a, seed=s) for s, a in ((1, 0.9), (2, 0.1), (3, 0.9))]
    report = build_report(runs=runs, classes=CLASSES)
    real_only, mixed = report["settings"]
    by_seed = mixed["versus_real_only"]["top1"]["by_seed"]
    assert by_seed == pytest.approx(
        {
            str(s): t - c
            for s, t, c in zip(
                mixed["seeds"], mixed["top1"]["values"], real_only["top1"]["values"], strict=True
            )
        }
    )
    assert [d > 0 for d in by_seed.values()] == [True, False, True]
    header, rows = report_rows(report)
    column = header.index("seeds gaining")
    assert [row[column] for row in rows] == ["-", "2 of 3"]
    assert "*seeds gaining*: the seeds whose real+synthetic run beat" in experiment_markdown(
        experiment_of(report)
    )
    # seeds that do not pair (another seed's control) are not compared
    runs[0].config["seed"] = 9
    report = build_report(runs=runs, classes=CLASSES)
    assert sorted(report["settings"][1]["versus_real_only"]["top1"]["by_seed"]) == ["2", "3"]


def test_a_difference_a_hair_under_zero_reads_as_zero() -> None:
    from app.experiments.report_text import _difference

    # the mean of per-image differences over seeds can come out as -1e-17
    assert _difference({"difference": -1e-17, "ci": [-0.09, 0.108]}) == "+0.0 [-9.0, +10.8]"
    assert _difference({"difference": -0.027, "ci": [-0.135, 0.081], "p_holm": 0.04}) == (
        "-2.7 [-13.5, +8.1] *"
    )
    assert _difference(None) == "-"


def test_any_two_settings_compare_as_the_report_compares_with_real_only() -> None:
    from app.errors import InvalidField
    from app.experiments.reports import compare_settings

    names = {INPAINT_SET: "inpaint-v1", TEXT_SET: "t2i-v1"}
    runs = grid_runs({"inpaint": INPAINT_SET, "text-to-image": TEXT_SET})
    report = build_report(runs=runs, classes=CLASSES, dataset_names=names)
    entry = next(e for e in report["settings"] if e["label"] == "n=8 k=4 inpaint inpaint-v1")
    versus = entry["versus_real_only"]
    four = [*CLASSES, "d"]  # top-3 is compared with four classes or more
    result = compare_settings(runs=runs, a=entry["label"], b="n=8 k=0", classes=four,
                              dataset_names=names)  # fmt: skip
    assert (result["a"], result["b"]) == ("n=8 k=4 inpaint inpaint-v1", "n=8 k=0")
    assert result["seeds_a"] == entry["seeds"] and len(result["seeds_b"]) == 2
    for name in ("top1", "top3"):
        assert result[name] == {k: v for k, v in versus[name].items() if k != "p_holm"}
    by_tone = versus["by_skin_tone"]["top1"]
    assert result["by_skin_tone"]["top1"]["gap"] == {
        k: v for k, v in by_tone["gap"].items() if k != "p_holm"
    }
    # two strategies at one n and k: what the report alone cannot say; b minus a is -(a - b)
    pair = compare_settings(runs=runs, a="n=8 k=4 inpaint inpaint-v1",
                            b="n=8 k=4 text-to-image t2i-v1", classes=CLASSES,
                            dataset_names=names)  # fmt: skip
    swapped = compare_settings(runs=runs, a="n=8 k=4 text-to-image t2i-v1",
                               b="n=8 k=4 inpaint inpaint-v1", classes=CLASSES,
                               dataset_names=names)  # fmt: skip
    assert pair["top3"] is None  # three classes: every run's top-3 is 100%
    assert pair["top1"]["difference"] == pytest.approx(-swapped["top1"]["difference"])
    low, high = pair["top1"]["ci"]
    assert low <= pair["top1"]["difference"] <= high
    # a label that names no finished setting: the field, and the labels there are
    with pytest.raises(InvalidField, match="a: no finished setting is labelled 'n=8 k=4'") as bad:
        compare_settings(runs=runs, a="n=8 k=4", b="n=8 k=0", classes=CLASSES, dataset_names=names)
    assert bad.value.field == "a" and "'n=8 k=4 inpaint inpaint-v1'" in str(bad.value)
    with pytest.raises(InvalidField, match="b: no finished setting") as bad:
        compare_settings(runs=runs, a="n=8 k=0", b="n=9 k=0", classes=CLASSES, dataset_names=names)
    assert bad.value.field == "b"


def test_datasets_that_share_a_name_get_labels_of_their_own() -> None:
    """Three inpaint datasets all named "fitz-inpaint": three settings labelled apart (the
    start of each id), three legend entries, and /compare refuses the bare name, listing the
    candidates, instead of picking one."""
    from app.errors import InvalidField
    from app.experiments.reports import compare_settings

    sets = {
        "inpaint": "33333333-cccc-4ccc-8ccc-cccccccccccc",
        "inpaint-outpaint": "44444444-dddd-4ddd-8ddd-dddddddddddd",
        "text-to-image": "55555555-eeee-4eee-8eee-eeeeeeeeeeee",
    }
    # one strategy for all three, as a user who made three inpaint datasets would have
    runs = grid_runs(sets)
    for run in runs:
        if run.config["synthetic_per_real"]:
            run.config = {**run.config, "strategy": "inpaint"}
    names = dict.fromkeys(sets.values(), "fitz-inpaint")
    report = build_report(runs=runs, classes=CLASSES, dataset_names=names)
    labels = [e["label"] for e in report["settings"]]
    assert len(labels) == len(set(labels))
    assert "n=8 k=4 inpaint fitz-inpaint (33333333)" in labels
    assert "n=8 k=4 inpaint fitz-inpaint (55555555)" in labels
    lines = legend(plots.dose_response(report))
    assert len(lines) == len(set(lines)) == 6  # (n_real 4, 8) x three datasets

    with pytest.raises(InvalidField, match="ambiguous") as bad:
        compare_settings(runs=runs, a="n=8 k=4 inpaint fitz-inpaint", b="n=8 k=0",
                         classes=CLASSES, dataset_names=names)  # fmt: skip
    assert bad.value.field == "a"
    for prefix in ("33333333", "44444444", "55555555"):
        assert f"'n=8 k=4 inpaint fitz-inpaint ({prefix})'" in str(bad.value)
    chosen = compare_settings(runs=runs, a="n=8 k=4 inpaint fitz-inpaint (44444444)",
                              b="n=8 k=0", classes=CLASSES, dataset_names=names)  # fmt: skip
    assert chosen["a"] == "n=8 k=4 inpaint fitz-inpaint (44444444)"


def test_the_accuracy_plot_names_n_all_on_its_axis() -> None:
    """n=all is drawn at the mean real images per class it had: its tick says `all`, and the
    other ticks are the n_real values, not the log axis' powers of 2."""
    runs, seed = [], 0
    for n in (4, 8, None):
        for k in (0, 2):
            seed += 1
            config = {
                "n_real_per_class": n,
                "synthetic_per_real": k,
                "strategy": "inpaint" if k else None,
                "synthetic_dataset": INPAINT_SET if k else None,
                "augmentation": False,
            }
            run = finished_run(config, accuracy=0.6, seed=seed)
            if n is None:  # every real training image: 40 + 30 + 20 of them
                run.split = {"train_real": {"a": 40, "b": 30, "c": 20}}
            runs.append(run)
    figure = plots.accuracy_vs_n_real(build_report(runs=runs, classes=CLASSES))
    axis = figure.axes[0].xaxis
    ticks = dict(
        zip(axis.get_ticklocs(), [t.get_text() for t in axis.get_ticklabels()], strict=True)
    )
    plots.plt.close(figure)
    assert ticks == {4.0: "4", 8.0: "8", 30.0: "all\n(~30)"}
    assert axis.get_minorticklocs().size == 0
