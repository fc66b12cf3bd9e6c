"""What the `synthderm` command's modules share: the checkout's path, the stderr console and
the REST client helpers (a client from the environment, a job followed with a progress bar, a
job's final JSON, a listing table) and `login`, which saves the client's URL and key.

A client side only: no database (no SQLAlchemy import), no torch, no command groups.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from app.cli.client import Client, save_config

ROOT = Path(__file__).resolve().parents[2]  # the checkout: alembic.ini, migrations/
console = Console(stderr=True)


WebhookOption = Annotated[
    str | None,
    typer.Option(help="URL that gets the job's signed events (README: Webhooks)."),
]
WebhookEventsOption = Annotated[
    str | None,
    typer.Option(help="Comma-separated events: started,progress,completed (default: all)."),
]


def webhook_fields(webhook: str | None, events: str | None) -> dict[str, Any]:
    """The request's `webhook` and `webhook_events` from the two options (None: left out)."""
    if events is not None and webhook is None:
        raise typer.BadParameter("needs --webhook", param_hint="--webhook-events")
    wanted = [e.strip() for e in events.split(",") if e.strip()] if events is not None else None
    return {"webhook": webhook, "webhook_events": wanted}


def api_client() -> Client:
    """A REST client on the URL and key from the environment or the saved config."""
    return Client.from_environment()


def wait_with_bar(client: Client, job: dict[str, Any], what: str) -> dict[str, Any]:
    """Follow a job with a live progress bar; returns its final state."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(what, total=job["count"] or None, status=job["status"])

        def update(state: dict[str, Any]) -> None:
            step = ""
            running = state["progress"].get("running") or []
            if running and running[0].get("steps"):
                step = f" step {running[0]['step']}/{running[0]['steps']}"
            bar.update(
                task,
                completed=state["progress"]["done"],
                total=state["progress"]["total"] or None,
                status=state["status"] + step,
            )

        return client.wait_job(job["id"], on_progress=update)


def finish(job: dict[str, Any]) -> None:
    """Print a job's final state as JSON; exit 1 unless it succeeded."""
    typer.echo(json.dumps(job, indent=2))
    if job["status"] != "succeeded":
        raise typer.Exit(1)


def print_listing(columns: list[str], rows: list[list[str]]) -> None:
    """A table of ids and fields, never cut to the terminal's width: an id is what a user
    copies into the next command, so a narrow terminal wraps the lines instead of rich putting
    an ellipsis in the cells."""
    from rich.table import Table

    table = Table(*columns)
    for row in rows:
        table.add_row(*row)
    console = Console()
    natural = console.measure(table, options=console.options.update_width(10_000)).maximum
    Console(width=max(console.width, natural)).print(table)


def login(
    url: Annotated[str, typer.Option(help="The API's base URL.")] = "http://127.0.0.1:8000",
    key: Annotated[str, typer.Option(prompt=True, hide_input=True, help="Your API key.")] = "",
) -> None:
    """Save the API URL and key for the client commands."""
    typer.echo(f"saved to {save_config(url=url, key=key)}")
