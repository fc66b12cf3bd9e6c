"""The `synthderm` command: administration (keys, database, models) and the embedded runner.

`synthderm run` is what `make run` starts: it migrates, then runs the API and a Celery worker
as child processes and stops both cleanly on Ctrl-C (SIGTERM, a grace period, then SIGKILL).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from sqlalchemy.orm import Session

from app.config import Settings, get_settings

ROOT = Path(__file__).resolve().parent.parent
console = Console(stderr=True)

cli = typer.Typer(help="synthderm: synthetic dermatology data service.", no_args_is_help=True)
keys_cli = typer.Typer(help="API keys.", no_args_is_help=True)
db_cli = typer.Typer(help="Database schema.", no_args_is_help=True)
models_cli = typer.Typer(help="Generator models.", no_args_is_help=True)
cli.add_typer(keys_cli, name="keys")
cli.add_typer(db_cli, name="db")
images_cli = typer.Typer(help="Generated images.", no_args_is_help=True)
cli.add_typer(models_cli, name="models")
cli.add_typer(images_cli, name="images")


def _session_scope(settings: Settings) -> AbstractContextManager[Session]:
    from app.db.session import session_scope

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


# --- serving ------------------------------------------------------------------------------


@cli.command("serve")
def serve() -> None:
    """Serve the API only (uvicorn), on api_host:api_port."""
    import uvicorn

    settings = get_settings()
    uvicorn.run("app.main:app", host=settings.api_host, port=settings.api_port)


class Supervisor:
    """Child processes in their own process groups; stopped together, none left behind."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.stopping = False

    def start(self, name: str, argv: list[str]) -> None:
        console.print(f"starting {name}: {' '.join(argv)}")
        self.children[name] = subprocess.Popen(argv, cwd=ROOT, start_new_session=True)

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
            sys.executable, "-m", "uvicorn", "app.main:app",
            "--host", settings.api_host, "--port", str(settings.api_port),
        ],
    )  # fmt: skip
    if with_worker:
        supervisor.start(
            "worker",
            [
                sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker",
                "-Q", "gpu,train", "--pool", "solo", "--concurrency", "1",
                "-n", "embedded@%h", "--loglevel", "INFO",
            ],
        )  # fmt: skip
    console.print(f"synthderm is up: {settings.public_base_url} (Ctrl-C stops it)")
    code = supervisor.wait()
    raise typer.Exit(code)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
