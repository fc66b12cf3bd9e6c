"""`synthderm experiments ...`: classifier experiments through the REST API (submit, follow,
report with its plots). A client only: no database, no torch."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from app.cli.client import ApiError, Client
from app.cli.common import (
    WebhookEventsOption,
    WebhookOption,
    api_client,
    finish,
    wait_with_bar,
    webhook_fields,
)

console = Console()
experiments_cli = typer.Typer(
    help="Classifier experiments (through the REST API).", no_args_is_help=True
)
PLOT_FORMATS = ("png", "svg")


def _ints(text: str | None) -> list[int | None] | None:
    """ "1,8,all" -> [1, 8, None]."""
    if text is None:
        return None
    return [
        None if part.strip() == "all" else int(part) for part in text.split(",") if part.strip()
    ]


def _flags(text: str | None) -> list[bool] | None:
    """ "off,on" -> [False, True]."""
    if text is None:
        return None
    values = {"off": False, "false": False, "no": False, "on": True, "true": True, "yes": True}
    try:
        return [values[part.strip().lower()] for part in text.split(",") if part.strip()]
    except KeyError as exc:
        raise typer.BadParameter(f"--augmentation: {exc.args[0]!r} is not on or off") from None


def _strings(text: str | None) -> list[str] | None:
    return None if text is None else [p.strip() for p in text.split(",") if p.strip()]


# The paper's two classifier grids (PAPER.md section 4), for `submit --preset`; options given
# on the command line override a preset's fields. 228 is the paper's largest n_real (its
# largest class less 40 for validation); classes with fewer train on all they have.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "n_real_per_class": [1, 8, 16, 32, 64, 128, 228],
        "synthetic_per_real": [0, 10],
        "strategies": ["inpaint", "inpaint-outpaint"],
        "augmentation": [False, True],
        "top_n_classes": 9,
    },
    "paper-dose-response": {
        "n_real_per_class": [128, 228],
        "synthetic_per_real": [0, 10, 25, 50, 75],
        "strategies": ["text-to-image"],
        "augmentation": [False, True],
        "top_n_classes": 9,
    },
}


@experiments_cli.command("submit")
def submit(
    dataset: Annotated[str, typer.Option(help="Real dataset id (training pool and test).")],
    preset: Annotated[
        str | None,
        typer.Option(
            help="The paper's grid: 'paper' (n_real 1..228 x k 0,10 x inpaint, "
            "inpaint-outpaint x augmentation off,on; 9 classes) or 'paper-dose-response' "
            "(n_real 128,228 x k 0,10,25,50,75 x text-to-image). Other options override it."
        ),
    ] = None,
    n_real: Annotated[
        str | None, typer.Option(help="Real images per class, e.g. 1,8,16,all.")
    ] = None,
    k: Annotated[str | None, typer.Option(help="Synthetic per real image, e.g. 0,10.")] = None,
    synthetic: Annotated[
        str | None, typer.Option(help="Synthetic dataset ids, comma list.")
    ] = None,
    strategies: Annotated[
        str | None, typer.Option(help="inpaint, inpaint-outpaint, text-to-image, ...")
    ] = None,
    augmentation: Annotated[str | None, typer.Option(help="off, on or off,on.")] = None,
    seeds: Annotated[str | None, typer.Option(help="Seeds, e.g. 1,2,3.")] = None,
    test_split: Annotated[str | None, typer.Option(help="Split that is the test set.")] = None,
    test_dataset: Annotated[str | None, typer.Option(help="A held-out real dataset.")] = None,
    test_per_class: Annotated[
        int | None,
        typer.Option(help="Hold out N images per class as the test set (one fixed draw)."),
    ] = None,
    top_n: Annotated[int | None, typer.Option(help="Keep the N commonest classes.")] = None,
    conditions: Annotated[str | None, typer.Option(help="The classes, comma list.")] = None,
    validation_per_class: Annotated[int | None, typer.Option()] = None,
    max_epochs: Annotated[int | None, typer.Option()] = None,
    patience: Annotated[int | None, typer.Option(help="Epochs without a lower val loss.")] = None,
    learning_rate: Annotated[float | None, typer.Option()] = None,
    weight_decay: Annotated[float | None, typer.Option()] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Default: the paper's rule (training rows / 10).")
    ] = None,
    image_size: Annotated[int | None, typer.Option()] = None,
    cache_features: Annotated[
        bool | None,
        typer.Option(
            "--cache-features/--no-cache-features",
            help="--no-cache-features: the paper's path, every epoch through the backbone.",
        ),
    ] = None,
    backbone: Annotated[
        str | None,
        typer.Option(help="efficientnet-lite0, efficientnet-v2-m or timm:<model name>."),
    ] = None,
    name: Annotated[str | None, typer.Option()] = None,
    webhook: WebhookOption = None,
    webhook_events: WebhookEventsOption = None,
    wait: Annotated[bool, typer.Option(help="Follow it with a progress bar.")] = False,
) -> None:
    """Submit a grid of classifier runs."""
    body: dict[str, Any] = {
        "dataset": dataset,
        "n_real_per_class": _ints(n_real),
        "synthetic_per_real": _ints(k),
        "synthetic_datasets": _strings(synthetic),
        "strategies": _strings(strategies),
        "augmentation": _flags(augmentation),
        "seeds": _ints(seeds),
        "test_split": test_split,
        "test_dataset": test_dataset,
        "test_per_class": test_per_class,
        "top_n_classes": top_n,
        "conditions": _strings(conditions),
        "validation_per_class": validation_per_class,
        "max_epochs": max_epochs,
        "patience": patience,
        "learning_rate": learning_rate,
        "weight_decay": weight_decay,
        "batch_size": batch_size,
        "image_size": image_size,
        "cache_features": cache_features,
        "backbone": backbone,
        "name": name,
        **webhook_fields(webhook, webhook_events),
    }
    if preset is not None:
        if preset not in PRESETS:
            raise typer.BadParameter(
                f"{preset!r} is not one of {', '.join(PRESETS)}", param_hint="--preset"
            )
        body = {**PRESETS[preset], **{k: v for k, v in body.items() if v is not None}}
    client = api_client()
    experiment = client.post("/experiments", {k: v for k, v in body.items() if v is not None})
    if not wait:
        typer.echo(json.dumps(_summary(experiment), indent=2))
        return
    state = {"id": experiment["id"], "count": experiment["progress"]["total"],
             "status": experiment["status"]}  # fmt: skip
    final = wait_with_bar(client, state, f"experiment {experiment['id'][:8]}")
    experiment = client.get(f"/experiments/{experiment['id']}", runs="false")
    print_report(experiment)
    finish({**_summary(experiment), "status": final["status"]})


def _summary(experiment: dict[str, Any]) -> dict[str, Any]:
    return {k: experiment[k] for k in ("id", "name", "status", "progress", "error", "plots")}


def _cells_width(cells: list[str]) -> int:
    return max((len(cell) for cell in cells), default=1)


def table_panels(header: list[str], rows: list[list[str]], *, width: int) -> list[list[int]]:
    """The report's columns in panels that fit `width`, in order, each led by the setting
    column: a narrow terminal gets several readable tables rather than one whose cells are
    folded three characters wide."""

    def need(i: int) -> int:  # the column unbroken, with its border and padding
        return max(_cells_width([row[i] for row in rows]), len(header[i])) + 3

    budget = width - 1 - need(0)
    panels: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i in range(1, len(header)):
        if current and used + need(i) > budget:
            panels.append([0, *current])
            current, used = [], 0
        current.append(i)
        used += need(i)
    return [*panels, [0, *current]] if current else panels


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    for panel in table_panels(header, rows, width=console.width):
        table = Table(show_lines=False)
        for i in panel:
            table.add_column(header[i], no_wrap=True)
        for row in rows:
            table.add_row(*(row[i] for i in panel))
        console.print(table)


def print_report(experiment: dict[str, Any]) -> None:
    from app.experiments.report_text import report_rows, runs_text, skin_tone_difference_rows

    report = experiment.get("report")
    if not report or not report["settings"]:
        console.print(
            f"experiment {experiment['id']}: no finished runs yet ({experiment['status']})"
        )
        return
    console.print(f"{experiment['name']} ({experiment['id']})", style="bold")
    _print_table(*report_rows(report))
    header, rows = skin_tone_difference_rows(report)
    if rows:
        console.print("real+synthetic minus real-only, per Fitzpatrick group", style="bold")
        _print_table(header, rows)
    if (report.get("comparisons") or {}).get("top1"):
        console.print(
            "Δ: real+synthetic minus real-only, paired bootstrap 95% CI; *: p < 0.05 after "
            "Holm's correction over the table's comparisons",
            markup=False,
        )
    console.print(f"classes: {', '.join(report['classes'])}")
    console.print(f"runs: {runs_text(report)}")
    for warning in report.get("warnings") or []:
        console.print(f"warning: {warning}", style="yellow")


def _dataset_names(client: Client, params: dict[str, Any]) -> dict[str, str]:
    """id -> name of the datasets an experiment used, for its report (unnamed ones and ones
    this key cannot see are left out)."""
    ids = [params.get("dataset"), params.get("test_dataset")]
    ids += params.get("synthetic_datasets") or []
    names = {}
    for dataset_id in dict.fromkeys(i for i in ids if i):
        try:
            name = client.get(f"/datasets/{dataset_id}").get("name")
        except ApiError:  # deleted since, or not this key's: the report keeps the id alone
            continue
        if name:
            names[dataset_id] = name
    return names


@experiments_cli.command("report")
def report(
    experiment_id: str,
    out: Annotated[
        Path | None, typer.Option(help="Folder for report.md, report.json and the plots.")
    ] = None,
) -> None:
    """Print an experiment's table and save its report and plots (PNG and SVG)."""
    from app.experiments.report_text import experiment_markdown

    client = api_client()
    experiment = client.get(f"/experiments/{experiment_id}", runs="false")
    print_report(experiment)
    folder = out or Path(f"experiment-{experiment_id[:8]}")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(experiment, indent=2) + "\n")
    stems = [path.rsplit("/", 1)[1].rsplit(".", 1)[0] for path in experiment["plots"]]
    for stem in stems:
        for fmt in PLOT_FORMATS:
            data = client.get_bytes(f"/experiments/{experiment_id}/plots/{stem}.{fmt}")
            (folder / f"{stem}.{fmt}").write_bytes(data)
    figures = [f"{stem}.png" for stem in stems]
    markdown = experiment_markdown(
        experiment, figures=figures, dataset_names=_dataset_names(client, experiment["params"])
    )
    (folder / "report.md").write_text(markdown)
    console.print(f"saved to {folder}/")


