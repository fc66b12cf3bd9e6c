"""The database is the source of truth: lost messages and killed workers do not lose images.

- a worker SIGKILLed in the middle of a chunk, then restarted: exactly `count` images;
- Redis flushed while a job is queued: the recovery step re-dispatches it;
- the broker down while the API dispatches: the job is sent later;
- a chunk that runs twice: the same keys and rows, never a duplicate.
"""

from __future__ import annotations

import hashlib
import json

import redis
from sqlalchemy import text

from app.broker import send_chunk
from tests.conftest import Stack, count_rows, wait_for
from tests.helpers import submit


def images_of(stack: Stack, job_id: str) -> int:
    return count_rows(stack, "SELECT count(*) FROM images WHERE job_id = :j", j=job_id)


def assert_exact(stack: Stack, client, job: dict, count: int) -> None:
    """Exactly `count` rows, objects and manifest lines, each object matching its sha256."""
    assert images_of(stack, job["id"]) == count
    rows = [
        json.loads(line)
        for line in client.get(f"/datasets/{job['dataset_id']}/manifest").text.splitlines()
    ]
    assert len(rows) == count
    indices = count_rows(
        stack, 'SELECT count(DISTINCT "index") FROM images WHERE job_id = :j', j=job["id"]
    )
    assert indices == count
    keys = list(stack.store.iter_keys(f"datasets/{job['dataset_id']}/"))
    assert sorted(keys) == sorted(r["storage_key"] for r in rows)
    for row in rows:
        data = stack.store.get_bytes(row["storage_key"])
        assert hashlib.sha256(data).hexdigest() == row["sha256"]


def test_worker_killed_mid_chunk_job_still_finishes_exactly(stack: Stack) -> None:
    client = stack.client(stack.new_key())
    job = submit(client, count=24, num_inference_steps=30, seed=4242)

    # kill the worker once a chunk has written some of its images but not all
    def mid_chunk() -> bool:
        return (
            count_rows(
                stack,
                "SELECT count(*) FROM job_chunks"
                " WHERE job_id = :j AND status = 'running' AND done > 0",
                j=job["id"],
            )
            > 0
        )

    wait_for(mid_chunk, timeout=90, interval=0.02, what="a chunk half done")
    stack.worker.kill()
    written = images_of(stack, job["id"])
    assert 0 < written < 24
    running = "SELECT count(*) FROM job_chunks WHERE job_id = :j AND status = 'running'"
    assert count_rows(stack, running, j=job["id"]) == 1  # left behind by the dead worker
    assert client.get(f"/jobs/{job['id']}").json()["status"] == "running"

    stack.worker.start()
    done = stack.wait_job(client, job["id"], timeout=180)
    assert done["progress"] == {"done": 24, "total": 24, "running": []}
    assert_exact(stack, client, job, 24)
    # the killed chunk was taken again by the recovery step
    attempts = count_rows(
        stack, "SELECT max(attempts) FROM job_chunks WHERE job_id = :j", j=job["id"]
    )
    assert attempts >= 2
    assert "re-dispatched" in stack.worker.log()

    # the interrupted job made the same bytes as an uninterrupted one with its seed
    twin = stack.wait_job(
        client, submit(client, count=24, num_inference_steps=30, seed=4242)["id"], timeout=180
    )
    query = 'SELECT sha256 FROM images WHERE job_id = :j ORDER BY "index"'
    with stack.session() as session:
        first = session.execute(text(query), {"j": job["id"]}).scalars().all()
        second = session.execute(text(query), {"j": twin["id"]}).scalars().all()
    assert first == second


def test_redis_flushed_while_queued(deployed: Stack) -> None:
    client = deployed.client(deployed.new_key())
    deployed.worker.stop()
    try:
        job = submit(client, count=12)
        wait_for(
            lambda: (
                count_rows(
                    deployed,
                    "SELECT count(*) FROM job_chunks"
                    " WHERE job_id = :j AND dispatched_at IS NOT NULL",
                    j=job["id"],
                )
                == 2
            ),
            timeout=20,
            what="dispatch",
        )
        broker = redis.Redis.from_url(deployed.settings.broker_url)
        assert broker.llen("gpu") >= 2
        broker.flushdb()  # Redis restarted empty: the messages are gone
        broker.set("synthderm:test-run-lock", "held", ex=3600)  # keep this run's db index
        assert broker.llen("gpu") == 0
    finally:
        deployed.worker.start()
    done = deployed.wait_job(client, job["id"], timeout=120)
    assert done["progress"]["done"] == 12
    assert_exact(deployed, client, job, 12)


