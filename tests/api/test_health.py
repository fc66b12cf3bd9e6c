"""/healthz, /readyz and /metrics on both stacks."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from app.db.tables import Job, JobChunk
from app.main import create_app
from tests.conftest import Stack, wait_for
from tests.helpers import submit

CLOSED_BROKER = "redis://127.0.0.1:1/0"


def scrape(stack: Stack, key: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics as {(name, sorted labels): value}."""
    response = stack.client(key).get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def quiet(stack: Stack) -> None:
    """Wait until no job is active and no chunk of an earlier test may still write images
    (a canceled job's running chunk stops at its next batch; a dead one's heartbeat ages)."""

    def settled() -> bool:
        stale = datetime.now(UTC) - timedelta(seconds=stack.settings.stale_after_s)
        with stack.session() as session:
            active = session.scalar(
                select(Job.id).where(Job.status.in_(("queued", "running"))).limit(1)
            )
            beats = session.scalars(
                select(JobChunk.heartbeat_at).where(JobChunk.status == "running")
            ).all()
        return active is None and all(b is None or b < stale for b in beats)

    wait_for(settled, timeout=60, what="earlier tests' chunks to stop")


def test_healthz_needs_no_key(stack: Stack) -> None:
    response = stack.client().get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_reports_each_dependency(stack: Stack) -> None:
    response = stack.client().get("/readyz")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["ok"] is True
    assert set(body["checks"]) == {"database", "broker", "store"}
    for name, check in body["checks"].items():
        assert check["ok"] is True, (name, check)
        assert check["detail"], name


def test_metrics_text_format(stack: Stack) -> None:
    key = stack.new_key()
    text = stack.client(key).get("/metrics").text
    assert 'synthderm_jobs{kind="generate",status="succeeded"}' in text
    assert "synthderm_images_generated_total" in text
    assert 'synthderm_task_duration_seconds_bucket{kind="experiment"' in text
    samples = scrape(stack, key)
    pairs = {
        (dict(labels)["kind"], dict(labels)["status"])
        for name, labels in samples
        if name == "synthderm_jobs"
    }
    statuses = {"queued", "running", "succeeded", "failed", "canceled"}
    kinds = {"generate", "ingest", "export", "experiment"}
    assert pairs == {(k, s) for k in kinds for s in statuses}
    for kind in kinds:
        buckets = sorted(
            (float(dict(labels)["le"]), value)
            for (name, labels), value in samples.items()
            if name == "synthderm_task_duration_seconds_bucket" and dict(labels)["kind"] == kind
        )
        assert buckets[-1][0] == float("inf")
        assert [v for _, v in buckets] == sorted(v for _, v in buckets)  # cumulative
        count = samples[("synthderm_task_duration_seconds_count", (("kind", kind),))]
        assert buckets[-1][1] == count


def test_metrics_count_each_job_kind_apart(stack: Stack) -> None:
    """A generation job and an export of its images: each is counted under its own kind (the
    figures were once all called "generation")."""
    key = stack.new_key()
    client = stack.client(key)
    quiet(stack)
    before = scrape(stack, key)
    job = stack.wait_job(client, submit(client, count=3)["id"])
    response = client.post(f"/datasets/{job['dataset_id']}/exports", json={})
    assert response.status_code == 202, response.text
    export = stack.wait_job(client, response.json()["id"])
    assert export["status"] == "succeeded", export
    after = scrape(stack, key)

    def delta(name: str, **labels: str) -> float:
        sample = (name, tuple(sorted(labels.items())))
        return after[sample] - before.get(sample, 0.0)

    assert delta("synthderm_images_generated_total") == 3
    assert delta("synthderm_jobs", kind="generate", status="succeeded") == 1
    assert delta("synthderm_jobs", kind="export", status="succeeded") == 1
    duration = "synthderm_task_duration_seconds"
    assert delta(f"{duration}_count", kind="generate") == job["chunks"] == 1
    assert delta(f"{duration}_sum", kind="generate") > 0
    assert delta(f"{duration}_bucket", kind="generate", le="+Inf") == 1
    assert delta(f"{duration}_count", kind="export") == 1
    assert delta(f"{duration}_count", kind="experiment") == 0


def test_readyz_fails_when_the_broker_is_down(stack: Stack) -> None:
    settings = stack.settings.model_copy(update={"broker_url": CLOSED_BROKER})
    with TestClient(create_app(settings)) as client:
        response = client.get("/readyz")
    assert response.status_code == 503, response.text
    body = response.json()
    assert body["ok"] is False
    assert body["checks"]["broker"]["ok"] is False
    assert body["checks"]["broker"]["detail"]
    assert body["checks"]["database"]["ok"] is True
    assert body["checks"]["store"]["ok"] is True
    # liveness does not depend on the broker
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").status_code == 200


def test_readyz_fails_on_an_unmigrated_database(embedded: Stack, tmp_path: Path) -> None:
    database = f"sqlite:///{(tmp_path / 'empty.sqlite').as_posix()}"
    settings = embedded.settings.model_copy(update={"database_url": database})
    with TestClient(create_app(settings)) as client:
        response = client.get("/readyz")
    assert response.status_code == 503, response.text
    checks = response.json()["checks"]
    assert checks["database"]["ok"] is False
    assert "alembic_version" in checks["database"]["detail"]
    assert checks["broker"]["ok"] is True
