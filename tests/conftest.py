"""Test fixtures: real PostgreSQL, Redis, an S3 server (moto) and Celery workers, over sockets.

Two stacks share one code path:
- `deployed`: PostgreSQL 127.0.0.1:5432 (a fresh database per run), Redis 127.0.0.1:6379 (a
  private db index), moto's ThreadedMotoServer as S3;
- `embedded`: SQLite, the SQLite broker and a local-directory store in a temporary folder.
Each stack runs the API (`uvicorn app.main:app`) on a free port and a Celery worker, each as a
subprocess configured by the environment as in production (tests can SIGKILL the worker).
"""

from __future__ import annotations

import abc
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis
from sqlalchemy import text, update

from app.cli import build_tiny_models, upgrade_database
from app.config import Settings
from app.db.session import session_factory, session_scope
from app.db.tables import Job
from app.keys import create_key

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_DSN = os.environ.get("SYNTHDERM_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_HOST = os.environ.get("SYNTHDERM_TEST_REDIS_HOST", "127.0.0.1")

# Fast settings for tests: small chunks, quick heartbeats and recovery.
FAST = {
    "chunk_size": 8,
    "generation_batch_size": 2,
    "heartbeat_interval_s": 0.5,
    "stale_after_s": 4.0,
    "redispatch_after_s": 2.0,
    "recovery_interval_s": 0.5,
    "progress_update_interval_s": 0.0,
    "step_update_interval_s": 0.1,
    "task_max_retries": 2,
    "default_num_inference_steps": 4,
    "shutdown_grace_s": 10.0,
    "webhook_allow_loopback": True,  # the receivers of tests/api/test_webhooks.py
    "webhook_progress_interval_s": 600.0,  # one progress event per job, however slow
    "auth_cache_ttl_s": 1.0,  # a key revoked by the tests is refused by the API within 1 s
    # the fastest generators; tests of the project's own model (synthderm-fitz64) name it
    "default_model": "tiny-random",
    "default_inpaint_model": "tiny-random-inpaint",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a subprocess the same Settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNTHDERM_")}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        env[f"SYNTHDERM_{name.upper()}"] = str(value)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def wait_for(
    predicate: Callable[[], Any], *, timeout: float, interval: float = 0.2, what: str = ""
) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout}s waiting for {what or predicate}: last={last!r}"
    )


# --- the model ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder holding the tiny generators, built by the project's own command."""
    folder = tmp_path_factory.mktemp("models")
    build_tiny_models(folder)  # tiny-random and tiny-random-inpaint
    return folder


# --- services -----------------------------------------------------------------------------


@contextlib.contextmanager
def fresh_pg_database(prefix: str) -> Iterator[str]:
    """A new, empty PostgreSQL database: its SQLAlchemy URL; dropped on leaving."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["postgresql", "sqlite"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of each kind, for a test of its own (no stack, no migrations)."""
    if request.param == "sqlite":
        yield f"sqlite:///{(tmp_path / 'fresh.sqlite').as_posix()}"
        return
    with fresh_pg_database("synthderm_fresh") as url:
        yield url


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this run, dropped afterwards."""
    with fresh_pg_database("synthderm_test") as url:
        yield url


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis db index of its own, locked so that two test runs never share one."""
    lock = "synthderm:test-run-lock"
    token = uuid.uuid4().hex
    for index in range(8, 16):
        client = redis.Redis(host=REDIS_HOST, port=6379, db=index)
        if client.set(lock, token, nx=True, ex=3600):
            break
    else:
        pytest.fail("every Redis db 8..15 is held by another test run")
    client.flushdb()
    client.set(lock, token, ex=3600)
    yield f"redis://{REDIS_HOST}:6379/{index}"
    client.flushdb()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on a free port."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's request log
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


# --- the stacks ---------------------------------------------------------------------------


class ServiceProcess(abc.ABC):
    """A service of the stack as a subprocess, configured by the environment as in production,
    in its own process group (a kill takes all of it), its output in a log file."""

    def __init__(self, settings: Settings, log_path: Path) -> None:
        self.settings = settings
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @abc.abstractmethod
    def command(self) -> list[str]:
        """The module and arguments `python -m` runs."""

    def start(self) -> None:
        with self.log_path.open("ab") as log:  # the child holds its own copy of the descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", *self.command()],
                cwd=ROOT,
                env=settings_env(self.settings),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def kill(self) -> None:
        """SIGKILL the whole process group: no warm shutdown, no message restored."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


class ApiServer(ServiceProcess):
    """`uvicorn app.main:app` on a real socket. Not a thread of the test process: the API
    draws matplotlib figures and writes Parquet in its threads, and the test process also
    loads torch; in one process that mix crashed the interpreter's garbage collector twice
    (docs/DEVELOPING.md)."""

    def __init__(self, settings: Settings, port: int, log_path: Path) -> None:
        super().__init__(settings, log_path)
        self.port = port

    def command(self) -> list[str]:
        return ["uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(self.port),
                "--log-level", "warning", "--no-access-log"]  # fmt: skip

    def start(self) -> None:
        super().start()
        wait_for(self.serving, timeout=60, what=f"uvicorn start (log: {self.log_path})")

    def serving(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"the API exited with {self.proc.returncode}:\n{self.log()}")
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False


class Worker(ServiceProcess):
    """A Celery worker on both queues, one task at a time."""

    def __init__(self, settings: Settings, log_path: Path, name: str) -> None:
        super().__init__(settings, log_path)
        self.name = name
        self.log_offset = 0

    def start(self) -> None:
        self.log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        super().start()

    def log_since_start(self) -> str:
        """What this worker process wrote (the log file holds every earlier start's too)."""
        with self.log_path.open("rb") as log:
            log.seek(self.log_offset)
            return log.read().decode(errors="replace")

    def wait_ready(self, timeout: float = 60) -> None:
        """Until the started worker consumes its queues (Celery logs "ready.")."""

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"the worker exited with {self.proc.returncode}")
            return " ready." in self.log_since_start()

        wait_for(ready, timeout=timeout, what=f"worker ready (log: {self.log_path})")

    def command(self) -> list[str]:
        return ["celery", "-A", "workers.celery_app", "worker", "-Q", "gpu,train", "--pool",
                "solo", "--concurrency", "1", "-n", f"{self.name}-{uuid.uuid4().hex[:6]}@%h",
                "--loglevel", "INFO"]  # fmt: skip


