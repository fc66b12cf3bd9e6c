"""The `synthderm` command: the root Typer app that mounts the sub-commands, and `main()`.

What each part does lives in its module: admin (keys, db, models, images: the database side),
serve (`serve` and `run`, the process supervisor), jobs, datasets and experiments (REST client
commands), common (what they share). This module only mounts them: no command of its own, no
SQLAlchemy or torch import.
"""

from __future__ import annotations

import sys

import typer

from app.cli.admin import (
    build_tiny_models,
    db_cli,
    images_cli,
    keys_cli,
    models_cli,
    upgrade_database,
)
from app.cli.client import ApiError
from app.cli.common import ROOT, console, login
from app.cli.datasets import datasets_cli
from app.cli.evaluations import evaluations_cli
from app.cli.experiments import experiments_cli
from app.cli.finetunes import finetunes_cli
from app.cli.jobs import jobs_cli
from app.cli.serve import run, serve

__all__ = ["ROOT", "build_tiny_models", "cli", "main", "upgrade_database"]

cli = typer.Typer(help="synthderm: synthetic dermatology data service.", no_args_is_help=True)
cli.command("login")(login)
cli.command("serve")(serve)
cli.command("run")(run)
cli.add_typer(keys_cli, name="keys")
cli.add_typer(db_cli, name="db")
cli.add_typer(jobs_cli, name="jobs")
cli.add_typer(datasets_cli, name="datasets")
cli.add_typer(models_cli, name="models")
cli.add_typer(images_cli, name="images")
cli.add_typer(experiments_cli, name="experiments")
cli.add_typer(finetunes_cli, name="finetunes")
cli.add_typer(evaluations_cli, name="evaluations")


def main() -> None:
    """Run the command; an API error prints its sentence in red and exits 1, no traceback."""
    try:
        cli()
    except ApiError as exc:  # a client command the API refused: its sentence, no traceback
        console.print(f"[red]error: {exc}[/red]")
        sys.exit(1)


if __name__ == "__main__":
    main()
