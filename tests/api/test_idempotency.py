"""Idempotency keys (issue 21): a key is scoped to (owner, kind); the same request with it
returns what it made (200), another request with it is a 409; concurrent requests with one
new key all get the one job the winner made."""

from __future__ import annotations

import threading
import uuid

import httpx
import pytest

from tests.conftest import Stack, count_rows
from tests.factories import make_classification_data
from tests.helpers import assert_problem

JOB = {"condition": "psoriasis", "count": 1}
TRAINING = {"image_size": 64, "max_epochs": 1, "validation_per_class": 2, "seeds": [1]}


def new_key() -> str:
    return f"K-{uuid.uuid4().hex}"


def jobs_with(stack: Stack, key: str) -> int:
    return count_rows(stack, "SELECT count(*) FROM jobs WHERE idempotency_key = :k", k=key)


def datasets_of(stack: Stack, key: str) -> int:
    return count_rows(
        stack,
        "SELECT count(*) FROM datasets WHERE owner_id = "
        "(SELECT MIN(owner_id) FROM jobs WHERE idempotency_key = :k)",
        k=key,
    )


@pytest.fixture
def real_dataset(stack: Stack) -> tuple[Stack, str, str]:
    """A stack, a new API key and a small real dataset it owns (enough for an experiment)."""
    raw = stack.new_key()
    real, _synthetic = make_classification_data(
        stack, raw, pool_per_class=6, test_per_class=2, children_per_parent=0
    )
    return stack, raw, real


def cancel(client: httpx.Client, path: str) -> None:
    assert client.post(f"{path}/cancel").status_code in (200, 409)


def test_a_key_of_a_job_is_free_for_an_experiment_and_back(real_dataset) -> None:
    stack, raw, real = real_dataset
    client = stack.client(raw)
    key = new_key()
    job = client.post("/jobs", json={**JOB, "idempotency_key": key})
    assert job.status_code == 202, job.text

    experiment = client.post(
        "/experiments", json={"dataset": real, **TRAINING, "idempotency_key": key}
    )
    assert experiment.status_code == 202, experiment.text
    assert experiment.json()["id"] != job.json()["id"]
    # and each kind still answers its own resource
    again = client.post("/jobs", json={**JOB, "idempotency_key": key})
    assert again.status_code == 200, again.text
    assert again.json()["id"] == job.json()["id"]
    assert again.json()["kind"] == "generate"
    assert jobs_with(stack, key) == 2
    cancel(client, f"/experiments/{experiment.json()['id']}")


def test_a_key_of_a_run_is_free_for_a_job(real_dataset) -> None:
    stack, raw, real = real_dataset
    client = stack.client(raw)
    key = new_key()
    run_body = {"dataset": real, "image_size": 64, "max_epochs": 1, "validation_per_class": 2}
    run = client.post("/runs", json={**run_body, "seed": 1, "idempotency_key": key})
    assert run.status_code == 202, run.text

    job = client.post("/jobs", json={**JOB, "idempotency_key": key})
    assert job.status_code == 202, job.text
    assert job.json()["id"] != run.json()["experiment_id"]
    assert job.json()["kind"] == "generate"
    # /runs and /experiments are one kind: the key names the run's request there
    experiment = client.post(
        "/experiments", json={"dataset": real, **TRAINING, "idempotency_key": key}
    )
    assert_problem(experiment, 409, field="idempotency_key")
    assert jobs_with(stack, key) == 2
    cancel(client, f"/experiments/{run.json()['experiment_id']}")


