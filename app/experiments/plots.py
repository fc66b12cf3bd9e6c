"""An experiment's figures, drawn from its report and runs: accuracy against n_real for each k
(the paper's figure), the dose-response curve, per-skin-tone bars with confidence intervals,
what synthetic data changed per skin tone, and the training curves. PNG or SVG bytes;
matplotlib's Agg backend, no display, no torch.
"""

from __future__ import annotations

import io
import threading
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import matplotlib

matplotlib.use("Agg")
from matplotlib import pyplot as plt
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

from app.db.tables import Run
from app.errors import InvalidField, NotFound
from app.experiments.grid import Setting
from app.experiments.report_text import (
    SIGNIFICANT,
    has_skin_tones,
    setting_label,
    shown_datasets,
    skin_tone_versus,
)
from app.experiments.reports import build_report
from app.fitzpatrick import FITZPATRICK_GROUPS
from app.schemas import FIGURE_FORMATS

EXPERIMENT_PLOTS = (
    "accuracy-vs-n-real",
    "dose-response",
    "skin-tone",
    "skin-tone-difference",
    "training-curves",
)
FORMATS = FIGURE_FORMATS
LEGEND_INSIDE = 8  # more entries than this go beside the axes
# pyplot keeps global state: one figure at a time per process
_lock = threading.Lock()


def plot_names(params: dict[str, Any]) -> list[str]:
    """The figures an experiment lists: all but the difference from real-only per skin tone
    when its grid has no real+synthetic setting (that figure would be empty)."""
    compares = any(params.get("synthetic_per_real") or [])
    return [n for n in EXPERIMENT_PLOTS if compares or n != "skin-tone-difference"]


def _n_real_x(entry: dict[str, Any]) -> float:
    """n_real per class; `all` is drawn at the mean real images per class it had."""
    n = entry["setting"]["n_real_per_class"]
    if n is not None:
        return float(n)
    classes = max(len(entry.get("classes") or []), 1)
    return (entry["train_real_images"]["mean"] or 0.0) / classes


def _series_label(report: dict[str, Any], setting: dict[str, Any], axis: str) -> str:
    """A line's label: the setting without the field on the x axis."""
    return setting_label(setting, omit=(axis,), datasets=report.get("synthetic_datasets"))


def _spread(items: list[Any], limit: int) -> list[Any]:
    """At most `limit` items, evenly spread over the list, the first and the last kept."""
    if len(items) <= limit:
        return items
    if limit < 2:
        return items[:limit]
    picks = sorted({round(i * (len(items) - 1) / (limit - 1)) for i in range(limit)})
    return [items[i] for i in picks]


def _significant(entry: dict[str, Any], by_tone: dict[str, Any]) -> bool:
    """Whether a setting's top-1 difference, or one of its groups' or its gap's, is significant
    after Holm's correction."""
    overall = (entry.get("versus_real_only") or {}).get("top1") or {}
    parts = [overall, by_tone.get("gap") or {}, *(by_tone.get("groups") or {}).values()]
    return any((part or {}).get("p_holm", 1.0) < SIGNIFICANT for part in parts)


def _significant_then_spread(items: list[tuple[Any, Any]], limit: int) -> list[tuple[Any, Any]]:
    """At most `limit` (entry, by_tone) pairs in the report's order: every significant setting
    (up to the limit), the other places evenly spread over the rest."""
    if len(items) <= limit:
        return items
    keep = [i for i, (entry, by_tone) in enumerate(items) if _significant(entry, by_tone)][:limit]
    rest = [i for i in range(len(items)) if i not in keep]
    if limit > len(keep):
        keep += _spread(rest, limit - len(keep))
    return [items[i] for i in sorted(keep)]


def _errorbar_lines(ax: Any, series: dict[str, list[tuple[float, float, float]]]) -> None:
    for label, points in series.items():  # the report's order: numeric n_real and k
        points.sort()
        xs = [p[0] for p in points]
        ys = [p[1] for p in points]
        errors = [p[2] for p in points]
        ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=label)


def accuracy_vs_n_real(report: dict[str, Any]) -> Figure:
    """Top-1 accuracy (mean +- sd over seeds) against real images per class, a line per k."""
    figure, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    ticks: dict[float, set[str]] = defaultdict(set)
    for entry in report["settings"]:
        mean = entry["top1"]["mean"]
        if mean is None:
            continue
        label = _series_label(report, entry["setting"], "n_real_per_class")
        entry = {**entry, "classes": report.get("classes")}
        x = _n_real_x(entry)
        n = entry["setting"]["n_real_per_class"]
        ticks[x].add(f"{n:g}" if n is not None else f"all\n(~{x:.0f})")
        series[label].append((x, mean, entry["top1"]["sd"] or 0.0))
    _errorbar_lines(ax, series)
    ax.set_xscale("log", base=2)
    # a tick at every n_real drawn, in numbers (not powers of 2), and `all` named at its mean:
    # on a log axis alone it would read as the nearest power of 2
    ax.set_xticks(sorted(ticks), ["\n".join(sorted(ticks[x])) for x in sorted(ticks)])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("real training images per class (n_real)")
    ax.set_ylabel("test top-1 accuracy (mean ± sd over seeds)")
    ax.set_title("Accuracy against real data, per synthetic:real ratio k")
    return figure


