"""`synthderm evaluations ...`: the quality and privacy report of a synthetic dataset through
the REST API (submit and follow, show, list, cancel, and `report`: a table on the terminal,
report.md, the audit table and every figure in a folder).

A REST client only: no database, no torch.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from app.cli.client import TERMINAL, Client
from app.cli.common import (
    WebhookEventsOption,
    WebhookOption,
    api_client,
    console,
    print_listing,
    webhook_fields,
)

evaluations_cli = typer.Typer(
    help="Quality and privacy of synthetic data (through the REST API).", no_args_is_help=True
)
GROUPS = ("I-II", "III-IV", "V-VI", "unknown")


def wait_evaluation(
    client: Client, state: dict[str, Any], *, interval: float = 1.0
) -> dict[str, Any]:
    """Follow an evaluation stage by stage."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[stage]}"), TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(f"evaluation {state['id'][:8]}", total=state["progress"]["steps"],
                            stage=state["status"])  # fmt: skip
        while True:
            state = client.get(f"/evaluations/{state['id']}")
            progress = state["progress"]
            bar.update(task, completed=progress["step"],
                       stage=f"{state['status']} {progress['stage'] or ''}".strip())  # fmt: skip
            if state["status"] in TERMINAL:
                return state
            time.sleep(interval)


def _finish(state: dict[str, Any]) -> None:
    typer.echo(json.dumps(state, indent=2))
    if state["status"] != "succeeded":
        raise typer.Exit(1)


@evaluations_cli.command("submit")
def evaluations_submit(
    synthetic_dataset: Annotated[str, typer.Option(help="Your synthetic dataset's id.")],
    real_dataset: Annotated[str, typer.Option(help="The real reference dataset's id.")],
    real_split: Annotated[
        str | None, typer.Option(help="Reference split (default: lineage, else train).")
    ] = None,
    test_split: Annotated[str, typer.Option(help="The utility score's test split.")] = "test",
    condition: Annotated[
        list[str] | None, typer.Option(help="A condition (repeat; default: all shared).")
    ] = None,
    seed: Annotated[int, typer.Option()] = 0,
    backbone: Annotated[str | None, typer.Option(help="The feature space.")] = None,
    webhook: WebhookOption = None,
    webhook_events: WebhookEventsOption = None,
    wait: Annotated[bool, typer.Option(help="Follow it to its end.")] = False,
) -> None:
    """Submit an evaluation of a synthetic dataset against a real one."""
    client = api_client()
    body: dict[str, Any] = {
        "synthetic_dataset": synthetic_dataset, "real_dataset": real_dataset,
        "real_split": real_split, "test_split": test_split, "conditions": condition or None,
        "seed": seed, "backbone": backbone, **webhook_fields(webhook, webhook_events),
    }  # fmt: skip
    state = client.post("/evaluations", {k: v for k, v in body.items() if v is not None})
    if not wait:
        typer.echo(json.dumps(state, indent=2))
        return
    _finish(wait_evaluation(client, state))


@evaluations_cli.command("show")
def evaluations_show(evaluation_id: str) -> None:
    """An evaluation's status and report (JSON)."""
    typer.echo(json.dumps(api_client().get(f"/evaluations/{evaluation_id}"), indent=2))


@evaluations_cli.command("list")
def evaluations_list() -> None:
    """Your evaluations, newest first."""
    rows = [
        [e["id"], e["status"], e["synthetic_dataset"], e["real_dataset"], ",".join(e["conditions"])]
        for e in api_client().paged("/evaluations")
    ]
    print_listing(["id", "status", "synthetic", "real", "conditions"], rows)


@evaluations_cli.command("cancel")
def evaluations_cancel(evaluation_id: str) -> None:
    """Cancel: it stops at its next stage and keeps no result."""
    typer.echo(json.dumps(api_client().post(f"/evaluations/{evaluation_id}/cancel"), indent=2))


