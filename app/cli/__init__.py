"""The `synthderm` command: administration (keys, database, models) and the embedded runner.

`synthderm run` is what `make run` starts: it migrates, then runs the API and a Celery worker
as child processes and stops both cleanly on Ctrl-C (SIGTERM, a grace period, then SIGKILL).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from sqlalchemy.orm import Session

from app.cli.experiments import experiments_cli
from app.config import Settings, get_settings

if TYPE_CHECKING:
    from app.cli.client import Client

ROOT = Path(__file__).resolve().parents[2]  # the checkout: alembic.ini, migrations/
console = Console(stderr=True)


cli = typer.Typer(help="synthderm: synthetic dermatology data service.", no_args_is_help=True)
keys_cli = typer.Typer(help="API keys.", no_args_is_help=True)
db_cli = typer.Typer(help="Database schema.", no_args_is_help=True)
models_cli = typer.Typer(help="Generator models.", no_args_is_help=True)
cli.add_typer(keys_cli, name="keys")
cli.add_typer(db_cli, name="db")
images_cli = typer.Typer(help="Generated images.", no_args_is_help=True)
jobs_cli = typer.Typer(help="Generation jobs (through the REST API).", no_args_is_help=True)
datasets_cli = typer.Typer(help="Datasets (through the REST API).", no_args_is_help=True)
cli.add_typer(jobs_cli, name="jobs")
cli.add_typer(datasets_cli, name="datasets")
cli.add_typer(models_cli, name="models")
cli.add_typer(images_cli, name="images")
cli.add_typer(experiments_cli, name="experiments")


def _session_scope(settings: Settings) -> AbstractContextManager[Session]:
    """A session on the service's database; exit 2 with what to do when it has no schema yet
    (e.g. `keys create` on a fresh machine before anything migrated it)."""
    from sqlalchemy import inspect
    from sqlalchemy.engine import make_url

    from app.db.session import engine_for, session_scope

    if not inspect(engine_for(settings.database_url)).has_table("alembic_version"):
        shown = make_url(settings.database_url).render_as_string(hide_password=True)
        typer.echo(
            f"error: the database {shown} has no synthderm tables yet: run `synthderm db "
            "upgrade` first (`make run` and `synthderm run` do it when they start)",
            err=True,
        )
        raise typer.Exit(2)
    return session_scope(settings.database_url)


# --- keys ---------------------------------------------------------------------------------


@keys_cli.command("create")
def keys_create(name: Annotated[str, typer.Option(help="Who the key is for.")]) -> None:
    """Create an API key and print it once (only its hash is stored)."""
    from app.keys import create_key

    with _session_scope(get_settings()) as session:
        row, raw = create_key(session=session, name=name)
        key_id = row.id
    console.print(f"created key {key_id} for {name!r}; it is shown only now:")
    typer.echo(raw)


@keys_cli.command("list")
def keys_list() -> None:
    """List keys (never the keys themselves)."""
    from app.keys import list_keys

    with _session_scope(get_settings()) as session:
        for row in list_keys(session=session):
            state = "revoked" if row.revoked_at else "active"
            typer.echo(f"{row.id}\t{row.prefix}…\t{row.name}\t{state}\t{row.created_at:%Y-%m-%d}")


@keys_cli.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="Key id or prefix.")]) -> None:
    """Revoke a key: it stops working at once."""
    from app.keys import revoke_key

    with _session_scope(get_settings()) as session:
        if not revoke_key(session=session, key_id=key_id):
            console.print(f"[red]no key {key_id!r}[/red]")
            raise typer.Exit(1)
    typer.echo(f"revoked {key_id}")


# --- database and models ------------------------------------------------------------------


def upgrade_database(settings: Settings) -> None:
    """Migrate to head, make the store ready and register the models in models_dir."""
    # importing alembic.command logs each autogenerate plugin it sets up (7 lines of INFO)
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    from alembic import command
    from alembic.config import Config

    from app.storage import make_store
    from app.vocabulary import register_models_in

    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.attributes["database_url"] = settings.database_url
    config.attributes["configure_logger"] = False
    command.upgrade(config, "head")
    make_store(settings).ensure_ready()
    with _session_scope(settings) as session:
        found = register_models_in(session=session, models_dir=settings.resolved_models_dir)
    console.print(f"database at head; models: {', '.join(found) or 'none'}")


@db_cli.command("upgrade")
def db_upgrade() -> None:
    """Apply every migration (PostgreSQL or SQLite), create the bucket, register models."""
    upgrade_database(get_settings())


@models_cli.command("register")
def models_register(
    model_id: Annotated[str, typer.Argument(help="Id jobs will name, e.g. sd21-base.")],
    path: Annotated[Path, typer.Argument(help="Local diffusers pipeline directory.")],
    description: Annotated[str, typer.Option(help="Free text.")] = "",
) -> None:
    """Register a local pipeline directory as a generator."""
    from app.vocabulary import register_model

    try:
        with _session_scope(get_settings()) as session:
            register_model(
                session=session, model_id=model_id, path=path.resolve(), description=description
            )
    except ValueError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    typer.echo(f"registered {model_id} -> {path.resolve()}")


@models_cli.command("list")
def models_list() -> None:
    """List registered generators."""
    from app.vocabulary import list_models

    with _session_scope(get_settings()) as session:
        for row in list_models(session=session):
            typer.echo(f"{row.id}\t{row.pipeline_class}\t{row.path}")


@models_cli.command("build-tiny")
def models_build_tiny(
    models_dir: Annotated[
        Path | None, typer.Argument(help="Default: the models_dir setting.")
    ] = None,
) -> None:
    """Build the random-weight `tiny-random` and `tiny-random-inpaint` pipelines there (needs
    the worker extras)."""
    target = models_dir or get_settings().resolved_models_dir
    for name in build_tiny_models(target):
        typer.echo(str(target / name))


TINY_MODELS = {"tiny-random": [], "tiny-random-inpaint": ["--inpaint"]}


def build_tiny_models(models_dir: Path) -> list[str]:
    """Build the tiny generators missing from `models_dir`; returns their names."""
    built = []
    for name, flags in TINY_MODELS.items():
        if not (models_dir / name / "model_index.json").is_file():
            # A child process: the torch import stays out of this one.
            subprocess.run(
                [sys.executable, "-m", "models.tiny_random", str(models_dir / name), *flags],
                check=True,
                cwd=ROOT,
            )
            built.append(name)
    return built


@images_cli.command("regenerate")
def images_regenerate(
    image_id: Annotated[str, typer.Argument(help="The image to sample again.")],
    out: Annotated[Path | None, typer.Option(help="Write the regenerated PNG here.")] = None,
) -> None:
    """Regenerate an image from its provenance; exit 0 when the bytes are identical."""
    argv = [sys.executable, "-m", "workers.regenerate", image_id]
    if out is not None:
        argv += ["--out", str(out)]
    raise typer.Exit(subprocess.run(argv, cwd=ROOT).returncode)


# --- the REST client ----------------------------------------------------------------------


def _client() -> Client:
    from app.cli.client import Client

    return Client.from_environment()


def _fail(exc: Exception) -> typer.Exit:
    console.print(f"[red]error: {exc}[/red]")
    return typer.Exit(1)


def _wait_with_bar(client: Client, job: dict[str, Any], what: str) -> dict[str, Any]:
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


def _finish(job: dict[str, Any]) -> None:
    typer.echo(json.dumps(job, indent=2))
    if job["status"] != "succeeded":
        raise typer.Exit(1)


@cli.command("login")
def login(
    url: Annotated[str, typer.Option(help="The API's base URL.")] = "http://127.0.0.1:8000",
    key: Annotated[str, typer.Option(prompt=True, hide_input=True, help="Your API key.")] = "",
) -> None:
    """Save the API URL and key for the client commands."""
    from app.cli.client import save_config

    typer.echo(f"saved to {save_config(url=url, key=key)}")


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
    strength: Annotated[float | None, typer.Option()] = None,
    negative_prompt: Annotated[str | None, typer.Option()] = None,
    dataset_id: Annotated[str | None, typer.Option(help="Append to this dataset.")] = None,
    dataset_name: Annotated[
        str | None, typer.Option(help="Name of the new synthetic dataset.")
    ] = None,
    wait: Annotated[bool, typer.Option(help="Follow it with a progress bar.")] = False,
) -> None:
    """Submit a generation job."""
    from app.cli.client import ApiError

    client = _client()
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
        "strength": strength,
        "negative_prompt": negative_prompt,
        "dataset_id": dataset_id,
        "dataset_name": dataset_name,
    }
    try:
        job = client.submit_job(body)
        if wait:
            job = _wait_with_bar(client, job, f"job {job['id'][:8]}")
    except ApiError as exc:
        raise _fail(exc) from exc
    _finish(job) if wait else typer.echo(json.dumps(job, indent=2))


@jobs_cli.command("show")
def jobs_show(job_id: str) -> None:
    """A job's status, progress and result."""
    from app.cli.client import ApiError

    try:
        typer.echo(json.dumps(_client().get(f"/jobs/{job_id}"), indent=2))
    except ApiError as exc:
        raise _fail(exc) from exc