@dataclass
class Stack:
    name: str
    settings: Settings
    api: ApiServer
    worker: Worker
    base_url: str
    store: Any
    owners: list[str] = field(default_factory=list)

    def session(self) -> Any:
        return session_scope(self.settings.database_url)

    def new_key(self, name: str = "tester") -> str:
        with self.session() as session:
            row, raw = create_key(session=session, name=name)
            self.owners.append(row.id)
        return raw

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=30)

    def wait_job(
        self,
        client: httpx.Client,
        job_id: str,
        *,
        statuses: tuple[str, ...] = ("succeeded",),
        timeout: float = 120,
    ) -> dict[str, Any]:
        terminal = ("succeeded", "failed", "canceled")

        seen: dict[str, Any] = {}

        def poll() -> dict[str, Any] | None:
            body = seen["job"] = client.get(f"/jobs/{job_id}").json()
            return body if body["status"] in terminal or body["status"] in statuses else None

        try:
            body = wait_for(poll, timeout=timeout, interval=0.2, what=f"job {job_id}")
        except AssertionError as timeout_error:  # say what the job and the worker were doing
            raise AssertionError(
                f"{timeout_error}\njob: {seen.get('job')}\nworker alive: "
                f"{self.worker.proc is not None and self.worker.proc.poll() is None}\n"
                f"worker log (end):\n{self.worker.log()[-3000:]}"
            ) from None
        assert body["status"] in statuses, (body, self.worker.log()[-3000:])
        return body

    def cancel_leftovers(self) -> None:
        """End this test's active jobs so they do not keep the shared worker busy."""
        if not self.owners:
            return
        with self.session() as session:
            session.execute(
                update(Job)
                .where(Job.owner_id.in_(self.owners), Job.status.in_(("queued", "running")))
                .values(status="canceled")
            )
        self.owners.clear()


def _make_stack(name: str, settings: Settings, tmp: Path) -> Iterator[Stack]:
    upgrade_database(settings)
    from app.storage import make_store

    port = int(settings.public_base_url.rsplit(":", 1)[1])
    api = ApiServer(settings, port, tmp / f"api-{name}.log")
    api.start()
    worker = Worker(settings, tmp / f"worker-{name}.log", name)
    worker.start()
    stack = Stack(name, settings, api, worker, settings.public_base_url, make_store(settings))
    try:
        yield stack
    finally:
        worker.stop()
        api.stop()
        session_factory.cache_clear()


@pytest.fixture(scope="session")
def deployed_stack(
    pg_url: str,
    redis_url: str,
    s3_endpoint: str,
    models_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("deployed")
    port = free_port()
    settings = Settings(
        data_dir=tmp,
        database_url=pg_url,
        broker_url=redis_url,
        storage_backend="s3",
        s3_endpoint_url=s3_endpoint,
        s3_bucket=f"synthderm-{uuid.uuid4().hex[:8]}",
        s3_access_key_id="testing",
        s3_secret_access_key="testing",
        models_dir=models_dir,
        public_base_url=f"http://127.0.0.1:{port}",
        signing_secret="test-secret",
        **FAST,
    )
    yield from _make_stack("deployed", settings, tmp)


@pytest.fixture(scope="session")
def embedded_stack(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("embedded")
    port = free_port()
    settings = Settings(
        data_dir=tmp,
        models_dir=models_dir,
        public_base_url=f"http://127.0.0.1:{port}",
        **FAST,
    )
    yield from _make_stack("embedded", settings, tmp)


def _in_use(stack: Stack) -> Iterator[Stack]:
    """A stack with a live worker; the test's leftover active jobs are canceled after it."""
    if stack.worker.proc is None or stack.worker.proc.poll() is not None:
        stack.worker.start()
    yield stack
    stack.cancel_leftovers()


@pytest.fixture(params=["deployed", "embedded"])
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    """Each test that takes `stack` runs on both stacks."""
    yield from _in_use(request.getfixturevalue(f"{request.param}_stack"))


@pytest.fixture
def deployed(deployed_stack: Stack) -> Iterator[Stack]:
    yield from _in_use(deployed_stack)


@pytest.fixture
def embedded(embedded_stack: Stack) -> Iterator[Stack]:
    yield from _in_use(embedded_stack)


def count_rows(stack: Stack, sql: str, **params: Any) -> int:
    with stack.session() as session:
        return int(session.execute(text(sql), params).scalar_one())