def _n(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ci(pair: Any, digits: int = 2) -> str:
    if not pair or pair[0] is None:
        return ""
    return f" [{pair[0]:.{digits}f}, {pair[1]:.{digits}f}]"


def report_lines(state: dict[str, Any]) -> list[str]:
    """report.md: every table of the report, each number named by its feature space."""
    result = state["result"]
    space = result["feature_space"]["name"]
    ref = result["reference"]
    lines = [
        f"# Evaluation {state['id']}",
        "",
        f"Synthetic dataset {state['synthetic_dataset']} ({result['synthetic']['images']} "
        f"images) against real dataset {state['real_dataset']}: reference "
        f"{ref['source']} {ref.get('split') or ''} ({ref['images']} images), test split "
        f"{state['test_split']} ({ref['test_images']} images). Features: "
        f"{result['feature_space']['backbone']} ({space}, {result['feature_space']['dim']} "
        "dimensions). Each distance's floor is the same measure between two halves of the "
        "real reference.",
        "",
        "## Fidelity and diversity",
        "",
    ]
    fidelity = result["fidelity"]
    if fidelity.get("ci_method"):  # results from before the intervals have none
        lines += [f"In brackets, 95% intervals: {fidelity['ci_method']}", ""]
    lines += [
        f"| scope | n syn | n real | FD ({space}) | floor | KID ({space}) | floor | precision "
        "| recall | density | coverage |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    scopes = [("overall", fidelity["overall"])]
    scopes += [(c, v) for c, v in fidelity["by_condition"].items()]
    scopes += [(g, fidelity["by_skin_tone"][g]) for g in GROUPS if g in fidelity["by_skin_tone"]]
    for name, s in scopes:
        lines.append(
            f"| {name} | {s['n_synthetic']} | {s['n_real']} | "
            f"{_n(s[f'fd_{space}'], 1)}{_ci(s.get(f'fd_{space}_ci'), 1)} | "
            f"{_n(s[f'fd_{space}_floor'], 1)}{_ci(s.get(f'fd_{space}_floor_ci'), 1)} | "
            f"{_n(s[f'kid_{space}'], 4)}{_ci(s.get(f'kid_{space}_ci'), 4)} | "
            f"{_n(s[f'kid_{space}_floor'], 4)}{_ci(s.get(f'kid_{space}_floor_ci'), 4)} | "
            f"{_n(s[f'precision_{space}'], 2)} | "
            f"{_n(s[f'recall_{space}'], 2)} | {_n(s[f'density_{space}'], 2)} | "
            f"{_n(s[f'coverage_{space}'], 2)} |"
        )
    utility = result["utility"]
    lines += ["", "## Utility (train on synthetic, test on real)", ""]
    if "synthetic" in utility:
        lines += ["| trained on | top-1 | balanced accuracy | " + " | ".join(GROUPS) + " |",
                  "|---|---|---|" + "---|" * len(GROUPS)]  # fmt: skip
        for part in ("synthetic", "real"):
            u = utility[part]
            groups = " | ".join(_n(u["by_skin_tone"][g]["top1"], 2) for g in GROUPS)
            lines.append(f"| {part} | {_n(u['top1'], 2)}{_ci(u['top1_ci'])} | "
                         f"{_n(u['balanced_accuracy'], 2)}{_ci(u['balanced_accuracy_ci'])} | "
                         f"{groups} |")  # fmt: skip
    else:
        lines.append(utility.get("note", "not measured"))
    tone = result["skin_tone"]
    lines += ["", "## Skin-tone fidelity (ITA, degrees)", "",
              f"Spearman(type, ITA): synthetic {_n(tone['spearman_synthetic'], 2)}, real "
              f"{_n(tone['spearman_real'], 2)}.", "",
              "| type | syn n | syn median [q1, q3] | syn in band | real n | real median | "
              "real in band |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for t, parts in tone["by_type"].items():
        s, r = parts["synthetic"], parts["real"]
        if not s["n"] and not r["n"]:
            continue
        lines.append(
            f"| {t} | {s['n']} | {_n(s.get('median'), 1)} [{_n(s.get('q1'), 1)}, "
            f"{_n(s.get('q3'), 1)}] | {_n(s.get('in_band'), 2)}{_ci(s.get('in_band_ci'))} | "
            f"{r['n']} | {_n(r.get('median'), 1)} | {_n(r.get('in_band'), 2)} |"
        )
    audit = result["memorisation"]
    threshold = audit["threshold"]
    lines += ["", "## Memorisation audit", "",
              f"Copy threshold: {threshold['measure']} >= {_n(threshold['value'], 4)} "
              f"({threshold['rule']}; it flags {_n(threshold['copy_rate'], 2)} of "
              f"{threshold['n_copies']} augmented copies and {_n(threshold['other_rate'], 2)} "
              f"of {threshold['n_others']} other images).", "",
              f"Copy fraction: {_n(audit[f'copy_fraction_{space}'], 3)}"
              f"{_ci(audit[f'copy_fraction_{space}_ci'])} of {audit['audited']} images; "
              f"flagged: {', '.join(audit['flagged']) or 'none'}.", "",
              f"Children against their own parent ({audit['parents']['images']} images): "
              f"{audit['parents']['at_or_above_threshold']} at or above the threshold.", "",
              "## Figures", ""]  # fmt: skip
    lines += [f"![{name}]({name}.png)" for name in state["plots"]]
    return lines


@evaluations_cli.command("report")
def evaluations_report(
    evaluation_id: str,
    out: Annotated[Path, typer.Option(help="Folder for report.md, pairs.csv and figures.")] = Path(
        "evaluation"
    ),
) -> None:
    """The report: a table on the terminal, and OUT/report.md, OUT/pairs.csv and every figure
    (PNG and SVG)."""
    client = api_client()
    state = client.get(f"/evaluations/{evaluation_id}")
    if state["status"] != "succeeded":
        console.print(f"evaluation {evaluation_id} is {state['status']}: no report")
        raise typer.Exit(1)
    out.mkdir(parents=True, exist_ok=True)
    lines = report_lines(state)
    (out / "report.md").write_text("\n".join(lines) + "\n")
    for name in state["plots"]:
        for fmt in ("png", "svg"):
            data = client.get_bytes(f"/evaluations/{evaluation_id}/plots/{name}.{fmt}")
            (out / f"{name}.{fmt}").write_bytes(data)
    with (out / "pairs.csv").open("wb") as handle:
        client.stream_to(f"/evaluations/{evaluation_id}/pairs", handle, format="csv")
    typer.echo("\n".join(line for line in lines if not line.startswith("![")))
    console.print(f"report.md, pairs.csv and {2 * len(state['plots'])} figures in {out}")
