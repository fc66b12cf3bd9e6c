"""The layout's rules: the API never loads torch, imports point down a declared layer order with
no cycle, modules stay small, and no router imports another."""

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


# --- the import graph ---------------------------------------------------------------------
#
# Every import in app/, workers/ and models/, function-local ones included (a cycle hidden by
# an import inside a function is still a cycle). Groups, lowest first: a module may import
# its own group or a lower rank, never a sibling of the same rank nor anything above.
GROUPS = (
    # (group, module prefixes, rank)
    ("models", ("models",), 0),
    ("base", ("app.errors", "app.ids", "app.fitzpatrick", "app.config", "app.schemas"), 0),
    ("infra", ("app.db", "app.storage", "app.storage_urls", "app.broker", "app.keys",
               "app.vocabulary"), 1),
    ("engine", ("app.engine",), 2),
    ("datasets", ("app.datasets",), 3),
    ("generation", ("app.generation",), 4),
    ("experiments", ("app.experiments",), 4),
    ("finetunes", ("app.finetunes",), 4),
    ("evaluations", ("app.evaluations",), 4),
    ("api", ("app.api",), 5),
    ("cli", ("app.cli",), 5),
    ("main", ("app.main",), 6),
    ("workers", ("workers",), 7),
)  # fmt: skip
PACKAGES = ("app", "workers", "models")
MAX_MODULE_LINES = 450


def module_files() -> dict[str, Path]:
    """Every module of app/, workers/ and models/ by dotted name (packages by __init__)."""
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (a `from package import name` of a submodule
    counts as importing that submodule)."""
    import ast

    modules = module_files()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the importing module's package
                    anchor = name.split(".")
                    anchor = anchor if is_package else anchor[:-1]
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{alias.name}" for alias in node.names]
                targets = [t if t in modules else base for t in targets]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and target not in PACKAGES:
                    graph[name].add(target)
    return graph


def group_of(module: str) -> tuple[str, int]:
    for group, prefixes, rank in GROUPS:
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return group, rank
    raise AssertionError(f"{module} belongs to no group of tests/test_layout.py: add it")


def test_every_import_points_down_or_within_its_group() -> None:
    wrong = []
    for module, imported in sorted(import_graph().items()):
        if module in PACKAGES:
            continue
        group, rank = group_of(module)
        for target in sorted(imported):
            other, other_rank = group_of(target)
            if other != group and other_rank >= rank:
                wrong.append(f"{module} ({group}) imports {target} ({other})")
    assert wrong == []


def test_no_import_cycles() -> None:
    graph = import_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert cycles == []


def test_the_graph_sees_every_kind_of_import() -> None:
    """A check of the checker: `from app import x`, `from app.x import y` and an import inside
    a function (workers load diffusers' pipeline code lazily) are all edges of the graph."""
    graph = import_graph()
    assert "app.engine" in graph["app.generation.service"]
    assert "app.engine.jobs" in graph["app.engine.dispatch"]
    assert "models.pipelines" in graph["workers.sampling"]
    assert group_of("app.cli.common") == ("cli", 5)


def test_no_module_over_the_size_limit() -> None:
    long = {
        name: n
        for name, path in module_files().items()
        if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}


def test_no_router_imports_another_router() -> None:
    shared = {"app.api.deps", "app.api.views", "app.api.accepted", "app.api.problems"}
    wrong = {
        module: sorted(t for t in targets if t.startswith("app.api.") and t not in shared)
        for module, targets in import_graph().items()
        if module.startswith("app.api.")
    }
    assert {m: t for m, t in wrong.items() if t} == {}
