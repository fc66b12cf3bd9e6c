"""The CLI's client side loads neither SQLAlchemy nor torch: each module is imported in a fresh
interpreter (this one has both loaded already) and its sys.modules checked."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

HEAVY = ("sqlalchemy", "torch")


def loaded_heavy(*modules: str) -> list[str]:
    """The HEAVY modules a fresh interpreter has loaded after importing `modules`."""
    code = (
        "import importlib, sys\n"
        f"for name in {list(modules)!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(','.join(m for m in {list(HEAVY)!r} if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return [name for name in result.stdout.strip().split(",") if name]


@pytest.mark.parametrize(
    "module",
    ["app.cli.common", "app.cli.jobs", "app.cli.datasets", "app.cli.client", "app.cli.finetunes"],
)
def test_client_modules_load_no_database_or_torch(module: str) -> None:
    """A REST client command's module imports neither SQLAlchemy nor torch."""
    assert loaded_heavy(module) == []


def test_experiments_cli_loads_no_database_or_torch() -> None:
    """`synthderm experiments` renders reports with app.experiments.report_text, no ORM."""
    assert loaded_heavy("app.cli.experiments") == []
