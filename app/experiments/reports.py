"""An experiment's report: its runs grouped by setting, mean and sd over seeds, per
Fitzpatrick group, and the paired difference of each real+synthetic setting from the
real-only setting with the same n_real and augmentation. No torch here (the API builds it).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from app.db.tables import Run
from app.errors import InvalidField
from app.experiments import metrics
from app.experiments.runs import SETTING_FIELDS, setting_of
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
    for key in sorted(
        groups, key=lambda k: tuple((v is None, v if v is not None else 0) for v in k)
    ):
        finished = sorted(groups[key], key=lambda r: r.config["seed"])
        setting = dict(zip(SETTING_FIELDS, key, strict=True))
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
    by_key = {tuple(e["setting"][f] for f in SETTING_FIELDS): e for e in settings}
    for entry in settings:
        setting = entry["setting"]
        entry["versus_real_only"] = None
        if not setting["synthetic_per_real"]:
            continue
        control_key = (setting["n_real_per_class"], 0, None, None, setting["augmentation"])
        control = by_key.get(control_key)
        if control is None:
            continue
        entry["versus_real_only"] = {
            "control": control["setting"],
            **_paired_differences(
                groups[tuple(setting[f] for f in SETTING_FIELDS)], groups[control_key]
            ),
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
        if name == "top1" and first[2] is not None:
            out["by_skin_tone"] = {
                "top1": metrics.group_differences(
                    treated=first[0], control=second[0], groups=first[2]
                )
            }
    return out


def _finished_by_setting(runs: Iterable[Run]) -> dict[tuple[Any, ...], list[Run]]:
    """Setting key (SETTING_FIELDS) -> its finished runs with metrics."""
    groups: dict[tuple[Any, ...], list[Run]] = defaultdict(list)
    for run in runs:
        if run.status == JobStatus.SUCCEEDED.value and run.metrics:
            groups[setting_of(run.config)].append(run)
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
    by_label = {
        setting_label(dict(zip(SETTING_FIELDS, key, strict=True)), datasets=shown): key
        for key in groups
    }
    chosen = {}
    for field, label in (("a", a), ("b", b)):
        if label not in by_label:
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


def shown_datasets(configs: Iterable[dict[str, Any]], names: Mapping[str, str]) -> dict[str, str]:
    """id -> display name of the synthetic datasets, when the configs use more than one (with
    one, the labels leave it out); an unnamed dataset shows the start of its id."""
    used = sorted({c["synthetic_dataset"] for c in configs if c.get("synthetic_dataset")})
    if len(used) < 2:
        return {}
    return {i: names.get(i) or i[:8] for i in used}


def setting_label(
    setting: dict[str, Any], *, omit: Iterable[str] = (), datasets: Mapping[str, str] | None = None
) -> str:
    """A short human name of a setting, e.g. `n=16 k=10 inpaint aug`, without the fields in
    `omit` (a plot's axis); the synthetic dataset's name when it is in `datasets`."""
    omitted = set(omit)
    parts = []
    if "n_real_per_class" not in omitted:
        n = setting["n_real_per_class"]
        parts.append(f"n={'all' if n is None else n}")
    if "synthetic_per_real" not in omitted:
        parts.append(f"k={setting['synthetic_per_real']}")
    if setting["synthetic_per_real"] or setting.get("strategy"):
        parts.append(setting.get("strategy") or "any")
    dataset = setting.get("synthetic_dataset")
    if dataset and datasets and dataset in datasets:
        parts.append(datasets[dataset])
    if setting["augmentation"]:
        parts.append("aug")
    return " ".join(parts)


def _mean_sd(summary: dict[str, Any], percent: bool = True) -> str:
    mean, sd = summary.get("mean"), summary.get("sd")
    if mean is None:
        return "-"
    scale = 100 if percent else 1
    text = f"{mean * scale:.1f}" if percent else f"{mean:.3f}"
    if sd is not None:
        text += f" ± {sd * scale:.1f}" if percent else f" ± {sd:.3f}"
    return text


def _range(entry: dict[str, Any]) -> str:
    """' (19-31)' when the classes had different numbers of real training images."""
    span = entry.get("train_real_per_class") or {}
    low, high = span.get("min"), span.get("max")
    return "" if low is None or low == high else f" ({low}-{high})"


def has_skin_tones(report: dict[str, Any]) -> bool:
    """Whether any test image has a known Fitzpatrick group (dermoscopy sets such as ISIC
    have none: every image is `unknown`)."""
    return any(
        entry["by_skin_tone"][group]["pooled"]["n"]
        for entry in report.get("settings") or []
        for group in metrics.FITZPATRICK_GROUPS
        if group != "unknown"
    )


def report_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The report as a table (header, rows): a row per setting, accuracies in percent as
    mean ± sd over seeds, per Fitzpatrick group the mean over seeds, and the paired
    difference in top-1 from real-only with its bootstrap 95% CI. The per-group columns and
    the gap are left out when no test image has a skin tone, and top-3 with three classes or
    fewer (every run's top-3 is then 100%)."""
    groups_shown = metrics.FITZPATRICK_GROUPS if has_skin_tones(report) else ()
    classes = max(len(report.get("classes") or []), 1)
    top3_shown = classes > 3
    header = [
        "setting", "seeds", "real/class", "synthetic", "top-1 %",
        *(["top-3 %"] if top3_shown else []), "balanced %", "AUROC",
        *(f"top-1 {g} %" for g in groups_shown), *(["gap (pts)"] if groups_shown else []),
        "Δ top-1 vs real-only (pts, 95% CI)",
    ]  # fmt: skip
    rows = []
    for entry in report["settings"]:
        groups = []
        for group in groups_shown:
            pooled = entry["by_skin_tone"][group]["pooled"]
            groups.append(
                "-" if pooled["value"] is None else f"{pooled['value'] * 100:.1f} (n={pooled['n']})"
            )
        if groups_shown:
            groups.append(_mean_sd(entry["skin_tone_gap_top1"]))
        versus = (entry.get("versus_real_only") or {}).get("top1")
        difference = _difference(versus)
        real = entry["train_real_images"]["mean"]
        synthetic = entry["train_synthetic_images"]["mean"]
        rows.append(
            [
                entry["label"],
                str(len(entry["seeds"])),
                "-" if real is None else f"{real / classes:.0f}{_range(entry)}",
                "-" if synthetic is None else f"{synthetic:.0f}",
                _mean_sd(entry["top1"]),
                *([_mean_sd(entry["top3"])] if top3_shown else []),
                _mean_sd(entry["balanced_accuracy"]),
                _mean_sd(entry["macro_auroc"], percent=False),
                *groups,
                difference,
            ]
        )
    return header, rows


SIGNIFICANT = 0.05  # Holm-adjusted p-values under this are starred in the tables


def _difference(value: dict[str, Any] | None) -> str:
    """'+2.1 [-1.0, +5.2]': a difference and its CI in points, or '-'; starred when its
    Holm-adjusted p-value is under SIGNIFICANT."""
    if not value:
        return "-"
    lo, hi = value["ci"]
    p_holm = value.get("p_holm")
    star = " *" if p_holm is not None and p_holm < SIGNIFICANT else ""
    interval = f"[{format_points(lo)}, {format_points(hi)}]"
    return f"{format_points(value['difference'])} {interval}{star}"


def format_points(fraction: float) -> str:
    """'+2.1': a difference in points; no '-0.0' from a float a hair under zero."""
    return f"{round(fraction * 100, 1) + 0.0:+.1f}"


def skin_tone_versus(entry: dict[str, Any]) -> dict[str, Any] | None:
    """A setting's top-1 difference from real-only per Fitzpatrick group and of the gap
    (metrics.group_differences), or None (real-only, no control, or runs without groups)."""
    return ((entry.get("versus_real_only") or {}).get("by_skin_tone") or {}).get("top1")


def skin_tone_difference_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Per real+synthetic setting, its top-1 minus real-only's per Fitzpatrick group and the
    change of the gap, each with its bootstrap 95% CI (header, rows); no rows when no test
    image has a skin tone or no setting has a real-only control."""
    header = [
        "setting", *(f"Δ top-1 {g} (pts, 95% CI)" for g in metrics.FITZPATRICK_GROUPS),
        "Δ gap (pts, 95% CI)",
    ]  # fmt: skip
    if not has_skin_tones(report):
        return header, []
    rows = []
    for entry in report["settings"]:
        by_tone = skin_tone_versus(entry)
        if not by_tone:
            continue
        rows.append(
            [
                entry["label"],
                *(_difference(by_tone["groups"][g]) for g in metrics.FITZPATRICK_GROUPS),
                _difference(by_tone["gap"]),
            ]
        )
    return header, rows


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def report_markdown(report: dict[str, Any]) -> str:
    """The report table in Markdown."""
    return _markdown_table(*report_rows(report))


def runs_text(report: dict[str, Any]) -> str:
    """'12 succeeded, 2 failed': the runs of an experiment by state, or 'none'."""
    tally = report.get("runs") or {}
    return ", ".join(f"{n} {state}" for state, n in tally.items() if n) or "none"


def _listed(values: Iterable[Any] | None) -> str:
    return ", ".join("all" if v is None else str(v) for v in values or []) or "-"


def _test_images(report: dict[str, Any]) -> str:
    """', 819 images (by Fitzpatrick group: I-II 423, ...)': the test set of the first setting
    (every setting of an experiment scores the same test images)."""
    if not report.get("settings"):
        return ""  # no finished run: nothing says which images
    groups = report["settings"][0]["by_skin_tone"]
    counts = {g: groups[g]["pooled"]["n"] for g in metrics.FITZPATRICK_GROUPS}
    if not has_skin_tones(report):
        return f", {sum(counts.values())} images, none with a Fitzpatrick type"
    parts = ", ".join(f"{g} {n}" for g, n in counts.items())
    return f", {sum(counts.values())} images (by Fitzpatrick group: {parts})"


def _starred(report: dict[str, Any], family: str) -> str:
    """What a star in a table means, with the size of its family of comparisons."""
    size = (report.get("comparisons") or {}).get(family)
    if not size:
        return ""
    return (
        f"; \\*: p < {SIGNIFICANT} after Holm's correction for the {size} "
        f"comparison{'s' if size > 1 else ''} of the table (with many, some 95% CIs exclude 0 "
        "by chance alone)"
    )


def experiment_markdown(
    experiment: dict[str, Any],
    *,
    figures: Iterable[str] = (),
    dataset_names: Mapping[str, str] | None = None,
) -> str:
    """A self-contained report of an experiment (GET /experiments/{id}), to commit beside
    its figures: what was trained on what, the protocol, the table with what its columns
    mean, and the figures (file names in `figures`, saved next to it). `dataset_names` (id ->
    name) names the datasets beside their ids."""
    params, report = experiment.get("params") or {}, experiment.get("report") or {}
    known = dataset_names or {}

    def dataset(dataset_id: str | None) -> str:
        name = known.get(dataset_id or "")
        return f"`{dataset_id}`" + (f" ({name})" if name else "")

    finished = (experiment.get("timings") or {}).get("finished_at")
    if params.get("test_dataset"):
        test = f"the held-out dataset {dataset(params['test_dataset'])}"
    elif params.get("test_per_class"):
        test = (
            f"{params['test_per_class']} images per class held out of the real dataset (one "
            "fixed draw, the same for every run and seed; its split column is not used)"
        )
    else:
        test = f"the `{params.get('test_split') or 'test'}` split of the real dataset"
    synthetic = params.get("synthetic_datasets") or []
    batch = params.get("batch_size") or "by the paper's rule (training rows / 10)"
    features = (
        "cached (computed once per image and transform)"
        if params.get("cache_features")
        else "computed every epoch (the paper's path)"
    )
    lines = [
        f"# {experiment.get('name') or 'Experiment ' + experiment['id']}",
        "",
        f"Experiment `{experiment['id']}`: {experiment.get('status')}"
        + (f", finished {finished}" if finished else "")
        + f"; runs: {runs_text(report)}.",
        "",
        f"**Data.** Real dataset {dataset(params.get('dataset'))}. Test set: {test}"
        f"{_test_images(report)}. Classes "
        f"({len(report.get('classes') or [])}): {', '.join(report.get('classes') or [])}. "
        + (
            f"Validation: up to {params.get('validation_per_class')} real images per class "
            "from the dataset's validation split, drawn with each run's seed (none of that "
            "split trains); training: n_real per class from the other real images"
            if report.get("validation_from") == "validation split"
            else f"Validation: {params.get('validation_per_class')} real images per class, "
            "drawn with each run's seed; training: n_real per class from the rest"
        )
        + ", plus k synthetic children of each (children of validation and test images are "
        "never used)."
        + (
            " Synthetic: "
            + ", ".join(dataset(i) for i in synthetic)
            + f"; strategies {_listed(params.get('strategies'))}."
            if synthetic
            else ""
        ),
        "",
        f"**Grid.** n_real {_listed(params.get('n_real_per_class'))}; k "
        f"{_listed(params.get('synthetic_per_real'))}; augmentation "
        f"{_listed('on' if a else 'off' for a in params.get('augmentation') or [])}; seeds "
        f"{_listed(params.get('seeds'))}.",
        "",
        f"**Model.** {params.get('backbone')} (ImageNet weights, frozen) with fastai's head; "
        f"Adam, learning rate {params.get('learning_rate')}, weight decay "
        f"{params.get('weight_decay')}; early stopping on validation loss, patience "
        f"{params.get('patience')}, at most {params.get('max_epochs')} epochs, best epoch "
        f"restored; {params.get('image_size')} px; batch size {batch}; backbone features "
        f"{features}.",
        "",
        "## Results",
        "",
        "On the test set. Accuracies in percent, mean ± sd over seeds; *real/class*: real "
        "training images per class (the mean; in brackets the fewest and most a class had, "
        "when they differ), *synthetic*: synthetic training images (the mean over seeds); "
        + (
            "per Fitzpatrick group: top-1 averaged over seeds, n = the group's test images; "
            "*gap*: best minus worst group's top-1, mean ± sd over seeds; "
            if has_skin_tones(report)
            else "no per-group columns: no test image has a Fitzpatrick type; "
        )
        + "*Δ*: top-1 of "
        "real+synthetic minus real-only at the same n_real and augmentation, with a paired "
        "bootstrap 95% CI over the test images" + _starred(report, "top1") + ".",
        "",
    ]
    body = report_markdown(report) if report.get("settings") else "No finished runs.\n"
    tone_header, tone_rows = skin_tone_difference_rows(report)
    if tone_rows:
        body += (
            "\n### Per Fitzpatrick group: real+synthetic minus real-only\n\n"
            "Does the synthetic data help every skin tone? Top-1 of each real+synthetic "
            "setting minus the real-only setting at the same n_real and augmentation, per "
            "group, in points, with a paired bootstrap 95% CI over the group's test images. "
            "*Δ gap*: the change of the gap (best minus worst of I-II, III-IV and V-VI, per "
            "run, mean over seeds), with a bootstrap that resamples each group's images apart; "
            "negative: the gap narrowed, which is a gain only when no group lost accuracy "
            "(a gap also narrows when the best group gets worse)"
            + _starred(report, "by_skin_tone")
            + ".\n\n"
            + _markdown_table(tone_header, tone_rows)
        )
    warnings = report.get("warnings") or []
    if warnings:
        body += "\n" + "".join(f"**Warning.** {w}.\n\n" for w in warnings)
    shown = [f"![{name.rsplit('.', 1)[0]}]({name})" for name in figures]
    tail = ["", "## Figures", "", *(f"{line}\n" for line in shown)] if shown else []
    return "\n".join(lines) + "\n" + body + "\n".join(tail)
