"""The layout's rules: the API never loads torch, and dependencies point one way."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_app_never_imports_torch_or_workers() -> None:
    code = (
        "import importlib, pkgutil, sys, app\n"
        "for m in pkgutil.walk_packages(app.__path__, 'app.'):\n"
        "    importlib.import_module(m.name)\n"
        "import app.main\n"
        "app.main.create_app\n"
        "bad = [m for m in ('torch', 'diffusers', 'transformers', 'workers', 'models')"
        " if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == ""


def test_models_import_without_database_or_web() -> None:
    code = (
        "import sys, models.pipelines, models.strategies, models.tiny_random\n"
        "bad = [m for m in ('fastapi', 'sqlalchemy', 'celery', 'app') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == ""


def test_a_worker_loads_diffusers_only_when_it_generates() -> None:
    # the Celery app with every task module, as `celery -A workers.celery_app worker` loads
    # it: a worker that only trains classifiers (or ingests, or exports) never needs diffusers
    code = (
        "import sys, workers.celery_app\n"
        "for name in workers.celery_app.app.conf.include:\n"
        "    __import__(name)\n"
        "print(','.join(m for m in ('diffusers', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == ""


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
