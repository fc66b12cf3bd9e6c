"""An experiment's report, built from its Run rows: the runs grouped by setting, mean and sd
over seeds, per Fitzpatrick group, and the paired difference of each real+synthetic setting
from its real-only control (Setting.real_only: the same n_real and augmentation). No torch
here (the API builds it); no rendering either: the report as text is report_text.py's.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from app.db.tables import Run
from app.errors import InvalidField
from app.experiments import metrics
from app.experiments.grid import Setting
from app.experiments.report_text import (
    setting_label,
    shown_datasets,
    skin_tone_versus,
    without_id_suffixes,
)
from app.schemas import JobStatus

HEADLINE = ("top1", "top3", "balanced_accuracy", "macro_auroc")


def _value(run_metrics: dict[str, Any], name: str) -> float | None:
    value = run_metrics.get(name)
    return value.get("value") if isinstance(value, dict) else value


def _skin_tone(finished: list[Run]) -> dict[str, Any]:
    """Per group: top-1 mean and sd over seeds, and the mean over seeds with the Wilson CI of
    one test set of the group's size."""
    out: dict[str, Any] = {}
    for group in metrics.FITZPATRICK_GROUPS:
        per_seed, correct, n = [], 0, 0
        for run in finished:
            stats = (run.metrics or {}).get("by_skin_tone", {}).get("groups", {}).get(group, {})
            per_seed.append((stats.get("top1") or {}).get("value"))
            correct += (stats.get("top1") or {}).get("correct") or 0
            n += stats.get("n") or 0
        # the seeds score the same test images: the interval is that of one test set of the
        # group's size at the seeds' mean accuracy, not of n x seeds independent images
        images = n // len(finished) if finished else 0
        value = correct / n if n else None
        out[group] = {
            "top1": metrics.summarize(per_seed),
            "pooled": {
                "correct": correct,  # over every seed's predictions
                "predictions": n,  # the group's test images x seeds: value = correct / this
                "n": images,  # the group's test images
                "seeds": len(finished),
                "value": value,
                "ci_wilson": metrics.proportion_ci(
                    successes=round((value or 0.0) * images), n=images, method="wilson"
                ),
            },
        }
    return out


def _correctness(
    finished: list[Run], name: str
) -> tuple[np.ndarray, list[str], list[str] | None] | None:
    """(seeds, test images) correctness matrix, the test image ids and their Fitzpatrick
    groups (None from runs that did not store them), when every run scored the same test
    images."""
    ids = [(run.metrics or {}).get("test_image_ids") for run in finished]
    strings = [(run.metrics or {}).get(name) for run in finished]
    if not finished or any(i is None or i != ids[0] for i in ids) or None in strings:
        return None
    matrix = np.stack([metrics.parse_correctness(s) for s in strings if s is not None])
    groups = (finished[0].metrics or {}).get("test_groups")
    return matrix, list(ids[0] or []), groups


