#!/usr/bin/env bash
# Offline checks of the deployment files (no Docker engine, no network needed):
#   1. hadolint on the Dockerfile (any finding, style included, fails);
#   2. docker-compose.yml against the Compose Specification schema vendored in
#      check-jsonschema;
#   3. structural checks of docker-compose.yml, the Dockerfile, .dockerignore and the
#      Prometheus scrape configuration deploy/prometheus.yml (PyYAML);
#   4. `docker compose config` as well, only when a Docker CLI with compose is present.
#
# Tools come from "${VENV:-.venv}/bin" when there, else from PATH.
# Usage: scripts/check_deploy.sh   (from anywhere; it works in the repository root)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="${VENV:-.venv}"

tool() {
    # Prints the path of a tool: the virtualenv's copy first, then PATH.
    local name="$1"
    if [[ -x "$VENV/bin/$name" ]]; then
        printf '%s\n' "$VENV/bin/$name"
    elif command -v "$name" >/dev/null 2>&1; then
        command -v "$name"
    else
        echo "check_deploy: '$name' not found in $VENV/bin nor on PATH" >&2
        return 1
    fi
}

HADOLINT="$(tool hadolint)"
CHECK_JSONSCHEMA="$(tool check-jsonschema)"
if [[ -x "$VENV/bin/python" ]]; then
    PYTHON="$VENV/bin/python"
else
    PYTHON="$(tool python3)"
fi

for f in Dockerfile docker-compose.yml .dockerignore; do
    [[ -f "$f" ]] || { echo "check_deploy: missing $f" >&2; exit 1; }
done

echo "== hadolint Dockerfile"
"$HADOLINT" --failure-threshold style Dockerfile
echo "ok: hadolint found nothing"

echo "== docker-compose.yml against the Compose Specification schema"
"$CHECK_JSONSCHEMA" --builtin-schema vendor.compose-spec docker-compose.yml

echo "== structure of docker-compose.yml, Dockerfile, .dockerignore"
"$PYTHON" - <<'PYEOF'
import re
import sys
from pathlib import Path

import yaml

errors: list[str] = []


def fail(msg: str) -> None:
    errors.append(msg)


compose = yaml.safe_load(Path("docker-compose.yml").read_text())
services = compose.get("services") or {}

EXPECTED = {"api", "migrate", "worker-gpu", "worker-train", "worker-webhooks", "postgres", "redis",
            "minio"}
WORKERS = {"worker-gpu", "worker-train", "worker-webhooks"}
APP = {"api", "migrate"} | WORKERS
BACKING = {"postgres", "redis", "minio"}
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
REQUIRED_ENV = {
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
}

missing = EXPECTED - services.keys()
if missing:
    fail(f"services missing: {sorted(missing)}")


def as_list(command) -> list[str]:
    return command.split() if isinstance(command, str) else [str(c) for c in command or []]


INTERP = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?[-?+][^}]*)?\}")


def mounts(svc: dict) -> list[tuple[str, str]]:
    """(source, target) of each volume entry, short or long syntax."""
    out = []
    for v in svc.get("volumes") or []:
        if isinstance(v, dict):
            out.append((str(v.get("source", "")), str(v.get("target", ""))))
        else:
            parts = INTERP.sub("${}", str(v)).split(":")
            if len(parts) >= 2:
                out.append((parts[0], parts[1]))
    return out


def env_of(svc: dict) -> dict:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return env


services = {name: svc or {} for name, svc in services.items()}
for name, svc in services.items():
    # Healthchecks: everything long-running except the workers must have one.
    hc = svc.get("healthcheck")
    if hc is not None:
        test = hc.get("test")
        if hc.get("disable") or not test or as_list(test)[:1] == ["NONE"]:
            fail(f"{name}: healthcheck is disabled or has no test")
    elif name != "migrate" and name not in WORKERS:
        fail(f"{name}: no healthcheck")

    # depends_on: long syntax with an explicit condition, on known services.
    deps = svc.get("depends_on")
    if deps is None:
        continue
    if not isinstance(deps, dict):
        fail(f"{name}: depends_on must use the long syntax with a condition")
        continue
    for dep, spec in deps.items():
        if dep not in services:
            fail(f"{name}: depends_on unknown service {dep!r}")
        cond = (spec or {}).get("condition")
        if cond not in CONDITIONS:
            fail(f"{name}: depends_on {dep!r} has no valid condition ({cond!r})")
        elif cond == "service_healthy" and dep in services and not services[dep].get("healthcheck"):
            fail(f"{name}: waits for {dep!r} healthy but {dep!r} has no healthcheck")