def dose_response(report: dict[str, Any]) -> Figure:
    """Top-1 accuracy against k, a line per n_real (k = 0 is the real-only setting)."""
    figure, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    real_only = [e for e in report["settings"] if not e["setting"]["synthetic_per_real"]]
    controls = {Setting.from_config(e["setting"]): e for e in real_only}
    for entry in report["settings"]:
        setting, mean = entry["setting"], entry["top1"]["mean"]
        if mean is None or not setting["synthetic_per_real"]:
            continue
        label = _series_label(report, setting, "synthetic_per_real")
        series[label].append(
            (float(setting["synthetic_per_real"]), mean, entry["top1"]["sd"] or 0.0)
        )
        control = controls.get(Setting.from_config(setting).real_only())
        if (
            control is not None
            and control["top1"]["mean"] is not None
            and not any(p[0] == 0.0 for p in series[label])
        ):
            series[label].append((0.0, control["top1"]["mean"], control["top1"]["sd"] or 0.0))
    if not series:  # real-only experiments: one point per n_real at k = 0
        for entry in real_only:
            if entry["top1"]["mean"] is not None:
                label = entry["label"]
                series[label].append((0.0, entry["top1"]["mean"], entry["top1"]["sd"] or 0.0))
    _errorbar_lines(ax, series)
    ax.set_xlabel("synthetic images per real image (k)")
    ax.set_ylabel("test top-1 accuracy (mean ± sd over seeds)")
    ax.set_title("Dose-response: accuracy against the synthetic:real ratio")
    return figure


def skin_tone_bars(report: dict[str, Any], limit: int = 8) -> Figure:
    """Top-1 accuracy per Fitzpatrick group (pooled over seeds, Wilson 95% CI), a bar per
    setting."""
    entries = _spread(report["settings"], limit)
    figure, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / max(len(entries), 1)
    for i, entry in enumerate(entries):
        xs, ys, low, high = [], [], [], []
        for g, group in enumerate(FITZPATRICK_GROUPS):
            pooled = entry["by_skin_tone"][group]["pooled"]
            if pooled["value"] is None:
                continue
            lo, hi = pooled["ci_wilson"]
            xs.append(g + (i - (len(entries) - 1) / 2) * width)
            ys.append(pooled["value"])
            low.append(pooled["value"] - lo)
            high.append(hi - pooled["value"])
        ax.bar(xs, ys, width=width, yerr=[low, high], capsize=2, label=entry["label"])
    counts = [
        max(e["by_skin_tone"][g]["pooled"]["n"] for e in entries) if entries else 0
        for g in FITZPATRICK_GROUPS
    ]
    ax.set_xticks(range(len(FITZPATRICK_GROUPS)))
    ax.set_xticklabels([f"{g}\n(n={n})" for g, n in zip(FITZPATRICK_GROUPS, counts, strict=True)])
    ax.set_ylim(0, 1)
    ax.set_ylabel("test top-1 accuracy, mean over seeds (95% Wilson CI)")
    title = "Accuracy per Fitzpatrick skin type group"
    if entries and not has_skin_tones(report):
        title += " (no test image has a Fitzpatrick type)"
    ax.set_title(title)
    if entries:  # beside the axes: bars fill the whole plot, any place inside covers some
        figure.set_size_inches(10.5, 4.5)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return figure