def build_report(
    *, runs: list[Run], classes: list[str], dataset_names: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The report of an experiment's runs (finished ones count; the others are tallied).
    `dataset_names` (id -> name) names the synthetic datasets in the labels."""
    tally = {status.value: 0 for status in JobStatus}
    shown = shown_datasets((run.config for run in runs), dataset_names or {})
    for run in runs:
        tally[run.status] = tally.get(run.status, 0) + 1
    groups = _finished_by_setting(runs)

    settings: list[dict[str, Any]] = []
    # numeric order, null (all real images; any strategy) last
    for key in sorted(groups, key=Setting.sort_key):
        finished = sorted(groups[key], key=lambda r: r.config["seed"])
        setting = key.as_dict()
        real_counts = [sum((r.split or {}).get("train_real", {}).values()) for r in finished]
        per_class = [n for r in finished for n in (r.split or {}).get("train_real", {}).values()]
        synthetic_counts = [
            sum((r.split or {}).get("train_synthetic", {}).values()) for r in finished
        ]
        entry: dict[str, Any] = {
            "setting": setting,
            "label": setting_label(setting, datasets=shown),
            "seeds": [r.config["seed"] for r in finished],
            "runs": [r.id for r in finished],
            "train_real_images": metrics.summarize([float(c) for c in real_counts]),
            # the fewest and most real images a class had (n_real=all, or classes short of it)
            "train_real_per_class": {
                "min": min(per_class, default=None),
                "max": max(per_class, default=None),
            },
            "train_synthetic_images": metrics.summarize([float(c) for c in synthetic_counts]),
            # children asked for (k per real image) that the synthetic dataset did not have
            "synthetic_missing": _missing(finished),
            "epochs": metrics.summarize([float(r.best_epoch or 0) for r in finished]),
        }
        for name in HEADLINE:
            entry[name] = metrics.summarize([_value(r.metrics or {}, name) for r in finished])
        entry["by_skin_tone"] = _skin_tone(finished)
        entry["skin_tone_gap_top1"] = metrics.summarize(
            [
                (((r.metrics or {}).get("by_skin_tone") or {}).get("gap") or {})
                .get("top1", {})
                .get("value")
                for r in finished
            ]
        )
        settings.append(entry)

    # the paired difference from real-only (same n_real and augmentation), per setting
    by_key = {Setting.from_config(e["setting"]): e for e in settings}
    for key, entry in by_key.items():
        entry["versus_real_only"] = None
        if not key.synthetic_per_real:
            continue
        control = by_key.get(key.real_only())
        if control is None:
            continue
        entry["versus_real_only"] = {
            "control": control["setting"],
            **_paired_differences(groups[key], groups[key.real_only()]),
        }
    comparisons = _adjust_for_multiplicity(settings)
    # every run of an experiment has the same test set and validation source: one says them
    first_split: dict[str, Any] = next(
        (r.split for r in runs if r.status == JobStatus.SUCCEEDED.value and r.split), {}
    )
    return {
        "classes": classes,
        "runs": tally,
        "synthetic_datasets": shown,
        "settings": settings,
        "warnings": _test_warnings(first_split) + _warnings(settings),
        "validation_from": first_split.get("validation_from"),
        "comparisons": comparisons,
    }


def _adjust_for_multiplicity(settings: list[dict[str, Any]]) -> dict[str, int]:
    """Holm-adjusted p-values (`p_holm`) of every difference from real-only, in two families,
    one per table: top-1 overall over the settings, and per Fitzpatrick group with the gaps'
    changes. Many settings and groups give some CIs that exclude 0 by chance alone; an
    adjusted value under 0.05 does not. Returns each family's size (top-3's too)."""
    families: dict[str, list[dict[str, Any]]] = {"top1": [], "top3": [], "by_skin_tone": []}
    for entry in settings:
        versus = entry.get("versus_real_only") or {}
        for name in ("top1", "top3"):
            if versus.get(name):
                families[name].append(versus[name])
        by_tone = skin_tone_versus(entry)
        if by_tone:
            differences = [*by_tone["groups"].values(), by_tone["gap"]]
            families["by_skin_tone"] += [d for d in differences if d]
    for family in families.values():
        for difference, adjusted in zip(
            family, metrics.holm_adjust([d["p_value"] for d in family]), strict=True
        ):
            difference["p_holm"] = adjusted
    return {name: len(family) for name, family in families.items()}


def _paired_differences(treated: list[Run], control: list[Run]) -> dict[str, Any]:
    """Top-1 and top-3 of one setting's runs minus another's, paired on their shared test
    images (None where they did not score the same images), and the top-1 difference per
    Fitzpatrick group with the gap's change (None from runs that stored no groups): does
    synthetic data help every skin tone, and does the gap narrow?"""
    out: dict[str, Any] = {"by_skin_tone": None}
    for name in ("top1", "top3"):
        first = _correctness(treated, f"test_correct_{name}")
        second = _correctness(control, f"test_correct_{name}")
        if first is None or second is None or first[1] != second[1]:
            out[name] = None
            continue
        out[name] = metrics.paired_bootstrap_difference(treated=first[0], control=second[0])
        if name == "top1":
            out[name]["by_seed"] = _by_seed(treated, control)
            if first[2] is not None:
                out["by_skin_tone"] = {
                    "top1": metrics.group_differences(
                        treated=first[0], control=second[0], groups=first[2]
                    )
                }
    return out


def _by_seed(treated: list[Run], control: list[Run]) -> dict[str, float]:
    """Top-1 of each seed's run minus the control's run of the same seed: the spread between
    training seeds, which the bootstrap over test images (seeds pooled) does not hold."""
    theirs = {r.config["seed"]: _value(r.metrics or {}, "top1") for r in control}
    out = {}
    for run in sorted(treated, key=lambda r: r.config["seed"]):
        mine, other = _value(run.metrics or {}, "top1"), theirs.get(run.config["seed"])
        if mine is not None and other is not None:
            out[str(run.config["seed"])] = mine - other
    return out


def _finished_by_setting(runs: Iterable[Run]) -> dict[Setting, list[Run]]:
    """Setting -> its finished runs with metrics."""
    groups: dict[Setting, list[Run]] = defaultdict(list)
    for run in runs:
        if run.status == JobStatus.SUCCEEDED.value and run.metrics:
            groups[Setting.from_config(run.config)].append(run)
    return groups


def compare_settings(
    *,
    runs: list[Run],
    a: str,
    b: str,
    classes: list[str],
    dataset_names: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Any two settings of an experiment by their labels (the report's, e.g. `n=16 k=10
    inpaint` against `n=16 k=10 text-to-image`): top-1 and top-3 of `a` minus `b` with a
    paired bootstrap 95% CI over the shared test images (top-3 None with three classes or
    fewer, where it is always 100%), and the top-1 difference per Fitzpatrick group with the
    change of the gap. Raises InvalidField naming `a` or `b` for a label with no finished
    run."""
    shown = shown_datasets((run.config for run in runs), dataset_names or {})
    groups = _finished_by_setting(runs)
    by_label = {setting_label(key.as_dict(), datasets=shown): key for key in groups}
    chosen = {}
    for field, label in (("a", a), ("b", b)):
        if label not in by_label:
            # datasets that share a name are told apart by the start of their ids: a label
            # without that part names several settings, and none is picked silently
            alike = [name for name in by_label if without_id_suffixes(name) == label]
            if alike:
                listed = "; ".join(f"'{name}'" for name in alike)
                raise InvalidField(
                    f"{field}: {label!r} is ambiguous: synthetic datasets of that name are "
                    f"told apart by their ids; name one of: {listed}",
                    field=field,
                )
            known = "; ".join(f"'{name}'" for name in by_label) or "none yet"
            raise InvalidField(
                f"{field}: no finished setting is labelled {label!r}; settings: {known}",
                field=field,
            )
        chosen[field] = groups[by_label[label]]
    differences = _paired_differences(chosen["a"], chosen["b"])
    if differences["top1"] is None or differences["top3"] is None:
        raise InvalidField(
            "a, b: the two settings' runs did not score the same test images (runs of an "
            "older synthderm store no per-image results)",
            field="b",
        )
    if len(classes) <= 3:
        differences["top3"] = None
    return {
        "a": a,
        "b": b,
        "seeds_a": sorted(r.config["seed"] for r in chosen["a"]),
        "seeds_b": sorted(r.config["seed"] for r in chosen["b"]),
        **differences,
    }


