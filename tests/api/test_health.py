"""/healthz, /readyz and /metrics on both stacks."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from app.api.health import check_metrics_access, is_loopback
from app.broker import JOB_TASKS
from app.db.tables import Job, JobChunk
from app.errors import Forbidden, Unauthorized
from app.main import create_app
from tests.conftest import Stack, wait_for
from tests.helpers import assert_problem, submit

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
    kinds = set(JOB_TASKS)  # every job kind, the fine-tunes and evaluations included
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


# --- who may read /metrics (issue 21: operators, not every API key) ----------------------

METRICS_TOKEN = "operator-token-0123456789abcdef"


def test_metrics_with_a_token_answer_only_that_token(stack: Stack) -> None:
    """With SYNTHDERM_METRICS_TOKEN set, only that bearer token reads /metrics: no header, a
    wrong token and a valid API key are each a 401, even from loopback."""
    settings = stack.settings.model_copy(update={"metrics_token": METRICS_TOKEN})
    api_key = stack.new_key("not-an-operator")
    with TestClient(create_app(settings), client=("127.0.0.1", 50000)) as client:
        refused = {
            "no header": client.get("/metrics"),
            "wrong token": client.get("/metrics", headers={"Authorization": "Bearer nope"}),
            "api key": client.get("/metrics", headers={"Authorization": f"Bearer {api_key}"}),
            "api key header": client.get("/metrics", headers={"X-API-Key": api_key}),
            "not bearer": client.get(
                "/metrics", headers={"Authorization": f"Basic {METRICS_TOKEN}"}
            ),
        }
        for what, response in refused.items():
            body = assert_problem(response, 401)
            assert response.headers.get("www-authenticate") == "Bearer", what
            assert "metrics token" in body["detail"], (what, body)
            assert "synthderm_jobs" not in response.text, what
        ok = client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        # the API key still works where it belongs
        assert client.get("/conditions", headers={"X-API-Key": api_key}).status_code == 200
    assert ok.status_code == 200, ok.text
    assert ok.headers["content-type"].startswith("text/plain")
    names = {family.name for family in text_string_to_metric_families(ok.text)}
    assert {"synthderm_jobs", "synthderm_images_generated"} <= names


def test_metrics_without_a_token_answer_loopback_only(stack: Stack) -> None:
    """Unset, /metrics answers a client on loopback (the real API over a socket from this
    host: no key needed) and refuses any other address, or a request through a proxy, with a
    403."""
    response = stack.client().get("/metrics")  # 127.0.0.1, no API key
    assert response.status_code == 200, response.text
    assert "synthderm_jobs" in response.text
    assert stack.settings.metrics_token == ""
    app = create_app(stack.settings)
    api_key = stack.new_key()
    for address in ("203.0.113.7", "10.0.0.2", "::ffff:192.0.2.1", "testclient"):
        with TestClient(app, client=(address, 50000)) as client:
            refused = client.get("/metrics", headers={"Authorization": f"Bearer {api_key}"})
        body = assert_problem(refused, 403)
        assert "SYNTHDERM_METRICS_TOKEN" in body["detail"], address
        assert "synthderm_jobs" not in refused.text
    with TestClient(app, client=("127.0.0.1", 50000)) as client:
        assert client.get("/metrics").status_code == 200
        proxied = client.get("/metrics", headers={"X-Forwarded-For": "203.0.113.7"})
        assert_problem(proxied, 403)
    with TestClient(app, client=("::1", 50000)) as client:
        assert client.get("/metrics").status_code == 200


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("10.0.0.1", False),
        ("192.168.1.5", False),
        ("::ffff:10.0.0.1", False),
        ("2001:db8::1", False),
        ("localhost", False),  # a name is not an address: refused
        ("", False),
        (None, False),  # a Unix socket gives no address
    ],
)
def test_loopback_rule(host: str | None, loopback: bool) -> None:
    assert is_loopback(host) is loopback
    access = {"token": "", "authorization": "", "client_host": host, "proxied": False}
    if loopback:
        check_metrics_access(**access)
        with pytest.raises(Forbidden):
            check_metrics_access(**{**access, "proxied": True})
    else:
        with pytest.raises(Forbidden):
            check_metrics_access(**access)
    # with a token the address does not matter: only the token does
    with pytest.raises(Unauthorized):
        check_metrics_access(**{**access, "token": "t"})
    check_metrics_access(**{**access, "token": "t", "authorization": "Bearer t"})