def skin_tone_difference(report: dict[str, Any], limit: int = 8) -> Figure:
    """Per Fitzpatrick group, top-1 of each real+synthetic setting minus real-only (points,
    paired bootstrap 95% CI), and the change of the skin-tone gap beside them."""
    every = [
        (entry, by_tone) for entry in report["settings"] if (by_tone := skin_tone_versus(entry))
    ]
    compared = _significant_then_spread(every, limit)
    figure, ax = plt.subplots(figsize=(10.5, 4.5))
    columns = [g for g in FITZPATRICK_GROUPS if any(t["groups"][g] for _, t in compared)]
    columns.append("gap")
    width = 0.8 / max(len(compared), 1)
    for i, (entry, by_tone) in enumerate(compared):
        xs, ys, low, high = [], [], [], []
        for c, column in enumerate(columns):
            value = by_tone["gap"] if column == "gap" else by_tone["groups"][column]
            if not value:
                continue
            lo, hi = value["ci"]
            xs.append(c + (i - (len(compared) - 1) / 2) * width)
            ys.append(value["difference"] * 100)
            low.append((value["difference"] - lo) * 100)
            high.append((hi - value["difference"]) * 100)
        ax.errorbar(xs, ys, yerr=[low, high], fmt="o", capsize=3, label=entry["label"])
    ax.axhline(0.0, color="black", linewidth=0.8)
    if len(columns) > 1:
        ax.axvline(len(columns) - 1.5, color="grey", linestyle="--", linewidth=0.8)

    def tick(column: str) -> str:
        if column == "gap":
            return "gap change\n(< 0: narrower)"
        n = max((t["groups"][column]["n_images"] for _, t in compared if t["groups"][column]))
        return f"{column}\n(n={n})"

    ax.set_xticks(range(len(columns)))
    ax.set_xticklabels([tick(c) for c in columns])
    ax.set_ylabel("Δ test top-1 vs real-only (points, 95% CI)")
    title = "Real+synthetic minus real-only, per Fitzpatrick skin type group"
    if len(compared) < len(every):
        title += (
            f"\n({len(compared)} of {len(every)} settings: every one with a difference significant"
            " after Holm, then an even spread; report.md has all)"
        )
    if not has_skin_tones(report):
        title += "\n(no test image has a Fitzpatrick type)"
    elif not compared:
        title += "\n(no real+synthetic setting with a real-only control)"
    ax.set_title(title)
    if compared:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return figure


def training_curves(
    runs: list[Run], dataset_names: Mapping[str, str] | None = None, limit: int = 10
) -> Figure:
    """Validation loss (solid) and training loss (dotted) per epoch, a colour per setting; at
    most `limit` settings, evenly spread (every run has its own figure too)."""
    figure, ax = plt.subplots(figsize=(7, 4.5))
    shown = shown_datasets((run.config for run in runs), dataset_names or {})
    by_label: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        if run.history:
            setting = Setting.from_config(run.config).as_dict()
            by_label[setting_label(setting, datasets=shown)].append(run)
    labels = _spread(list(by_label), limit)
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, label in enumerate(labels):
        colour = cycle[i % len(cycle)]
        for j, run in enumerate(by_label[label]):
            history = run.history or []
            epochs = [h["epoch"] for h in history]
            ax.plot(epochs, [h["val_loss"] for h in history], color=colour,
                    label=None if j else label)  # fmt: skip
            ax.plot(epochs, [h["train_loss"] for h in history], color=colour, linestyle=":")
            if run.best_epoch:
                best = history[run.best_epoch - 1]["val_loss"]
                ax.plot([run.best_epoch], [best], "o", color=colour)
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy (solid: validation, dotted: training)")
    title = "Training curves (dot: the restored best epoch)"
    if len(labels) < len(by_label):
        title += f"\n{len(labels)} of {len(by_label)} settings"
    ax.set_title(title)
    return figure


def render(figure: Figure, fmt: str) -> bytes:
    """A figure as PNG or SVG bytes, its legend placed where it covers no data; closes it."""
    if fmt not in FORMATS:
        raise InvalidField(f"format: {fmt!r} is not one of {', '.join(FORMATS)}", field="format")
    # a figure that placed its own legend keeps it
    handles = [] if figure.axes[0].get_legend() else figure.axes[0].get_legend_handles_labels()[0]
    if len(handles) > LEGEND_INSIDE:  # beside the axes, where it covers no data
        width, height = figure.get_size_inches()
        figure.set_size_inches(width + 2.5, height)
        figure.axes[0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    elif handles:
        figure.axes[0].legend(fontsize=8)
    figure.axes[0].grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format=fmt, dpi=120)
    plt.close(figure)
    return buffer.getvalue()


def experiment_plot(
    *,
    name: str,
    fmt: str,
    runs: list[Run],
    classes: list[str],
    dataset_names: Mapping[str, str] | None = None,
) -> bytes:
    """One of EXPERIMENT_PLOTS as PNG or SVG bytes (the report is built only for the figures
    drawn from it)."""
    if name not in EXPERIMENT_PLOTS:
        raise NotFound(f"no plot {name!r}; plots: {', '.join(EXPERIMENT_PLOTS)}")
    if name == "training-curves":
        builder = lambda: training_curves(runs, dataset_names)  # noqa: E731
    else:
        report = build_report(runs=runs, classes=classes, dataset_names=dataset_names)
        builder = {
            "accuracy-vs-n-real": lambda: accuracy_vs_n_real(report),
            "dose-response": lambda: dose_response(report),
            "skin-tone": lambda: skin_tone_bars(report),
            "skin-tone-difference": lambda: skin_tone_difference(report),
        }[name]
    with _lock:
        return render(builder(), fmt)


def run_plot(*, run: Run, fmt: str) -> bytes:
    """A run's training curve."""
    with _lock:
        return render(training_curves([run]), fmt)