@jobs_cli.command("wait")
def jobs_wait(job_id: str) -> None:
    """Follow a job to its end with a progress bar; exit 1 unless it succeeds."""
    from app.cli.client import ApiError

    client = _client()
    try:
        _finish(_wait_with_bar(client, client.get(f"/jobs/{job_id}"), f"job {job_id[:8]}"))
    except ApiError as exc:
        raise _fail(exc) from exc


def _print_listing(columns: list[str], rows: list[list[str]]) -> None:
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
        for job in _client().get("/jobs", status=status)["items"]
    ]
    columns = ["id", "kind", "status", "condition", "tone", "strategy", "done", "total"]
    _print_listing(columns, rows)


@jobs_cli.command("cancel")
def jobs_cancel(job_id: str) -> None:
    """Cancel a queued or running job."""
    from app.cli.client import ApiError

    try:
        typer.echo(json.dumps(_client().post(f"/jobs/{job_id}/cancel"), indent=2))
    except ApiError as exc:
        raise _fail(exc) from exc


@datasets_cli.command("list")
def datasets_list() -> None:
    """Your datasets with their image counts."""
    rows = [
        [
            item["id"],
            item["kind"],
            item["name"],
            str(item["image_count"]),
            item["created_at"][:19],
        ]
        for item in _client().get("/datasets")["items"]
    ]
    _print_listing(["id", "kind", "name", "images", "created"], rows)