def test_broker_down_at_submit_is_dispatched_later(deployed: Stack) -> None:
    """The job is committed even when the broker refuses; recovery sends it later."""
    from app.main import create_app

    client = deployed.client(deployed.new_key())
    broken = deployed.settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    from fastapi.testclient import TestClient

    with TestClient(create_app(broken)) as local:
        local.headers.update(client.headers)
        response = local.post("/jobs", json={"condition": "psoriasis", "count": 5})
    assert response.status_code == 202
    job = response.json()
    never = "SELECT count(*) FROM job_chunks WHERE job_id = :j AND dispatched_at IS NULL"
    assert count_rows(deployed, never, j=job["id"]) == 1
    done = deployed.wait_job(client, job["id"], timeout=60)
    assert done["progress"]["done"] == 5


def test_chunk_run_twice_never_duplicates(stack: Stack) -> None:
    client = stack.client(stack.new_key())
    job = submit(client, count=8, seed=99)
    stack.wait_job(client, job["id"])
    with stack.session() as session:
        before = dict(
            session.execute(
                text("SELECT id, sha256 FROM images WHERE job_id = :j"), {"j": job["id"]}
            ).all()
        )
        key = session.execute(
            text('SELECT storage_key FROM images WHERE job_id = :j AND "index" = 3'),
            {"j": job["id"]},
        ).scalar_one()
    assert len(before) == 8

    # the object of image 3 vanished, and the chunk's message is delivered again
    stack.store.delete(key)
    with stack.session() as session:
        session.execute(
            text("UPDATE job_chunks SET status = 'pending' WHERE job_id = :j"),
            {"j": job["id"]},
        )
        session.execute(text("UPDATE jobs SET status = 'running' WHERE id = :j"), {"j": job["id"]})
    send_chunk(stack.settings, kind="generate", job_id=job["id"], chunk_index=0)
    send_chunk(stack.settings, kind="generate", job_id=job["id"], chunk_index=0)  # and twice

    stack.wait_job(client, job["id"])
    wait_for(lambda: stack.store.head(key) is not None, timeout=30, what="image 3 rewritten")
    with stack.session() as session:
        after = dict(
            session.execute(
                text("SELECT id, sha256 FROM images WHERE job_id = :j"), {"j": job["id"]}
            ).all()
        )
    assert after == before  # same ids, same bytes (the seed is per image)
    assert_exact(stack, client, job, 8)


def test_train_worker_killed_mid_run_finishes_the_experiment(deployed: Stack) -> None:
    """A training worker SIGKILLed in the middle of a run (out of memory, a preempted node):
    the run is left `running`, and once a worker is back the recovery step trains it again
    from its first epoch; the experiment finishes with every run, each history whole."""
    from tests.factories import make_classification_data

    key = deployed.new_key()
    real, _synthetic = make_classification_data(
        deployed, key, pool_per_class=12, test_per_class=4, children_per_parent=0
    )
    client = deployed.client(key)
    body = {"dataset": real, "n_real_per_class": [4], "seeds": [1, 2], "image_size": 64,
            "validation_per_class": 4, "cache_features": False, "max_epochs": 12,
            "patience": 12}  # fmt: skip
    response = client.post("/experiments", json=body)
    assert response.status_code == 202, response.text
    experiment = response.json()

    def mid_run() -> dict | None:
        runs = client.get(f"/experiments/{experiment['id']}").json()["runs"]
        return next((r for r in runs if r["progress"]["epoch"] >= 2), None)

    killed = wait_for(mid_run, timeout=120, interval=0.05, what="a run at its second epoch")
    deployed.worker.kill()
    run = client.get(f"/runs/{killed['id']}").json()
    assert run["status"] == "running" and run["metrics"] is None  # left by the dead worker

    deployed.worker.start()

    def finished() -> dict | None:
        body = client.get(f"/experiments/{experiment['id']}").json()
        return body if body["status"] in ("succeeded", "failed", "canceled") else None

    done = wait_for(finished, timeout=240, interval=0.5, what="the experiment after the kill")
    assert done["status"] == "succeeded", (done.get("error"), deployed.worker.log()[-3000:])
    assert done["progress"]["done"] == 2
    for run in done["runs"]:
        assert run["status"] == "succeeded" and run["metrics"]["top1"]["value"] is not None
        # trained again from epoch 1: no epoch twice, none missing, all 12 (patience 12)
        assert [h["epoch"] for h in run["history"]] == list(range(1, 13)), run["history"]
    attempts = count_rows(
        deployed, "SELECT max(attempts) FROM job_chunks WHERE job_id = :j", j=experiment["id"]
    )
    assert attempts >= 2
    assert "re-dispatched" in deployed.worker.log()
