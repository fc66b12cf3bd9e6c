"""The deployment files: Dockerfile, docker-compose.yml, .dockerignore, scripts/check_deploy.sh.

Offline: no Docker engine and no network. The script runs hadolint and the Compose
Specification schema (check-jsonschema); the tests below also read the compose file directly,
and feed the script broken copies to make sure it notices.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "check_deploy.sh"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
SCRAPE_CONFIG = ROOT / "deploy" / "prometheus.yml"

SERVICES = {"api", "migrate", "worker-gpu", "worker-train", "worker-webhooks", "postgres", "redis",
            "minio"}  # fmt: skip
BACKING = ("postgres", "redis", "minio")
APP = ("api", "migrate", "worker-gpu", "worker-train", "worker-webhooks")
LONG_RUNNING_APP = ("api", "worker-gpu", "worker-train", "worker-webhooks")
SHARED_ENV = (
    "SYNTHDERM_DATABASE_URL",
    "SYNTHDERM_BROKER_URL",
    "SYNTHDERM_STORAGE_BACKEND",
    "SYNTHDERM_S3_ENDPOINT_URL",
    "SYNTHDERM_S3_PUBLIC_ENDPOINT_URL",
    "SYNTHDERM_S3_BUCKET",
    "SYNTHDERM_S3_ACCESS_KEY_ID",
    "SYNTHDERM_S3_SECRET_ACCESS_KEY",
    "SYNTHDERM_MODELS_DIR",
    "SYNTHDERM_PUBLIC_BASE_URL",
    "SYNTHDERM_SIGNING_SECRET",
)

pytestmark = pytest.mark.timeout(60)


def _tool_env() -> dict[str, str]:
    """The environment for the script: this interpreter's bin directory first on PATH."""
    bindir = Path(sys.executable).parent
    env = dict(os.environ)
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    env["VENV"] = str(bindir.parent)
    return env


def _run_script(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(root / "scripts" / "check_deploy.sh")],
        cwd=root,
        env=_tool_env(),
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command") or []
    return command.split() if isinstance(command, str) else [str(c) for c in command]


# --------------------------------------------------------------------------------------
# The script
# --------------------------------------------------------------------------------------


def test_check_script_is_executable_bash() -> None:
    assert SCRIPT.is_file()
    assert os.access(SCRIPT, os.X_OK), "scripts/check_deploy.sh must be executable"
    text = SCRIPT.read_text()
    assert text.startswith("#!/usr/bin/env bash")
    assert "set -euo pipefail" in text


