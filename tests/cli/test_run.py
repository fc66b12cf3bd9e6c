"""`synthderm run` (what `make run` starts): the embedded default end to end, then Ctrl-C.

A fresh data folder, no servers: it builds tiny-random, migrates, serves the API and a worker;
a job runs through; SIGINT stops every child and leaves no orphan.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest

from app.config import Settings
from tests.conftest import FAST, ROOT, free_port, settings_env, wait_for


@pytest.mark.slow
def test_run_serves_embedded_default_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    settings = Settings(
        data_dir=tmp_path / "var",
        api_port=port,
        public_base_url=f"http://127.0.0.1:{port}",
        **{**FAST, "shutdown_grace_s": 15.0},
    )
    env = settings_env(settings)
    synthderm = [sys.executable, "-m", "app.cli"]
    log = (tmp_path / "run.log").open("wb")
    proc = subprocess.Popen(
        [*synthderm, "run"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            try:
                return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, timeout=120, interval=0.5, what="readyz")
        assert (tmp_path / "var" / "models" / "tiny-random" / "model_index.json").is_file()
        assert (tmp_path / "var" / "synthderm.sqlite").is_file()
        key = subprocess.run(
            [*synthderm, "keys", "create", "--name", "alice"],
            cwd=ROOT, env=env, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert client.get("/models").json()["items"][0]["id"] == "tiny-random"
        job = client.post("/jobs", json={"condition": "psoriasis", "skin_tone": 6, "count": 5})
        assert job.status_code == 202, job.text

        def finished() -> dict | None:
            body = client.get(f"/jobs/{job.json()['id']}").json()
            return body if body["status"] in ("succeeded", "failed") else None

        final = wait_for(finished, timeout=120, interval=0.5, what="the job")
        assert final["status"] == "succeeded", final
        manifest = client.get(f"/datasets/{final['dataset_id']}/manifest").text.splitlines()
        assert len(manifest) == 5
        for line in manifest:
            row = json.loads(line)
            assert hashlib.sha256(httpx.get(row["url"]).content).hexdigest() == row["sha256"]
        objects = list(
            (tmp_path / "var" / "objects" / "datasets" / final["dataset_id"]).rglob("*.png")
        )
        assert len(objects) == 5

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
    """Even a SIGKILLed `synthderm run` leaves no API or worker behind."""
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
            lambda: len(psutil.Process(proc.pid).children(recursive=True)) >= 2,
            timeout=60,
            what="the API and the worker",
        )
        children = psutil.Process(proc.pid).children(recursive=True)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert alive == [], f"orphans left: {alive}"
    assert gone
