"""`synthderm finetunes ...`: fine-tune generators through the REST API (submit, follow with
a live bar of step, loss and time left, show, list, cancel, download the validation images).

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

finetunes_cli = typer.Typer(
    help="Fine-tune generators on a real dataset (through the REST API).", no_args_is_help=True
)


def _parse_setting(text: str, option: str = "--set") -> tuple[str, Any]:
    """'learning_rate=1e-5' -> ('learning_rate', 1e-05): the value as JSON, else a string."""
    name, sep, raw = text.partition("=")
    if not sep or not name:
        raise typer.BadParameter(f"{text!r} is not NAME=VALUE", param_hint=option)
    try:
        return name.strip(), json.loads(raw)
    except json.JSONDecodeError:
        return name.strip(), raw


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _state_line(state: dict[str, Any]) -> str:
    """'running, 2/10 models, loss 0.1234, 0:03:10 left (MODEL)' (a scratch model's stage
    before its loss)."""
    running = [m for m in state["members"] if m["status"] == "running"]
    parts = [state["status"]]
    progress = state["progress"]
    parts.append(f"{progress['models_done']}/{progress['models']} models")
    if running:
        member = running[0]
        if member.get("stage"):
            parts.append(member["stage"])
        if member["loss"] is not None:
            parts.append(f"loss {member['loss']:.4f}")
        parts.append(f"{_duration(member['eta_s'])} left ({member['model_id']})")
    return ", ".join(parts)


def wait_finetune(
    client: Client, finetune: dict[str, Any], *, interval: float = 1.0
) -> dict[str, Any]:
    """Follow a fine-tune with a live bar: steps over every model, the loss and the time left."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("steps, {task.fields[state]}"),
        TimeElapsedColumn(),
    )
    state = finetune
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(
            f"fine-tune {finetune['id'][:8]}", total=None, state=_state_line(finetune)
        )
        while True:
            state = client.get(f"/finetunes/{finetune['id']}")
            progress = state["progress"]
            bar.update(
                task,
                completed=progress["step"],
                total=progress["steps"],
                state=_state_line(state),
            )
            if state["status"] in TERMINAL:
                return state
            time.sleep(interval)


def _finish(state: dict[str, Any]) -> None:
    typer.echo(json.dumps(state, indent=2))
    if state["status"] != "succeeded":
        raise typer.Exit(1)


@finetunes_cli.command("submit")
def finetunes_submit(
    dataset: Annotated[str, typer.Option(help="Your real dataset's id.")],
    base_model: Annotated[
        str | None, typer.Option(help="A model id (GET /models); none with --method scratch.")
    ] = None,
    method: Annotated[
        str,
        typer.Option(help="dreambooth (the paper's), lora, or scratch (a generator of its own)."),
    ] = "dreambooth",
    variant: Annotated[
        str | None, typer.Option(help="text-to-image (the default) or inpaint.")
    ] = None,
    condition: Annotated[
        list[str] | None, typer.Option(help="A condition to train (repeat; default: all).")
    ] = None,
    joint: Annotated[
        bool, typer.Option(help="One model over all the conditions (scratch always is).")
    ] = False,
    name: Annotated[str | None, typer.Option()] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    caption_skin_tone: Annotated[
        bool | None,
        typer.Option(
            help="Append each image's Fitzpatrick type to its caption (default: on for "
            "scratch, off otherwise)."
        ),
    ] = None,
    exclude_dataset: Annotated[
        list[str] | None, typer.Option(help="Images in this dataset never train (repeat).")
    ] = None,
    setting: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="A hyperparameter, NAME=VALUE (repeat), e.g. --set max_train_steps=400 "
            "--set learning_rate=1e-5 (the paper's defaults otherwise).",
        ),
    ] = None,
    scratch_setting: Annotated[
        list[str] | None,
        typer.Option(
            "--scratch-set",
            help="A scratch setting, NAME=VALUE (repeat), e.g. --scratch-set vae_steps=500 "
            "--scratch-set unet_channels=[32,64] (the default model's otherwise).",
        ),
    ] = None,
    webhook: WebhookOption = None,
    webhook_events: WebhookEventsOption = None,
    wait: Annotated[bool, typer.Option(help="Follow it with a live bar.")] = False,
) -> None:
    """Submit a fine-tune: one model per condition (or one joint model), each registered
    under GET /models when it finishes; with --method scratch, a text-to-image and an inpaint
    model trained from the dataset alone."""
    client = api_client()
    body: dict[str, Any] = {
        "dataset": dataset,
        "base_model": base_model,
        "method": method,
        "variant": variant,
        "conditions": condition or None,
        "joint": joint or None,  # left out unless set: scratch refuses joint false
        "name": name,
        "seed": seed,
        "caption_skin_tone": caption_skin_tone,
        "exclude_datasets": exclude_dataset or [],
        **dict(_parse_setting(s) for s in setting or []),
        **webhook_fields(webhook, webhook_events),
    }
    if scratch_setting:
        body["scratch"] = dict(_parse_setting(s, "--scratch-set") for s in scratch_setting)
    finetune = client.post("/finetunes", {k: v for k, v in body.items() if v is not None})
    if not wait:
        typer.echo(json.dumps(finetune, indent=2))
        return
    _finish(wait_finetune(client, finetune))


