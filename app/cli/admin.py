"""`synthderm keys|db|models|images ...`: the administration commands, on the service's own
database and folders (API keys, migrations, generator models, regenerating an image).

The database side of the CLI: it imports SQLAlchemy and the ORM lazily, inside the commands,
so that mounting these commands costs the client commands nothing; no REST client here.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from app.cli.common import ROOT, console
from app.config import Settings, get_settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

keys_cli = typer.Typer(help="API keys.", no_args_is_help=True)
db_cli = typer.Typer(help="Database schema.", no_args_is_help=True)
models_cli = typer.Typer(help="Generator models.", no_args_is_help=True)
images_cli = typer.Typer(help="Generated images.", no_args_is_help=True)


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
    """Create an API key and print it once (only its hash is stored; stdout holds the key
    alone), and the secret that signs its webhooks, once, on stderr."""
    from app.keys import create_key

    with _session_scope(get_settings()) as session:
        row, raw = create_key(session=session, name=name)
        key_id, secret = row.id, row.webhook_secret
    console.print(f"created key {key_id} for {name!r}; it is shown only now:")
    typer.echo(raw)
    console.print(f"webhook signing secret (shown only now): {secret}", soft_wrap=True)


@keys_cli.command("rotate-webhook-secret")
def keys_rotate_webhook_secret(
    key_id: Annotated[str, typer.Argument(help="Key id or prefix.")],
) -> None:
    """Give a key a new webhook signing secret and print it once; deliveries attempted from
    now on are signed with it."""
    from app.keys import rotate_webhook_secret

    with _session_scope(get_settings()) as session:
        secret = rotate_webhook_secret(session=session, key_id=key_id)
    if secret is None:
        console.print(f"[red]no key {key_id!r}[/red]")
        raise typer.Exit(1)
    console.print(f"new webhook signing secret of {key_id}; it is shown only now:")
    typer.echo(secret)


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
    from app.vocabulary import register_builtin_models, register_models_in

    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.attributes["database_url"] = settings.database_url
    config.attributes["configure_logger"] = False
    command.upgrade(config, "head")
    make_store(settings).ensure_ready()
    with _session_scope(settings) as session:
        found = register_models_in(session=session, models_dir=settings.resolved_models_dir)
        found += register_builtin_models(session=session, root=ROOT, skip=found)
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