def test_check_script_passes() -> None:
    result = _run_script(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "deploy checks passed" in result.stdout


def _copy_tree(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    for path in (SCRIPT, COMPOSE, DOCKERFILE, DOCKERIGNORE):
        shutil.copy2(path, root / path.relative_to(ROOT))
    hadolint_cfg = ROOT / ".hadolint.yaml"
    if hadolint_cfg.exists():
        shutil.copy2(hadolint_cfg, root / ".hadolint.yaml")
    return root


def _drop_gpu_reservation(data: dict[str, Any]) -> None:
    del data["services"]["worker-gpu"]["deploy"]


def _unconditional_depends_on(data: dict[str, Any]) -> None:
    data["services"]["api"]["depends_on"] = ["postgres", "redis", "minio", "migrate"]


def _drop_service(data: dict[str, Any]) -> None:
    del data["services"]["redis"]
    for svc in data["services"].values():
        if isinstance(svc.get("depends_on"), dict):
            svc["depends_on"].pop("redis", None)


def _drop_postgres_healthcheck(data: dict[str, Any]) -> None:
    del data["services"]["postgres"]["healthcheck"]


def _unknown_key(data: dict[str, Any]) -> None:  # caught by the Compose schema
    data["services"]["api"]["restart_policy"] = "always"


def _drop_env(data: dict[str, Any]) -> None:
    del data["services"]["worker-train"]["environment"]["SYNTHDERM_DATABASE_URL"]


def _metrics_token_written_in(data: dict[str, Any]) -> None:  # a secret in the file
    data["services"]["api"]["environment"]["SYNTHDERM_METRICS_TOKEN"] = "hunter2"


@pytest.mark.parametrize(
    "breakage",
    [
        _drop_gpu_reservation,
        _unconditional_depends_on,
        _drop_service,
        _drop_postgres_healthcheck,
        _unknown_key,
        _drop_env,
        _metrics_token_written_in,
    ],
)
def test_check_script_rejects_broken_compose(tmp_path: Path, breakage: Any) -> None:
    root = _copy_tree(tmp_path)
    data = yaml.safe_load(COMPOSE.read_text())
    # Unshare the YAML anchors so that a change touches one service only.
    data = yaml.safe_load(yaml.safe_dump(data))
    assert _run_script_on(root, data).returncode == 0, "the unbroken copy must pass"
    breakage(data)
    result = _run_script_on(root, data)
    assert result.returncode != 0, f"{breakage.__name__} went unnoticed:\n{result.stdout}"
    assert "deploy checks passed" not in result.stdout


def _run_script_on(root: Path, data: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    (root / "docker-compose.yml").write_text(yaml.safe_dump(data, sort_keys=False))
    return _run_script(root)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("credentials_file: /etc/prometheus/synthderm_metrics_token", "credentials: hunter2"),
        ("type: Bearer", "type: Basic"),
        ('targets: ["api:8000"]', 'targets: ["api:9999"]'),
        ("job_name: synthderm", "job_name: other"),
    ],
)
def test_check_script_rejects_a_broken_scrape_config(tmp_path: Path, old: str, new: str) -> None:
    """deploy/prometheus.yml must send the metrics token as a bearer token read from a file."""
    root = _copy_tree(tmp_path)
    (root / "deploy").mkdir()
    text = SCRAPE_CONFIG.read_text()
    assert old in text
    (root / "deploy" / "prometheus.yml").write_text(text)
    assert _run_script(root).returncode == 0, "the unbroken copy must pass"
    (root / "deploy" / "prometheus.yml").write_text(text.replace(old, new, 1))
    result = _run_script(root)
    assert result.returncode != 0, f"{new!r} went unnoticed:\n{result.stdout}"
    assert "deploy/prometheus.yml" in result.stderr


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("USER 10001:10001", "USER root"),  # hadolint DL3002 and the non-root check
        ("EXPOSE 8000", "EXPOSE 9999"),
        ("apt-get install -y --no-install-recommends", "apt-get install -y"),  # DL3015
    ],
)
def test_check_script_rejects_broken_dockerfile(tmp_path: Path, old: str, new: str) -> None:
    root = _copy_tree(tmp_path)
    text = DOCKERFILE.read_text()
    assert old in text
    (root / "Dockerfile").write_text(text.replace(old, new, 1))
    result = _run_script(root)
    assert result.returncode != 0, result.stdout
    assert "deploy checks passed" not in result.stdout


# --------------------------------------------------------------------------------------
# docker-compose.yml
# --------------------------------------------------------------------------------------


def test_all_services_present(services: dict[str, Any]) -> None:
    assert set(services) == SERVICES


def test_backing_services_images_and_healthchecks(services: dict[str, Any]) -> None:
    assert services["postgres"]["image"].startswith("postgres:16")
    assert services["redis"]["image"].startswith("redis:7")
    assert "minio/minio" in services["minio"]["image"]
    for name in BACKING:
        test = services[name]["healthcheck"]["test"]
        assert test and test[0] in {"CMD", "CMD-SHELL"}, name
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert "ping" in " ".join(services["redis"]["healthcheck"]["test"])
    minio_check = " ".join(services["minio"]["healthcheck"]["test"])
    assert "mc ready" in minio_check or "/minio/health/live" in minio_check


def test_every_depends_on_has_a_condition(services: dict[str, Any]) -> None:
    allowed = {"service_started", "service_healthy", "service_completed_successfully"}
    for name, svc in services.items():
        deps = svc.get("depends_on")
        if deps is None:
            continue
        assert isinstance(deps, dict), f"{name}: depends_on must use the long syntax"
        for dep, spec in deps.items():
            assert dep in services, f"{name} depends on unknown {dep}"
            assert spec["condition"] in allowed, f"{name} -> {dep}"


def test_app_services_wait_for_healthy_backing_services(services: dict[str, Any]) -> None:
    for name in APP:
        deps = services[name]["depends_on"]
        for dep in BACKING:
            assert deps[dep]["condition"] == "service_healthy", f"{name} -> {dep}"