def test_the_same_request_is_answered_again_and_another_is_a_conflict(stack: Stack) -> None:
    client = stack.client(stack.new_key())
    key = new_key()
    first = client.post("/jobs", json={**JOB, "idempotency_key": key})
    assert first.status_code == 202, first.text
    datasets = datasets_of(stack, key)
    same = client.post("/jobs", json={**JOB, "idempotency_key": key})
    assert same.status_code == 200, same.text
    assert same.json()["id"] == first.json()["id"]
    assert same.headers["location"] == f"/jobs/{first.json()['id']}"

    other = client.post("/jobs", json={**JOB, "count": 2, "idempotency_key": key})
    problem = assert_problem(other, 409, field="idempotency_key")
    assert "different request" in problem["detail"], problem
    # nothing new: no job, no dataset
    assert jobs_with(stack, key) == 1
    assert datasets_of(stack, key) == datasets
    owner_jobs = "SELECT count(*) FROM jobs WHERE owner_id = (SELECT owner_id FROM jobs WHERE "
    assert count_rows(stack, owner_jobs + "idempotency_key = :k)", k=key) == 1


def test_another_experiment_with_a_used_key_is_a_conflict(real_dataset) -> None:
    stack, raw, real = real_dataset
    client = stack.client(raw)
    key = new_key()
    body = {"dataset": real, **TRAINING, "idempotency_key": key}
    first = client.post("/experiments", json=body)
    assert first.status_code == 202, first.text
    same = client.post("/experiments", json=body)
    assert same.status_code == 200, same.text
    assert same.json()["id"] == first.json()["id"]

    other = client.post("/experiments", json={**body, "seeds": [2]})
    problem = assert_problem(other, 409, field="idempotency_key")
    assert "different request" in problem["detail"], problem
    assert jobs_with(stack, key) == 1
    assert count_rows(stack, "SELECT count(*) FROM runs WHERE job_id = :j",
                      j=first.json()["id"]) == 1  # fmt: skip
    cancel(client, f"/experiments/{first.json()['id']}")


def race(stack: Stack, raw: str, path: str, body: dict, n: int) -> list[httpx.Response]:
    """`n` threads, each with its own client, POST the same body at once."""
    barrier = threading.Barrier(n)
    answers: list[httpx.Response | BaseException] = [RuntimeError("no answer")] * n

    def post(i: int) -> None:
        with stack.client(raw) as client:
            client.get("/healthz")  # connected before the barrier
            barrier.wait()
            try:
                answers[i] = client.post(path, json=body)
            except BaseException as error:  # reported below
                answers[i] = error

    threads = [threading.Thread(target=post, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    failed = [a for a in answers if not isinstance(a, httpx.Response)]
    assert not failed, failed
    return [a for a in answers if isinstance(a, httpx.Response)]


def assert_one_winner(answers: list[httpx.Response], n: int) -> str:
    codes = sorted(a.status_code for a in answers)
    assert codes == [200] * (n - 1) + [202], [(a.status_code, a.text[:300]) for a in answers]
    ids = {a.json()["id"] for a in answers}
    assert len(ids) == 1, ids
    return ids.pop()


def test_concurrent_jobs_with_one_new_key_make_one_job(stack: Stack) -> None:
    raw = stack.new_key()
    key = new_key()
    answers = race(stack, raw, "/jobs", {**JOB, "idempotency_key": key}, 8)
    job_id = assert_one_winner(answers, 8)
    assert jobs_with(stack, key) == 1
    assert count_rows(stack, "SELECT count(*) FROM jobs WHERE id = :j", j=job_id) == 1
    # the losers' synthetic datasets were rolled back with them
    assert datasets_of(stack, key) == 1


def test_concurrent_experiments_with_one_new_key_make_one_experiment(real_dataset) -> None:
    stack, raw, real = real_dataset
    key = new_key()
    body = {"dataset": real, **TRAINING, "idempotency_key": key}
    answers = race(stack, raw, "/experiments", body, 6)
    experiment_id = assert_one_winner(answers, 6)
    assert jobs_with(stack, key) == 1
    assert count_rows(stack, "SELECT count(*) FROM runs WHERE job_id = :j", j=experiment_id) == 1
    cancel(stack.client(raw), f"/experiments/{experiment_id}")
