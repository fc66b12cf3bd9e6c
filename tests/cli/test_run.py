"""`synthderm run` (what `make run` starts): the embedded default end to end, then Ctrl-C.

A fresh data folder, no servers: it builds tiny-random, migrates, serves the API and a worker;
a job runs through; SIGINT stops every child and leaves no orphan. A killed worker is
restarted while the API stays up; a worker that keeps crashing stops everything.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from app.cli.serve import Supervisor
from app.config import Settings
from tests.conftest import FAST, ROOT, free_port, settings_env, wait_for

SYNTHDERM = [sys.executable, "-m", "app.cli"]


def start_run(
    tmp_path: Path, *args: str, **fields: object
) -> tuple[subprocess.Popen[bytes], str, dict[str, str]]:
    """`synthderm run ARGS` on a fresh data folder and a free port, its output in
    tmp_path/run.log; the process, the API's base URL and the environment it was given."""
    port = free_port()
    settings = Settings(
        data_dir=tmp_path / "var",
        api_port=port,
        public_base_url=f"http://127.0.0.1:{port}",
        **fields,  # type: ignore[arg-type]
    )
    env = settings_env(settings)
    with (tmp_path / "run.log").open("wb") as log:  # the child holds its own copy
        proc = subprocess.Popen(
            [*SYNTHDERM, "run", *args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    return proc, f"http://127.0.0.1:{port}", env


def wait_ready(base: str) -> None:
    """Until the run's API says every dependency is ready."""

    def ready() -> bool:
        try:
            return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, timeout=120, interval=0.5, what="readyz")


@pytest.mark.slow
def test_run_serves_embedded_default_and_stops_cleanly(tmp_path: Path) -> None:
    # the embedded default's own generator (issue 24), not the tests' tiny-random
    settings = {k: v for k, v in FAST.items() if not k.startswith("default_") or "steps" in k}
    proc, base, env = start_run(tmp_path, **{**settings, "shutdown_grace_s": 15.0})
    try:
        wait_ready(base)
        assert (tmp_path / "var" / "models" / "tiny-random" / "model_index.json").is_file()
        assert (tmp_path / "var" / "synthderm.sqlite").is_file()
        key = subprocess.run(
            [*SYNTHDERM, "keys", "create", "--name", "alice"],
            cwd=ROOT, env=env, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        models = {row["id"]: row for row in client.get("/models").json()["items"]}
        assert {"tiny-random", "synthderm-fitz64", "synthderm-fitz64-inpaint"} <= set(models)
        assert "Fitzpatrick17k" in models["synthderm-fitz64"]["description"]
        # a webhook to localhost: the embedded default allows loopback, and `run` starts the
        # worker of the webhooks queue
        hook_url, received = webhook_receiver()
        job = client.post(
            "/jobs",
            json={
                "condition": "psoriasis",
                "skin_tone": 6,
                "count": 5,
                "webhook": hook_url,
                "webhook_events": ["completed"],
            },
        )
        assert job.status_code == 202, job.text

        def finished() -> dict | None:
            body = client.get(f"/jobs/{job.json()['id']}").json()
            return body if body["status"] in ("succeeded", "failed") else None

        final = wait_for(finished, timeout=120, interval=0.5, what="the job")
        assert final["status"] == "succeeded", final
        assert final["model"] == "synthderm-fitz64"
        manifest = client.get(f"/datasets/{final['dataset_id']}/manifest").text.splitlines()
        assert len(manifest) == 5
        for line in manifest:
            row = json.loads(line)
            assert hashlib.sha256(httpx.get(row["url"]).content).hexdigest() == row["sha256"]
        objects = list(
            (tmp_path / "var" / "objects" / "datasets" / final["dataset_id"]).rglob("*.png")
        )
        assert len(objects) == 5
        wait_for(lambda: received, timeout=60, interval=0.5, what="the webhook")
        assert json.loads(received[0])["data"]["status"] == "succeeded"
        assert len(workers_of(proc, "webhooks")) == 1

        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 2  # the API and the worker
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        code = proc.wait(timeout=60)
    output = (tmp_path / "run.log").read_text()
    assert code == 0, output[-3000:]
    # the first start says what it does, without bars, plugin chatter or torchvision advice
    assert "Running upgrade" in output and "database at head" in output
    for noise in ("setup plugin", "Writing model shards", "torchvision"):
        assert noise not in output, noise
    alive = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert alive == [], f"orphans left: {alive}"


def test_children_stop_when_the_runner_is_killed(tmp_path: Path) -> None:
    """Even a SIGKILLed `synthderm run` leaves no API or worker (nor the webhooks worker)
    behind."""
    port = free_port()
    settings = Settings(
        data_dir=tmp_path / "var", api_port=port, public_base_url=f"http://127.0.0.1:{port}"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "run", "--no-build-tiny"],
        cwd=ROOT, env=settings_env(settings),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(
            lambda: len(psutil.Process(proc.pid).children(recursive=True)) >= 3,
            timeout=60,
            what="the API and the two workers",
        )
        children = psutil.Process(proc.pid).children(recursive=True)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert alive == [], f"orphans left: {alive}"
    assert gone


def one_line(text: str) -> str:
    """The log with rich's line wrapping undone."""
    return " ".join(text.split())


def webhook_receiver() -> tuple[str, list[bytes]]:
    """A receiver on 127.0.0.1 (a daemon thread, gone with the test process) that answers 204
    and keeps the bodies."""
    received: list[bytes] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append(self.rfile.read(int(self.headers["content-length"])))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *_args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/hook", received


def workers_of(proc: subprocess.Popen[bytes], queues: str = "gpu,train") -> list[psutil.Process]:
    """The run's Celery worker processes of `queues` (the job worker by default; `webhooks`:
    the webhook deliveries' worker)."""
    found = []
    for child in psutil.Process(proc.pid).children():
        with contextlib.suppress(psutil.Error):
            command = child.cmdline()
            if "celery" in command and queues in command and child.status() != psutil.STATUS_ZOMBIE:
                found.append(child)
    return found


@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_the_api_stays_up(
    tmp_path: Path, models_dir: Path
) -> None:
    proc, base, env = start_run(tmp_path, "--no-build-tiny", models_dir=models_dir, **FAST)
    log_path = tmp_path / "run.log"
    health_failures: list[str] = []
    watching = threading.Event()
    done = threading.Event()

    def watch_health() -> None:  # /healthz, every 0.2 s, from the kill until the job ends
        watching.wait()
        while not done.is_set():
            try:
                status = httpx.get(f"{base}/healthz", timeout=5).status_code
                if status != 200:
                    health_failures.append(f"{status} at {time.monotonic():.1f}")
            except httpx.HTTPError as error:
                health_failures.append(f"{error!r} at {time.monotonic():.1f}")
            time.sleep(0.2)

    watcher = threading.Thread(target=watch_health, daemon=True)
    watcher.start()
    try:
        wait_ready(base)
        (worker,) = wait_for(lambda: workers_of(proc), timeout=60, what="the worker")
        wait_for(
            lambda: " ready." in log_path.read_text(errors="replace"),
            timeout=120,
            what="the first worker ready",
        )
        watching.set()
        os.killpg(worker.pid, signal.SIGKILL)  # the OOM killer, say

        def restarted() -> list[psutil.Process]:
            return [w for w in workers_of(proc) if w.pid != worker.pid]

        (again,) = wait_for(restarted, timeout=60, what="a new worker")
        output = one_line(log_path.read_text(errors="replace"))
        assert f"worker (pid {worker.pid}) exited with -9; restarting worker in 1s" in output
        assert f"started worker (pid {again.pid})" in output
        assert proc.poll() is None, output[-3000:]

        key = subprocess.run(
            [*SYNTHDERM, "keys", "create", "--name", "alice"],
            cwd=ROOT, env=env, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        job = client.post("/jobs", json={"condition": "psoriasis", "skin_tone": 2, "count": 3})
        assert job.status_code == 202, job.text

        def finished() -> dict | None:
            body = client.get(f"/jobs/{job.json()['id']}").json()
            return body if body["status"] in ("succeeded", "failed") else None

        final = wait_for(finished, timeout=120, interval=0.5, what="the job")
        assert final["status"] == "succeeded", final
        assert final["model"] == FAST["default_model"]  # the fast settings' tiny-random
        done.set()
        watcher.join(timeout=10)
        assert health_failures == [], health_failures
        assert proc.poll() is None
        children = psutil.Process(proc.pid).children(recursive=True)
    finally:
        done.set()
        watching.set()
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        code = proc.wait(timeout=60)
    output = log_path.read_text(errors="replace")
    assert code == 0, output[-3000:]
    _, alive = psutil.wait_procs(children, timeout=30)
    assert alive == [], f"orphans left: {alive}"


def test_a_worker_that_keeps_crashing_stops_everything(capsys: pytest.CaptureFixture[str]) -> None:
    """After max_crashes within the window: said loudly, the API stopped too, non-zero."""
    supervisor = Supervisor(grace_s=5, backoff_s=0.05, max_backoff_s=0.2, max_crashes=4)
    supervisor.start("api", [sys.executable, "-c", "import time; time.sleep(120)"])
    supervisor.start("worker", [sys.executable, "-c", "raise SystemExit(3)"], restart=True)
    started = time.monotonic()
    code = supervisor.wait()
    assert code == 1
    assert time.monotonic() - started < 30
    assert supervisor.children["api"].poll() is not None  # stopped with it
    output = one_line(capsys.readouterr().err)
    assert output.count("exited with 3; restarting worker in") == 3
    for delay in ("0.05s", "0.1s", "0.2s"):  # doubling, capped
        assert f"restarting worker in {delay}" in output
    assert "GIVING UP on worker: it exited with 3, crash 4 within 10 min (limit 4)" in output
    assert "stopping everything" in output


def test_the_api_dying_stops_everything(capsys: pytest.CaptureFixture[str]) -> None:
    supervisor = Supervisor(grace_s=5)
    supervisor.start("worker", [sys.executable, "-c", "import time; time.sleep(120)"], restart=True)
    supervisor.start("api", [sys.executable, "-c", "raise SystemExit(4)"])
    assert supervisor.wait() == 4
    assert supervisor.children["worker"].poll() is not None
    assert "api exited with 4; stopping the rest" in one_line(capsys.readouterr().err)