@experiments_cli.command("predictions")
def predictions(
    experiment_id: str,
    out: Annotated[Path | None, typer.Option(help="File to write (default: stdout).")] = None,
    format: Annotated[str, typer.Option(help="csv or jsonl")] = "csv",
) -> None:
    """Every finished run's per-image predictions in one table, with each row's run, setting
    and seed."""
    path = f"/experiments/{experiment_id}/predictions"
    if out is None:
        api_client().stream_to(path, sys.stdout.buffer, format=format)
        return
    with out.open("wb") as handle:
        written = api_client().stream_to(path, handle, format=format)
    typer.echo(f"saved {written:,} bytes to {out}", err=True)


def comparison_rows(result: dict[str, Any]) -> list[list[str]]:
    """GET /experiments/{id}/compare as table rows: metric, difference, CI, p-value."""
    from app.experiments.report_text import format_points
    from app.fitzpatrick import FITZPATRICK_GROUPS

    def row(name: str, value: dict[str, Any] | None) -> list[str]:
        if not value:
            return [name, "-", "-", "-"]
        lo, hi = value["ci"]
        interval = f"[{format_points(lo)}, {format_points(hi)}]"
        return [name, format_points(value["difference"]), interval, f"{value['p_value']:.3f}"]

    rows = [row("top-1", result["top1"]), row("top-3", result["top3"])]
    by_tone = (result.get("by_skin_tone") or {}).get("top1")
    if by_tone:
        rows += [row(f"top-1 {g}", by_tone["groups"][g]) for g in FITZPATRICK_GROUPS]
        rows.append(row("gap change", by_tone["gap"]))
    return rows


