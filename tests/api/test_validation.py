"""Bad requests answer 422 problem+json naming the field, and leave no rows behind."""

from __future__ import annotations

import math
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.conftest import Stack, count_rows
from tests.helpers import assert_problem, submit

VALID = {"condition": "psoriasis", "skin_tone": 5, "strategy": "text-to-image", "count": 2}
MISSING = object()


# The rows one key owns, table by table: other tests' jobs may write rows meanwhile (the
# worker is shared), so whole-table counts could change under a correct test.
OWNED_ROWS = {
    "jobs": "SELECT count(*) FROM jobs WHERE owner_id = :o",
    "datasets": "SELECT count(*) FROM datasets WHERE owner_id = :o",
    "job_chunks": "SELECT count(*) FROM job_chunks c JOIN jobs j ON j.id = c.job_id"
    " WHERE j.owner_id = :o",
    "images": "SELECT count(*) FROM images i JOIN datasets d ON d.id = i.dataset_id"
    " WHERE d.owner_id = :o",
}


def row_counts(stack: Stack) -> dict[str, int]:
    """The rows of the stack's newest key (the test's own), by table."""
    owner = stack.owners[-1]
    return {table: count_rows(stack, query, o=owner) for table, query in OWNED_ROWS.items()}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        pytest.param({"condition": "not-a-disease"}, "condition", id="unknown-condition"),
        pytest.param({"condition": ""}, "condition", id="empty-condition"),
        pytest.param({"skin_tone": 0}, "skin_tone", id="skin-tone-0"),
        pytest.param({"skin_tone": 7}, "skin_tone", id="skin-tone-7"),
        pytest.param({"skin_tone": "five"}, "skin_tone", id="skin-tone-text"),
        pytest.param({"count": 0}, "count", id="count-0"),
        pytest.param({"count": 1_000_001}, "count", id="count-too-big"),
        pytest.param({"count": MISSING}, "count", id="count-missing"),
        pytest.param({"strategy": "magic"}, "strategy", id="unknown-strategy"),
        pytest.param({"strategy": "inpaint"}, "source_dataset", id="edit-without-source"),
        pytest.param({"model": "nope"}, "model", id="unknown-model"),
        pytest.param({"colour": "red"}, "colour", id="extra-field"),
        pytest.param({"width": 65}, "width", id="width-not-multiple-of-8"),
        pytest.param({"height": 4}, "height", id="height-too-small"),
        pytest.param({"seed": -1}, "seed", id="negative-seed"),
        pytest.param({"guidance_interval": [0.6, 0.2]}, "guidance_interval", id="interval-order"),
        pytest.param({"guidance_interval": [0.0, 1.5]}, "guidance_interval.1", id="interval-range"),
        pytest.param({"guidance_interval": [0.4]}, "guidance_interval.1", id="interval-one-end"),
        pytest.param({"source_dataset": "no-such-dataset"}, "source_dataset", id="source"),
        pytest.param({"dataset_id": "no-such-dataset"}, "dataset_id", id="dataset-id"),
    ],
)
def test_bad_job_is_refused_and_creates_nothing(
    deployed: Stack, change: dict[str, Any], field: str
) -> None:
    client = deployed.client(deployed.new_key())
    body = {**VALID, **change}
    body = {k: v for k, v in body.items() if v is not MISSING}
    assert row_counts(deployed) == dict.fromkeys(OWNED_ROWS, 0)
    problem = assert_problem(client.post("/jobs", json=body), 422, field)
    assert problem["title"]
    assert row_counts(deployed) == dict.fromkeys(OWNED_ROWS, 0)
    assert client.get("/jobs").json()["items"] == []
    assert client.get("/datasets").json()["items"] == []


