"""An experiment's report as text: the table's rows, the per-skin-tone differences, labels
of settings and the self-contained Markdown report (the CLI's tables, GET /experiments/{id}'s
labels, the figures' legends).

A report here is the dict reports.build_report made (or an API response carried): no ORM, no
database, no torch; the CLI imports this without SQLAlchemy.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from app.experiments import metrics


def shown_datasets(configs: Iterable[dict[str, Any]], names: Mapping[str, str]) -> dict[str, str]:
    """id -> display name of the synthetic datasets, when the configs use more than one (with
    one, the labels leave it out); an unnamed dataset shows the start of its id, and a name
    that several of them share is followed by the start of each one's id, so that no two
    settings share a label (nor a legend entry)."""
    used = sorted({c["synthetic_dataset"] for c in configs if c.get("synthetic_dataset")})
    if len(used) < 2:
        return {}
    shown = {i: names.get(i) or i[:8] for i in used}
    repeated = {name for name in shown.values() if list(shown.values()).count(name) > 1}
    return {i: f"{name} ({i[:8]})" if name in repeated else name for i, name in shown.items()}


_ID_SUFFIX = re.compile(r" \([0-9a-f]{8}\)")


def without_id_suffixes(label: str) -> str:
    """A label as it reads before shown_datasets told apart datasets of one name."""
    return _ID_SUFFIX.sub("", label)


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
        "Δ top-1 vs real-only (pts, 95% CI)", "seeds gaining",
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
                _seeds_gaining(versus),
            ]
        )
    return header, rows


def _seeds_gaining(versus: dict[str, Any] | None) -> str:
    """'2 of 3': the seeds whose real+synthetic run beat its real-only run of the same seed."""
    by_seed = (versus or {}).get("by_seed")
    if not by_seed:
        return "-"
    return f"{sum(d > 0 for d in by_seed.values())} of {len(by_seed)}"


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
        "bootstrap 95% CI over the test images (the seeds' predictions pooled)"
        + _starred(report, "top1")
        + "; *seeds gaining*: the seeds whose real+synthetic run beat the real-only run of "
        "the same seed (the CI does not hold the spread between training seeds).",
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