@finetunes_cli.command("show")
def finetunes_show(finetune_id: str) -> None:
    """A fine-tune's status, per-model progress, loss and time left."""
    typer.echo(json.dumps(api_client().get(f"/finetunes/{finetune_id}"), indent=2))


@finetunes_cli.command("wait")
def finetunes_wait(finetune_id: str) -> None:
    """Follow a fine-tune to its end with a live bar; exit 1 unless it succeeds."""
    client = api_client()
    _finish(wait_finetune(client, client.get(f"/finetunes/{finetune_id}")))


@finetunes_cli.command("list")
def finetunes_list() -> None:
    """Your fine-tunes, newest first."""
    rows = [
        [
            f["id"],
            f["family_id"],
            f["status"],
            f["method"],
            f["variant"],
            f"{f['progress']['models_done']}/{f['progress']['models']}",
            ",".join(f["conditions"]),
        ]
        for f in api_client().paged("/finetunes")
    ]
    print_listing(["id", "family (jobs' model)", "status", "method", "variant", "models",
                   "conditions"], rows)  # fmt: skip


@finetunes_cli.command("cancel")
def finetunes_cancel(finetune_id: str) -> None:
    """Cancel: models not started never start; a training one stops and is not registered."""
    typer.echo(json.dumps(api_client().post(f"/finetunes/{finetune_id}/cancel"), indent=2))


def _download(client: Client, url: str) -> bytes:
    """A file URL's bytes: the API's own (/files, with the key) or a presigned store URL
    (no key: S3 refuses a second authorization)."""
    if url.startswith(client.url + "/") or url.startswith("/"):
        return client.get_bytes(url.removeprefix(client.url))
    import httpx

    response = httpx.get(url, timeout=client.timeout)
    response.raise_for_status()
    return response.content


@finetunes_cli.command("samples")
def finetunes_samples(
    finetune_id: str,
    out: Annotated[Path, typer.Option(help="Folder to write the PNGs to.")] = Path("samples"),
) -> None:
    """Download the validation images: OUT/MODEL/step-NNNNNNNN-PP.png."""
    client = api_client()
    items = client.get(f"/finetunes/{finetune_id}/samples")["items"]
    counters: dict[tuple[str, int], int] = {}
    for item in items:
        number = counters.get((item["model_id"], item["step"]), 0)
        counters[(item["model_id"], item["step"])] = number + 1
        path = out / item["model_id"] / f"step-{item['step']:08d}-{number:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_download(client, item["url"]))
    console.print(f"{len(items)} validation images in {out}")