@datasets_cli.command("show")
def datasets_show(dataset_id: str) -> None:
    """A dataset's counts by condition x skin tone x strategy."""
    from rich.table import Table

    from app.cli.client import ApiError

    try:
        body = _client().get(f"/datasets/{dataset_id}")
    except ApiError as exc:
        raise _fail(exc) from exc
    table = Table(
        "condition",
        "skin tone",
        "strategy",
        "images",
        title=f"{body['name']} ({body['kind']}, {body['image_count']} images)",
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

    from app.cli.client import ApiError

    client = _client()
    form = {
        "name": name,
        "csv_format": csv_format,
        "file_column": file_column,
        "label_column": label_column,
        "skin_tone_column": skin_tone_column,
        "split_column": split_column,
        "on_error": on_error,
    }
    try:
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
            job = _wait_with_bar(client, job, "checking rows")
    except ApiError as exc:
        raise _fail(exc) from exc
    _finish(job) if wait else typer.echo(json.dumps(job, indent=2))


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

    from app.cli.client import ApiError

    client = _client()
    filters = {"condition": condition, "skin_tone": skin_tone, "strategy": strategy}
    try:
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
    except ApiError as exc:
        raise _fail(exc) from exc
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
    from app.cli.client import ApiError

    client = _client()
    try:
        job = client.export(
            dataset_id, {"shard_size": shard_size, "shuffle": shuffle, "seed": seed}
        )
        if wait:
            job = _wait_with_bar(client, job, "exporting")
    except ApiError as exc:
        raise _fail(exc) from exc
    _finish(job) if wait else typer.echo(json.dumps(job, indent=2))


# --- serving ------------------------------------------------------------------------------


@cli.command("serve")
def serve() -> None:
    """Serve the API only (uvicorn), on api_host:api_port."""
    import uvicorn

    settings = get_settings()
    uvicorn.run("app.main:app", host=settings.api_host, port=settings.api_port)


def _child_setup() -> None:
    """In the child, before exec: its own process group (so a terminal's Ctrl-C reaches only
    the supervisor, which stops the children in order), and on Linux a SIGTERM when the
    supervisor dies, even by SIGKILL, so no child outlives it."""
    os.setsid()
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class Supervisor:
    """Child processes in their own process groups; stopped together, none left behind."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.stopping = False

    def start(self, name: str, argv: list[str]) -> None:
        console.print(f"starting {name}: {' '.join(argv)}")
        self.children[name] = subprocess.Popen(argv, cwd=ROOT, preexec_fn=_child_setup)

    def _signal_all(self, sig: int) -> None:
        for child in self.children.values():
            if child.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, sig)

    def stop(self) -> None:
        """SIGTERM every group, wait the grace period, SIGKILL what remains."""
        if self.stopping:
            return
        self.stopping = True
        console.print(f"stopping (grace {self.grace_s:.0f}s for running tasks)...")
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        while time.monotonic() < deadline and any(c.poll() is None for c in self.children.values()):
            time.sleep(0.1)
        self._signal_all(signal.SIGKILL)
        for child in self.children.values():
            child.wait()
        # the groups may hold grandchildren (e.g. pool processes): make sure they are gone
        self._signal_all(signal.SIGKILL)

    def wait(self) -> int:
        """Block until a child exits or a signal asks to stop; returns the exit code."""
        while not self.stopping:
            for name, child in self.children.items():
                code = child.poll()
                if code is not None:
                    console.print(f"[red]{name} exited with {code}; stopping the rest[/red]")
                    self.stop()
                    return code or 1
            time.sleep(0.2)
        return 0


@cli.command("run")
def run(
    with_worker: Annotated[bool, typer.Option(help="Also run a Celery worker.")] = True,
    build_tiny: Annotated[bool, typer.Option(help="Build the tiny generators if missing.")] = True,
) -> None:
    """Migrate, then serve the API and a worker until Ctrl-C (the embedded default)."""
    logging.basicConfig(level=logging.INFO)
    settings = get_settings()
    if build_tiny and settings.default_model in TINY_MODELS:
        console.print(f"making sure the tiny generators are in {settings.resolved_models_dir}...")
        build_tiny_models(settings.resolved_models_dir)
    upgrade_database(settings)
    supervisor = Supervisor(settings.shutdown_grace_s)

    def on_signal(signum: int, _frame: object) -> None:
        supervisor.stop()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    supervisor.start(
        "api",
        [
            sys.executable,
            "-m",
            "uvicorn",
            "app.main:app",
            "--host",
            settings.api_host,
            "--port",
            str(settings.api_port),
        ],
    )
    if with_worker:
        supervisor.start(
            "worker",
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "workers.celery_app",
                "worker",
                "-Q",
                "gpu,train",
                "--pool",
                "solo",
                "--concurrency",
                "1",
                "-n",
                "embedded@%h",
                "--loglevel",
                "INFO",
            ],
        )
    console.print(f"synthderm is up: {settings.public_base_url} (Ctrl-C stops it)")
    code = supervisor.wait()
    raise typer.Exit(code)


def main() -> None:
    from app.cli.client import ApiError

    try:
        cli()
    except ApiError as exc:  # a client command the API refused: its sentence, no traceback
        console.print(f"[red]error: {exc}[/red]")
        sys.exit(1)


if __name__ == "__main__":
    main()