def _missing(finished: list[Run]) -> dict[str, Any]:
    """Per class, the synthetic children a run lacked (parents with fewer than k children),
    as the mean over seeds; and their total."""
    per_run = [(r.split or {}).get("synthetic_missing") or {} for r in finished]
    classes = sorted({c for missing in per_run for c in missing})
    by_class = {c: float(np.mean([m.get(c, 0) for m in per_run])) for c in classes}
    return {"total": sum(by_class.values()), "by_class": {c: n for c, n in by_class.items() if n}}


FEW_TEST_IMAGES = 5  # a class with fewer test images than this is named in the warnings


def _test_warnings(split: dict[str, Any]) -> list[str]:
    """Classes the test set barely covers, from a finished run's split counts (every run of
    an experiment scores the same test set)."""
    few = {c: n for c, n in split.get("test", {}).items() if n < FEW_TEST_IMAGES}
    if not few:
        return []
    listed = ", ".join(f"{c} {n}" for c, n in few.items())
    return [
        f"the test set has fewer than {FEW_TEST_IMAGES} images of some classes ({listed}): "
        "their recall is undefined (0 images) or rests on one or a few images"
    ]


def _warnings(settings: list[dict[str, Any]]) -> list[str]:
    """What a reader of the table would not see: settings that trained on fewer synthetic
    images than k x the real ones."""
    warnings = []
    for entry in settings:
        missing = entry.get("synthetic_missing") or {}
        if not missing.get("total"):
            continue
        had = entry["train_synthetic_images"]["mean"] or 0.0
        classes = ", ".join(f"{c} {n:g}" for c, n in missing["by_class"].items())
        warnings.append(
            f"{entry['label']}: {missing['total']:g} of the {had + missing['total']:g} "
            f"synthetic images asked for were missing per run ({classes}): their parents have "
            "fewer than k children in the synthetic dataset"
        )
    return warnings
