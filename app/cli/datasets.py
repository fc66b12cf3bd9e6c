"""`synthderm datasets ...`: datasets through the REST API (list, show, upload, download,
export).

A REST client only: no database, no torch. An API error reaches `main()`, which prints its
sentence and exits 1.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from app.cli.common import api_client, console, finish, print_listing, wait_with_bar

datasets_cli = typer.Typer(help="Datasets (through the REST API).", no_args_is_help=True)


@datasets_cli.command("list")
def datasets_list(
    kind: Annotated[str | None, typer.Option(help="real or synthetic only.")] = None,
    limit: Annotated[
        int | None, typer.Option(min=1, help="The newest N only (default: all of them).")
    ] = None,
    page_size: Annotated[
        int, typer.Option(min=1, max=1000, help="Datasets per request to the API.")
    ] = 1000,
) -> None:
    """Your datasets with their status and image counts, newest first (every page of the
    listing)."""
    items = api_client().paged("/datasets", page_size=min(limit or page_size, page_size), kind=kind)
    rows = [
        [
            item["id"],
            item["kind"],
            item["name"],
            item.get("status", "ready"),
            str(item["image_count"]),
            item["created_at"][:19],
        ]
        for item in itertools.islice(items, limit)
    ]
    print_listing(["id", "kind", "name", "status", "images", "created"], rows)


@datasets_cli.command("show")
def datasets_show(dataset_id: str) -> None:
    """A dataset's counts by condition x skin tone x strategy."""
    from rich.table import Table

    body = api_client().get(f"/datasets/{dataset_id}")
    table = Table(
        "condition",
        "skin tone",
        "strategy",
        "images",
        title=f"{body['name']} ({body['kind']}, {body.get('status', 'ready')}, "
        f"{body['image_count']} images)",
    )
    for row in body["counts"]:
        table.add_row(
            row["condition"],
            str(row["skin_tone"] or "-"),
            row["strategy"] or "-",
            str(row["count"]),
        )
    Console().print(table)
    splits = sorted({row["split"] or "-" for row in body.get("splits") or []})
    if splits != ["-"] and splits:  # a split column was read: images per class and split
        by_split = Table("condition", *splits, title="by split")
        per_class: dict[str, dict[str, int]] = {}
        for row in body["splits"]:
            per_class.setdefault(row["condition"], {})[row["split"] or "-"] = row["count"]
        for condition, counts in per_class.items():
            by_split.add_row(condition, *(str(counts.get(s, 0)) for s in splits))
        Console().print(by_split)


@datasets_cli.command("upload")
def datasets_upload(
    archive: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="zip / tar(.gz)")],
    csv: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="Metadata CSV.")
    ] = None,
    name: Annotated[str | None, typer.Option()] = None,
    csv_format: Annotated[
        str, typer.Option("--format", help="auto, generic, fitzpatrick17k, ddi")
    ] = "auto",
    file_column: Annotated[str | None, typer.Option()] = None,
    label_column: Annotated[str | None, typer.Option()] = None,
    skin_tone_column: Annotated[
        str | None, typer.Option(help="The Fitzpatrick type's column; none: read none.")
    ] = None,
    split_column: Annotated[
        str | None, typer.Option(help="train / validation / test; none: read none.")
    ] = None,
    on_error: Annotated[
        str, typer.Option(help="fail (keep nothing) or skip (keep good rows)")
    ] = "fail",
    wait: Annotated[bool, typer.Option(help="Follow the ingest job.")] = True,
) -> None:
    """Upload a real labelled dataset: an archive of images and a metadata CSV."""
    from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

    client = api_client()
    form = {
        "name": name,
        "csv_format": csv_format,
        "file_column": file_column,
        "label_column": label_column,
        "skin_tone_column": skin_tone_column,
        "split_column": split_column,
        "on_error": on_error,
    }
    with Progress(
        *Progress.get_default_columns(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=console,
    ) as bar:
        task = bar.add_task(f"uploading {archive.name}", total=archive.stat().st_size)
        job = client.upload_dataset(
            archive, metadata=csv, form=form, on_bytes=lambda n: bar.advance(task, n)
        )
    console.print(f"ingest job {job['id']} -> dataset {job['dataset_id']}")
    if wait:
        job = wait_with_bar(client, job, "checking rows")
    finish(job) if wait else typer.echo(json.dumps(job, indent=2))


@datasets_cli.command("download")
def datasets_download(
    dataset_id: str,
    folder: Annotated[Path, typer.Argument(help="Where to put the images.")],
    workers: Annotated[int, typer.Option(help="Parallel downloads.")] = 8,
    condition: Annotated[str | None, typer.Option()] = None,
    skin_tone: Annotated[int | None, typer.Option()] = None,
    strategy: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Download every image (parallel, resumable), verifying each sha256."""
    from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

    client = api_client()
    filters = {"condition": condition, "skin_tone": skin_tone, "strategy": strategy}
    with Progress(
        *Progress.get_default_columns(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=console,
    ) as bar:
        task = bar.add_task("reading the manifest", total=None)
        totals = {"bytes": 0}

        def on_total(n: int) -> None:
            bar.update(task, description=f"{n} images", total=None)

        def on_file(_outcome: str, size: int) -> None:
            totals["bytes"] += size
            bar.update(task, completed=totals["bytes"])

        report = client.download(
            dataset_id,
            folder,
            workers=workers,
            filters=filters,
            on_file=on_file,
            on_total=on_total,
        )
    typer.echo(
        f"downloaded {report.downloaded}, already there {report.skipped}, "
        f"failed {len(report.failed)}; every file matches its sha256"
    )
    for image_id, reason in report.failed:
        console.print(f"[red]{image_id}: {reason}[/red]")
    if report.failed:
        raise typer.Exit(1)


@datasets_cli.command("export")
def datasets_export(
    dataset_id: str,
    shard_size: Annotated[int, typer.Option(help="Samples per WebDataset shard (<= 5000).")] = 5000,
    shuffle: Annotated[bool, typer.Option()] = False,
    seed: Annotated[int | None, typer.Option()] = None,
    wait: Annotated[bool, typer.Option(help="Follow the export job.")] = True,
) -> None:
    """Export WebDataset shards, a dataset card and Croissant metadata to the store."""
    client = api_client()
    job = client.export(dataset_id, {"shard_size": shard_size, "shuffle": shuffle, "seed": seed})
    if wait:
        job = wait_with_bar(client, job, "exporting")
    finish(job) if wait else typer.echo(json.dumps(job, indent=2))
