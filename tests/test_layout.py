"""The layout's rules: the API never loads torch, and dependencies point one way."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def loaded_after(code: str, modules: tuple[str, ...]) -> list[str]:
    """Which of `modules` a fresh interpreter has loaded after running `code`."""
    probe = f"{code}\nimport sys\nprint(','.join(m for m in {modules!r} if m in sys.modules))\n"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return [name for name in out.stdout.strip().split(",") if name]


def test_app_never_imports_torch_or_workers() -> None:
    code = (
        "import importlib, pkgutil, app\n"
        "for m in pkgutil.walk_packages(app.__path__, 'app.'):\n"
        "    importlib.import_module(m.name)\n"
        "import app.main\n"
        "app.main.create_app"
    )
    assert loaded_after(code, ("torch", "diffusers", "transformers", "workers", "models")) == []


def test_models_import_without_database_or_web() -> None:
    code = "import models.pipelines, models.strategies, models.tiny_random"
    assert loaded_after(code, ("fastapi", "sqlalchemy", "celery", "app")) == []


def test_a_worker_loads_diffusers_only_when_it_generates() -> None:
    # the Celery app with every task module, as `celery -A workers.celery_app worker` loads
    # it: a worker that only trains classifiers (or ingests, or exports) never needs diffusers
    code = (
        "import workers.celery_app\n"
        "for name in workers.celery_app.app.conf.include:\n"
        "    __import__(name)"
    )
    assert loaded_after(code, ("diffusers", "transformers")) == []


def test_no_torch_import_statement_under_app() -> None:
    offenders = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "app").rglob("*.py")
        if any(
            line.strip().startswith(
                ("import torch", "from torch", "import diffusers", "from diffusers")
            )
            for line in path.read_text().splitlines()
        )
    ]
    assert offenders == []


def test_readme_configuration_table_is_current() -> None:
    from scripts.settings_table import settings_table

    assert settings_table() in (ROOT / "README.md").read_text()
