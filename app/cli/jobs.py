"""`synthderm jobs ...`: generation jobs through the REST API (submit, show, follow, list,
cancel) and the conditions they may name.

A REST client only: no database, no torch. An API error reaches `main()`, which prints its
sentence and exits 1.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from app.cli.common import (
    WebhookEventsOption,
    WebhookOption,
    api_client,
    finish,
    print_listing,
    wait_with_bar,
    webhook_fields,
)

jobs_cli = typer.Typer(help="Generation jobs (through the REST API).", no_args_is_help=True)


@jobs_cli.command("submit")
def jobs_submit(
    condition: Annotated[str, typer.Option(help="Condition slug, e.g. psoriasis.")],
    count: Annotated[int | None, typer.Option(help="Images to make.")] = None,
    skin_tone: Annotated[int | None, typer.Option(help="Fitzpatrick type 1..6.")] = None,
    strategy: Annotated[str, typer.Option(help="text-to-image, inpaint, ...")] = "text-to-image",
    model: Annotated[str | None, typer.Option(help="Generator id.")] = None,
    source_dataset: Annotated[str | None, typer.Option(help="Real dataset of parents.")] = None,
    synthetic_per_real: Annotated[
        int | None, typer.Option("--k", help="Images per parent.")
    ] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    steps: Annotated[int | None, typer.Option(help="num_inference_steps")] = None,
    guidance: Annotated[float | None, typer.Option(help="guidance_scale")] = None,
    guidance_interval: Annotated[
        str | None,
        typer.Option(help="START,END: guide only this part of the schedule, e.g. 0.4,1."),
    ] = None,
    strength: Annotated[float | None, typer.Option()] = None,
    negative_prompt: Annotated[str | None, typer.Option()] = None,
    dataset_id: Annotated[str | None, typer.Option(help="Append to this dataset.")] = None,
    dataset_name: Annotated[
        str | None, typer.Option(help="Name of the new synthetic dataset.")
    ] = None,
    webhook: WebhookOption = None,
    webhook_events: WebhookEventsOption = None,
    wait: Annotated[bool, typer.Option(help="Follow it with a progress bar.")] = False,
) -> None:
    """Submit a generation job."""
    client = api_client()
    body = {
        "condition": condition,
        "count": count,
        "skin_tone": skin_tone,
        "strategy": strategy,
        "model": model,
        "source_dataset": source_dataset,
        "synthetic_per_real": synthetic_per_real,
        "seed": seed,
        "num_inference_steps": steps,
        "guidance_scale": guidance,
        "guidance_interval": _interval(guidance_interval),
        "strength": strength,
        "negative_prompt": negative_prompt,
        "dataset_id": dataset_id,
        "dataset_name": dataset_name,
        **webhook_fields(webhook, webhook_events),
    }
    job = client.submit_job(body)
    if wait:
        job = wait_with_bar(client, job, f"job {job['id'][:8]}")
    finish(job) if wait else typer.echo(json.dumps(job, indent=2))


def _interval(text: str | None) -> list[float] | None:
    """'0.4,1' -> [0.4, 1.0]; the API checks the values."""
    if text is None:
        return None
    try:
        start, end = (float(part) for part in text.split(","))
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is not START,END (e.g. 0.4,1)", param_hint="--guidance-interval"
        ) from None
    return [start, end]


@jobs_cli.command("show")
def jobs_show(job_id: str) -> None:
    """A job's status, progress and result."""
    typer.echo(json.dumps(api_client().get(f"/jobs/{job_id}"), indent=2))


@jobs_cli.command("wait")
def jobs_wait(job_id: str) -> None:
    """Follow a job to its end with a progress bar; exit 1 unless it succeeds."""
    client = api_client()
    finish(wait_with_bar(client, client.get(f"/jobs/{job_id}"), f"job {job_id[:8]}"))


@jobs_cli.command("list")
def jobs_list(status: Annotated[str | None, typer.Option()] = None) -> None:
    """Your jobs, newest first."""
    rows = [
        [
            job["id"],
            job["kind"],
            job["status"],
            job["condition"] or "",
            str(job["skin_tone"] or ""),
            job["strategy"] or "",
            str(job["progress"]["done"]),
            str(job["progress"]["total"]),
        ]
        for job in api_client().get("/jobs", status=status)["items"]
    ]
    columns = ["id", "kind", "status", "condition", "tone", "strategy", "done", "total"]
    print_listing(columns, rows)


@jobs_cli.command("conditions")
def jobs_conditions() -> None:
    """The conditions your jobs may name: the shared (seeded) ones and the labels you uploaded
    (no other key sees yours)."""
    rows = [
        [c["slug"], c["name"], "shared" if c["shared"] else "yours"]
        for c in api_client().get("/conditions")["items"]
    ]
    print_listing(["condition", "name (in prompts)", "whose"], rows)


@jobs_cli.command("cancel")
def jobs_cancel(job_id: str) -> None:
    """Cancel a queued or running job."""
    typer.echo(json.dumps(api_client().post(f"/jobs/{job_id}/cancel"), indent=2))