if not missing:
    for name in APP:
        deps = services[name].get("depends_on") or {}
        deps = deps if isinstance(deps, dict) else {}
        for dep in BACKING:
            if (deps.get(dep) or {}).get("condition") != "service_healthy":
                fail(f"{name}: must wait for {dep} with condition service_healthy")
        if name != "migrate":
            if (deps.get("migrate") or {}).get("condition") != "service_completed_successfully":
                fail(f"{name}: must wait for migrate with service_completed_successfully")
        env = env_of(services[name])
        for var in sorted(REQUIRED_ENV - env.keys()):
            fail(f"{name}: environment lacks {var}")
        if env.get("SYNTHDERM_MODELS_DIR") != "/models":
            fail(f"{name}: SYNTHDERM_MODELS_DIR must be /models")
        if not any(target == "/models" for _, target in mounts(services[name])):
            fail(f"{name}: the models directory is not mounted at /models")
        if services[name].get("build") is None and services[name].get("image") is None:
            fail(f"{name}: neither build nor image")

    if as_list(services["migrate"].get("command")) != ["synthderm", "db", "upgrade"]:
        fail("migrate: command must be `synthderm db upgrade`")
    if str(services["migrate"].get("restart", "no")) not in {"no", "on-failure"}:
        fail("migrate: must not restart after it completes")
    if "uvicorn" not in as_list(services["api"].get("command") or ["uvicorn"]):
        fail("api: command must run uvicorn")
    for name, queue in (("worker-gpu", "gpu"), ("worker-train", "train"),
                        ("worker-webhooks", "webhooks")):
        cmd = as_list(services[name].get("command"))
        if cmd[:4] != ["celery", "-A", "workers.celery_app", "worker"]:
            fail(f"{name}: command must start `celery -A workers.celery_app worker`")
        if "-Q" not in cmd or cmd[cmd.index("-Q") + 1 : cmd.index("-Q") + 2] != [queue]:
            fail(f"{name}: must consume queue {queue!r} (-Q {queue})")
    if env_of(services["worker-gpu"]).get("SYNTHDERM_DEVICE") != "cuda":
        fail("worker-gpu: SYNTHDERM_DEVICE must be cuda")
    # /metrics is for operators (issue 21): the api takes its token from the environment,
    # never a value written here, and the scrape configuration sends it as a bearer token
    if "${SYNTHDERM_METRICS_TOKEN" not in str(env_of(services["api"]).get("SYNTHDERM_METRICS_TOKEN")):
        fail("api: SYNTHDERM_METRICS_TOKEN must come from the environment (${SYNTHDERM_METRICS_TOKEN:-})")

    devices = (
        ((services["worker-gpu"].get("deploy") or {}).get("resources") or {}).get("reservations")
        or {}
    ).get("devices") or []
    if not any(
        d.get("driver") == "nvidia"
        and "gpu" in (d.get("capabilities") or [])
        and (d.get("count") == "all" or (isinstance(d.get("count"), int) and d["count"] >= 1)
             or d.get("device_ids"))
        for d in devices
    ):
        fail("worker-gpu: no nvidia GPU reservation (deploy.resources.reservations.devices)")

    volumes = compose.get("volumes") or {}
    for name, target in (("postgres", "/var/lib/postgresql/data"), ("minio", "/data")):
        if not any(
            src in volumes and dst == target for src, dst in mounts(services[name])
        ):
            fail(f"{name}: {target} must be a named volume declared under volumes:")