@experiments_cli.command("compare")
def compare(
    experiment_id: str,
    a: Annotated[str, typer.Argument(help="A setting's label, e.g. 'n=16 k=10 inpaint'.")],
    b: Annotated[str, typer.Argument(help="The setting to compare it with, e.g. 'n=16 k=0'.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON.")] = False,
) -> None:
    """Setting A minus setting B on the same test images: top-1, top-3 and top-1 per
    Fitzpatrick group, with paired bootstrap 95% CIs (labels as the report prints them)."""
    result = api_client().get(f"/experiments/{experiment_id}/compare", a=a, b=b)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    console.print(
        f"{result['a']} (seeds {_seeds(result['seeds_a'])}) minus {result['b']} (seeds "
        f"{_seeds(result['seeds_b'])})",
        style="bold",
        markup=False,
    )
    _print_table(["metric", "Δ (pts)", "95% CI", "p"], comparison_rows(result))


def _seeds(seeds: list[int]) -> str:
    return ", ".join(str(s) for s in seeds)


@experiments_cli.command("list")
def list_experiments() -> None:
    """Your experiments, newest first."""
    for item in api_client().get("/experiments")["items"]:
        done, total = item["progress"]["done"], item["progress"]["total"]
        typer.echo(f"{item['id']}  {item['status']:<9}  {done}/{total}  {item['name']}")


@experiments_cli.command("cancel")
def cancel(experiment_id: str) -> None:
    """Cancel an experiment (finished runs keep their results)."""
    typer.echo(
        json.dumps(_summary(api_client().post(f"/experiments/{experiment_id}/cancel")), indent=2)
    )


@experiments_cli.command("resume")
def resume(experiment_id: str) -> None:
    """Queue again what a canceled or failed experiment did not finish."""
    typer.echo(
        json.dumps(_summary(api_client().post(f"/experiments/{experiment_id}/resume")), indent=2)
    )