def test_long_running_services_wait_for_migrate(services: dict[str, Any]) -> None:
    for name in LONG_RUNNING_APP:
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully", name
    assert "migrate" not in services["migrate"]["depends_on"]


def test_migrate_runs_db_upgrade_once(services: dict[str, Any]) -> None:
    migrate = services["migrate"]
    assert _command(migrate) == ["synthderm", "db", "upgrade"]
    assert str(migrate.get("restart", "no")) == "no"


def test_api_command_port_and_healthcheck(services: dict[str, Any]) -> None:
    api = services["api"]
    command = _command(api)
    assert command[:2] == ["uvicorn", "app.main:app"]
    assert command[command.index("--port") + 1] == "8000"
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert any(str(p).endswith(":8000") for p in api["ports"])
    check = " ".join(api["healthcheck"]["test"])
    assert "http://127.0.0.1:8000/healthz" in check


@pytest.mark.parametrize(("name", "queue"), [("worker-gpu", "gpu"), ("worker-train", "train")])
def test_worker_commands(services: dict[str, Any], name: str, queue: str) -> None:
    command = _command(services[name])
    assert command[:4] == ["celery", "-A", "workers.celery_app", "worker"]
    assert command[command.index("-Q") + 1] == queue
    assert command[command.index("--pool") + 1] == "solo"
    assert command[command.index("--concurrency") + 1] == "1"
    assert command[command.index("-n") + 1] == f"{queue}@%h"


def test_worker_webhooks_consumes_its_queue_with_threads(services: dict[str, Any]) -> None:
    # a receiver that never answers holds one thread for webhook_timeout_s, not the worker
    command = _command(services["worker-webhooks"])
    assert command[:4] == ["celery", "-A", "workers.celery_app", "worker"]
    assert command[command.index("-Q") + 1] == "webhooks"
    assert command[command.index("--pool") + 1] == "threads"
    assert int(command[command.index("--concurrency") + 1]) > 1
    assert command[command.index("-n") + 1] == "webhooks@%h"


def test_worker_gpu_reserves_an_nvidia_gpu(services: dict[str, Any]) -> None:
    devices = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d["driver"] == "nvidia" and "gpu" in d["capabilities"] and d.get("count") in (1, "all")
        for d in devices
    )
    assert _env(services["worker-gpu"])["SYNTHDERM_DEVICE"] == "cuda"
    assert "deploy" not in services["api"], "the API must not hold a GPU"


def test_worker_gpu_healthcheck_pings_its_own_node(services: dict[str, Any]) -> None:
    check = " ".join(services["worker-gpu"]["healthcheck"]["test"])
    assert "inspect ping" in check
    # $$ is compose's escape for a literal $, expanded by the container's shell.
    assert "gpu@$$HOSTNAME" in check