# deploy/prometheus.yml: scrapes the api's /metrics with the token from a file, never inline.
scrape_path = Path("deploy/prometheus.yml")
if scrape_path.exists():
    scrape = yaml.safe_load(scrape_path.read_text()) or {}
    jobs = [j for j in scrape.get("scrape_configs") or [] if j.get("job_name") == "synthderm"]
    if not jobs:
        fail("deploy/prometheus.yml: no scrape_configs entry with job_name synthderm")
    for job in jobs:
        auth = job.get("authorization") or {}
        if job.get("metrics_path", "/metrics") != "/metrics":
            fail("deploy/prometheus.yml: the synthderm job must scrape /metrics")
        if auth.get("type", "Bearer") != "Bearer" or not auth.get("credentials_file"):
            fail("deploy/prometheus.yml: the synthderm job must send the metrics token as a "
                 "bearer token read from authorization.credentials_file")
        if auth.get("credentials") or job.get("bearer_token"):
            fail("deploy/prometheus.yml: the metrics token must not be written in the file")
        targets = [t for c in job.get("static_configs") or [] for t in c.get("targets") or []]
        if "api:8000" not in targets:
            fail("deploy/prometheus.yml: the synthderm job must target api:8000")

# Variable interpolation: `$$` is a literal dollar; anything else must be ${VAR...}.
for lineno, line in enumerate(Path("docker-compose.yml").read_text().splitlines(), 1):
    code = line.split(" #", 1)[0] if not line.lstrip().startswith("#") else ""
    rest = INTERP.sub("", code.replace("$$", ""))
    if "$" in rest:
        fail(f"docker-compose.yml:{lineno}: bad interpolation (use ${{VAR}} or $$): {line.strip()}")

# Dockerfile: a non-root final stage that serves the API on 8000 from /srv/synthderm.
dockerfile = Path("Dockerfile").read_text()
instructions = [
    line.strip() for line in re.sub(r"\\\n", " ", dockerfile).splitlines()
    if line.strip() and not line.strip().startswith("#")
]
final = instructions[max(i for i, s in enumerate(instructions) if s.upper().startswith("FROM ")):]
users = [s.split(None, 1)[1] for s in final if s.upper().startswith("USER ")]
if not users or users[-1].split(":")[0] in {"root", "0"}:
    fail("Dockerfile: the final stage must switch to a non-root USER")
if not any(s.upper().startswith("EXPOSE ") and "8000" in s.split() for s in final):
    fail("Dockerfile: the final stage must EXPOSE 8000")
if not any(s.upper() == "WORKDIR /SRV/SYNTHDERM" for s in final):
    fail("Dockerfile: WORKDIR /srv/synthderm missing from the final stage")
cmds = [s for s in final if s.upper().startswith("CMD ")]
if not cmds or "uvicorn" not in cmds[-1] or "app.main:app" not in cmds[-1]:
    fail("Dockerfile: the default CMD must run uvicorn app.main:app")
if not re.search(r'pip install[^\n]*(\.\[worker\]|-r )', dockerfile):
    fail("Dockerfile: the worker extras are not installed")

# .dockerignore: no virtualenv, local data, git history or secrets in the build context.
ignored = {
    line.strip().rstrip("/") for line in Path(".dockerignore").read_text().splitlines()
    if line.strip() and not line.startswith("#")
}
for entry in (".venv", "var", ".git", ".env"):
    if entry not in ignored:
        fail(f".dockerignore: {entry} must be excluded from the build context")
for needed in ("pyproject.toml", "app", "workers", "models", "migrations", "alembic.ini"):
    if needed in ignored:
        fail(f".dockerignore: {needed} is needed in the image but excluded")

if errors:
    print("\n".join(f"FAIL: {e}" for e in errors), file=sys.stderr)
    sys.exit(1)
print(f"ok: {len(services)} services, depends_on conditions, GPU reservation, Dockerfile")
PYEOF

if command -v docker >/dev/null 2>&1 && docker compose version >/dev/null 2>&1; then
    echo "== docker compose config"
    docker compose -f docker-compose.yml config --quiet
    echo "ok: docker compose config"
else
    echo "(docker compose not available: skipped \`docker compose config\`)"
fi

echo "deploy checks passed"