def test_body_that_is_not_json_is_refused(deployed: Stack) -> None:
    client = deployed.client(deployed.new_key())
    response = client.post(
        "/jobs", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_problem(response, 422)
    assert row_counts(deployed) == dict.fromkeys(OWNED_ROWS, 0)


def test_a_million_images_is_accepted(deployed: Stack) -> None:
    """The largest count is accepted with all its chunks, then canceled at once.

    The API under test here is create_app with the deployed database and a broker that
    refuses connections, and the worker is stopped: a million-image job would otherwise send
    every chunk's message, which the shared worker would have to drain before later tests.
    """
    raw = deployed.new_key()
    settings = deployed.settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    deployed.worker.stop()
    try:
        with TestClient(create_app(settings), headers={"Authorization": f"Bearer {raw}"}) as api:
            response = api.post("/jobs", json={**VALID, "count": 1_000_000})
            assert response.status_code == 202, response.text
            job = response.json()
            assert job["count"] == 1_000_000
            assert job["progress"] == {"done": 0, "total": 1_000_000, "running": []}
            assert job["chunk_size"] == deployed.settings.chunk_size
            chunks = math.ceil(1_000_000 / job["chunk_size"])
            assert job["chunks"] == chunks
            canceled = api.post(f"/jobs/{job['id']}/cancel")
            assert canceled.status_code == 200, canceled.text
            assert canceled.json()["status"] == "canceled"
    finally:
        deployed.worker.start()

    rows = count_rows(deployed, "SELECT count(*) FROM job_chunks WHERE job_id = :j", j=job["id"])
    assert rows == chunks
    covered = count_rows(
        deployed,
        "SELECT coalesce(sum(stop - start), 0) FROM job_chunks WHERE job_id = :j",
        j=job["id"],
    )
    assert covered == 1_000_000
    not_canceled = "SELECT count(*) FROM job_chunks WHERE job_id = :j AND status <> 'canceled'"
    assert count_rows(deployed, not_canceled, j=job["id"]) == 0
    # the real server agrees
    assert deployed.client(raw).get(f"/jobs/{job['id']}").json()["status"] == "canceled"


def test_query_parameters_are_checked(deployed: Stack) -> None:
    client = deployed.client(deployed.new_key())
    assert_problem(client.get("/jobs", params={"status": "bogus"}), 422, "status")
    assert_problem(client.get("/jobs", params={"limit": 0}), 422, "limit")
    assert_problem(client.get("/jobs", params={"limit": 1001}), 422, "limit")
    assert_problem(client.get("/jobs", params={"cursor": "no-such-job"}), 422, "cursor")
    assert_problem(client.get("/datasets", params={"kind": "imaginary"}), 422, "kind")
    assert client.get("/jobs", params={"status": "succeeded"}).status_code == 200

    missing = assert_problem(client.get("/jobs/no-such-job"), 404)
    assert "no-such-job" in missing["detail"]
    assert_problem(client.post("/jobs/no-such-job/cancel"), 404)
    assert_problem(client.get("/datasets/no-such-dataset"), 404)
    assert_problem(client.get("/datasets/no-such-dataset/manifest"), 404)


def test_manifest_query_parameters_are_checked(deployed: Stack) -> None:
    client = deployed.client(deployed.new_key())
    job = submit(client, count=1)  # its dataset exists from now on
    manifest = f"/datasets/{job['dataset_id']}/manifest"
    assert client.get(manifest).status_code == 200
    assert_problem(client.get(manifest, params={"format": "xml"}), 422, "format")
    assert_problem(client.get(manifest, params={"skin_tone": 9}), 422, "skin_tone")
    assert_problem(client.get(manifest, params={"skin_tone": 0}), 422, "skin_tone")
    assert_problem(client.get(manifest, params={"strategy": "magic"}), 422, "strategy")
    assert_problem(client.get(manifest, params={"source": "imagined"}), 422, "source")
    assert_problem(client.get(manifest, params={"limit": 0}), 422, "limit")
    assert client.get(manifest, params={"skin_tone": 5, "format": "csv"}).status_code == 200