@pytest.mark.parametrize("name", APP)
def test_shared_environment(services: dict[str, Any], name: str) -> None:
    env = _env(services[name])
    for var in SHARED_ENV:
        assert var in env, f"{name} lacks {var}"
    assert env["SYNTHDERM_DATABASE_URL"] == (
        "postgresql+psycopg://synthderm:synthderm@postgres:5432/synthderm"
    )
    assert env["SYNTHDERM_BROKER_URL"] == "redis://redis:6379/0"
    assert env["SYNTHDERM_STORAGE_BACKEND"] == "s3"
    assert env["SYNTHDERM_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert env["SYNTHDERM_S3_BUCKET"] == "synthderm"
    assert env["SYNTHDERM_MODELS_DIR"] == "/models"
    assert "localhost:9000" in env["SYNTHDERM_S3_PUBLIC_ENDPOINT_URL"]
    assert env["SYNTHDERM_SIGNING_SECRET"].startswith("${SYNTHDERM_SIGNING_SECRET")


def test_api_metrics_token_comes_from_the_environment(services: dict[str, Any]) -> None:
    """/metrics is for operators: the api reads its token from the host's environment, and
    the scrape configuration sends it as a bearer token from a file (issue 21)."""
    assert _env(services["api"])["SYNTHDERM_METRICS_TOKEN"] == "${SYNTHDERM_METRICS_TOKEN:-}"
    scrape = yaml.safe_load(SCRAPE_CONFIG.read_text())
    (job,) = [j for j in scrape["scrape_configs"] if j["job_name"] == "synthderm"]
    assert job["authorization"]["type"] == "Bearer"
    assert job["authorization"]["credentials_file"]
    assert job["static_configs"][0]["targets"] == ["api:8000"]


def test_minio_credentials_match_the_s3_settings(services: dict[str, Any]) -> None:
    minio_env = _env(services["minio"])
    api_env = _env(services["api"])
    assert minio_env["MINIO_ROOT_USER"] == api_env["SYNTHDERM_S3_ACCESS_KEY_ID"]
    assert minio_env["MINIO_ROOT_PASSWORD"] == api_env["SYNTHDERM_S3_SECRET_ACCESS_KEY"]


def test_postgres_credentials_match_the_database_url(services: dict[str, Any]) -> None:
    env = _env(services["postgres"])
    url = f"postgresql+psycopg://{env['POSTGRES_USER']}:{env['POSTGRES_PASSWORD']}@postgres:5432/"
    assert _env(services["api"])["SYNTHDERM_DATABASE_URL"] == url + env["POSTGRES_DB"]


@pytest.mark.parametrize("name", APP)
def test_models_mounted_read_only(services: dict[str, Any], name: str) -> None:
    volumes = [str(v) for v in services[name]["volumes"]]
    models = [v for v in volumes if ":/models" in v]
    assert models, f"{name} does not mount /models"
    assert models[0].startswith("${SYNTHDERM_HOST_MODELS_DIR:-./var/models}")
    assert models[0].endswith(":/models:ro")


def test_named_volumes_for_data(compose: dict[str, Any], services: dict[str, Any]) -> None:
    declared = set(compose["volumes"])
    pg = [str(v).split(":") for v in services["postgres"]["volumes"]]
    assert any(src in declared and dst == "/var/lib/postgresql/data" for src, dst, *_ in pg)
    minio = [str(v).split(":") for v in services["minio"]["volumes"]]
    assert any(src in declared and dst == "/data" for src, dst, *_ in minio)


def test_app_services_share_one_build(services: dict[str, Any]) -> None:
    images = {services[name]["image"] for name in APP}
    assert len(images) == 1
    for name in APP:
        assert services[name]["build"]["context"] == "."


def test_interpolations_are_well_formed() -> None:
    pattern = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?[-?+][^}]*)?\}")
    for lineno, line in enumerate(COMPOSE.read_text().splitlines(), 1):
        if line.lstrip().startswith("#"):
            continue
        rest = pattern.sub("", line.replace("$$", ""))
        assert "$" not in rest, f"docker-compose.yml:{lineno}: {line.strip()}"


# --------------------------------------------------------------------------------------
# Dockerfile and .dockerignore
# --------------------------------------------------------------------------------------


def _final_stage() -> list[str]:
    joined = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.startswith("#")]
    start = max(i for i, ln in enumerate(lines) if ln.upper().startswith("FROM "))
    return lines[start:]


def test_dockerfile_base_is_pinned_cuda() -> None:
    text = DOCKERFILE.read_text()
    match = re.search(r"^ARG CUDA_BASE_IMAGE=(\S+)$", text, re.MULTILINE)
    assert match, "the CUDA base image must be a pinned ARG default"
    image = match.group(1)
    assert image.startswith("nvidia/cuda:")
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-\w+(-\w+)*-ubuntu\d+\.\d+", image), image


def test_dockerfile_final_stage() -> None:
    final = _final_stage()
    users = [ln.split()[1] for ln in final if ln.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    assert "WORKDIR /srv/synthderm" in final
    assert "EXPOSE 8000" in final
    cmd = [ln for ln in final if ln.startswith("CMD ")][-1]
    assert '"uvicorn", "app.main:app"' in cmd
    assert '"--port", "8000"' in cmd


def test_dockerfile_installs_worker_extras() -> None:
    text = DOCKERFILE.read_text()
    assert '["optional-dependencies"]["worker"]' in text
    assert "pip install --no-cache-dir" in text


def test_dockerignore_keeps_local_state_out() -> None:
    entries = {
        ln.strip().rstrip("/")
        for ln in DOCKERIGNORE.read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    }
    for entry in (".venv", "var", ".git", ".env"):
        assert entry in entries, entry
    for needed in ("app", "workers", "models", "migrations", "alembic.ini", "pyproject.toml"):
        assert needed not in entries, needed
