"""POST /jobs -> worker -> objects in the store -> rows -> manifest, on both stacks."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from datetime import timedelta

import httpx
from PIL import Image

from tests.conftest import Stack, count_rows, wait_for
from tests.helpers import submit


def test_job_end_to_end(stack: Stack) -> None:
    client = stack.client(stack.new_key())
    job = submit(client, count=20, seed=1234)
    assert job["status"] == "queued"
    assert job["progress"] == {"done": 0, "total": 20, "running": []}
    assert job["chunks"] == 3  # chunk_size 8

    done = stack.wait_job(client, job["id"])
    assert done["progress"] == {"done": 20, "total": 20, "running": []}
    assert done["timings"]["started_at"] and done["timings"]["finished_at"]
    assert done["timings"]["running_s"] > 0

    # one row per image, with its provenance
    assert count_rows(stack, "SELECT count(*) FROM images WHERE job_id = :j", j=job["id"]) == 20
    lines = client.get(f"/datasets/{job['dataset_id']}/manifest").text.splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == 20
    assert len({r["image_id"] for r in rows}) == 20
    assert len({r["seed"] for r in rows}) == 20
    for row in rows:
        assert row["condition"] == "psoriasis"
        assert row["skin_tone"] == 5
        assert row["strategy"] == "text-to-image"
        assert row["source"] == "synthetic"
        assert row["model"] == "tiny-random"
        assert row["prompt"] == "An image of psoriasis, a skin disease, Fitzpatrick skin type 5"
        assert row["steps"] == 4 and row["guidance_scale"] == 3.0
        assert (row["width"], row["height"]) == (64, 64)
        assert row["storage_key"] == (
            f"datasets/{job['dataset_id']}/psoriasis/{row['image_id']}.png"
        )
        # every URL downloads bytes whose sha256 the manifest states, with no API key
        data = httpx.get(row["url"], timeout=30).content
        assert hashlib.sha256(data).hexdigest() == row["sha256"]
        assert len(data) == row["size_bytes"]
        assert Image.open(io.BytesIO(data)).size == (64, 64)

    # the store holds exactly these objects
    keys = list(stack.store.iter_keys(f"datasets/{job['dataset_id']}/"))
    assert sorted(keys) == sorted(r["storage_key"] for r in rows)

    # the dataset's counts by condition x skin tone x strategy
    dataset = client.get(f"/datasets/{job['dataset_id']}").json()
    assert dataset["kind"] == "synthetic"
    assert dataset["image_count"] == 20
    assert dataset["counts"] == [
        {"condition": "psoriasis", "skin_tone": 5, "strategy": "text-to-image", "count": 20}
    ]
    listed = client.get("/datasets").json()["items"]
    assert [d["id"] for d in listed] == [job["dataset_id"]]
    assert listed[0]["image_count"] == 20


def test_manifest_csv_filters_and_paging(stack: Stack) -> None:
    client = stack.client(stack.new_key())
    first = stack.wait_job(client, submit(client, count=6, skin_tone=2)["id"])
    second = submit(
        client, count=5, skin_tone=None, condition="lichen-planus", dataset_id=first["dataset_id"]
    )
    stack.wait_job(client, second["id"])
    dataset_id = first["dataset_id"]

    text = client.get(f"/datasets/{dataset_id}/manifest", params={"format": "csv"}).text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 11
    assert {r["condition"] for r in rows} == {"psoriasis", "lichen-planus"}

    only = client.get(
        f"/datasets/{dataset_id}/manifest", params={"condition": "lichen-planus", "format": "csv"}
    ).text
    only_rows = list(csv.DictReader(io.StringIO(only)))
    assert len(only_rows) == 5
    assert all(r["skin_tone"] == "" for r in only_rows)
    assert all("Fitzpatrick" not in r["prompt"] for r in only_rows)
    tone = client.get(f"/datasets/{dataset_id}/manifest", params={"skin_tone": 2}).text
    assert len(tone.splitlines()) == 6

    # cursor paging returns every row exactly once
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params = {"limit": 4}
        if cursor:
            params["cursor"] = cursor
        response = client.get(f"/datasets/{dataset_id}/manifest", params=params)
        assert response.status_code == 200
        seen += [json.loads(line)["image_id"] for line in response.text.splitlines()]
        pages += 1
        cursor = response.headers.get("x-next-cursor")
        if not cursor:
            break
    assert pages == 3
    assert sorted(seen) == sorted(r["image_id"] for r in rows)
    assert len(seen) == len(set(seen))

    counts = client.get(f"/datasets/{dataset_id}").json()["counts"]
    assert {(c["condition"], c["skin_tone"], c["count"]) for c in counts} == {
        ("psoriasis", 2, 6),
        ("lichen-planus", None, 5),
    }


def test_same_seed_same_bytes(stack: Stack) -> None:
    client = stack.client(stack.new_key())
    a = stack.wait_job(client, submit(client, count=4, seed=7)["id"])
    b = stack.wait_job(client, submit(client, count=4, seed=7)["id"])
    c = stack.wait_job(client, submit(client, count=4, seed=8)["id"])

    def shas(job: dict) -> list[str]:
        lines = client.get(f"/datasets/{job['dataset_id']}/manifest").text.splitlines()
        rows = sorted((json.loads(line) for line in lines), key=lambda r: r["seed"])
        return [r["sha256"] for r in rows]

    assert shas(a) == shas(b)
    assert set(shas(a)).isdisjoint(shas(c))


def test_cancel_running_job_keeps_written_images(stack: Stack) -> None:
    client = stack.client(stack.new_key())
    job = submit(client, count=400, num_inference_steps=20)
    wait_for(
        lambda: client.get(f"/jobs/{job['id']}").json()["progress"]["done"] >= 4,
        timeout=60,
        what="first images",
    )
    canceled = client.post(f"/jobs/{job['id']}/cancel")
    assert canceled.status_code == 200, canceled.text
    # a chunk in flight finishes the batch in hand (its images still count): until it stops
    # the job is canceling, and `done` is not final yet
    body = canceled.json()
    assert body["status"] == ("canceling" if body["progress"]["running"] else "canceled")
    assert body["timings"]["canceled_at"]

    # the running chunk stops at its next batch; nothing more is written after that
    def settled() -> int | None:
        running = count_rows(
            stack,
            "SELECT count(*) FROM job_chunks WHERE job_id = :j AND status = 'running'",
            j=job["id"],
        )
        return None if running else 1

    wait_for(settled, timeout=30, what="the running chunk to stop")
    written = count_rows(stack, "SELECT count(*) FROM images WHERE job_id = :j", j=job["id"])
    assert 4 <= written < 400
    assert written <= 8 * 2  # at most the chunk that was running and one more
    final = client.get(f"/jobs/{job['id']}").json()
    assert final["status"] == "canceled"
    assert final["progress"]["done"] == written
    rows = client.get(f"/datasets/{job['dataset_id']}/manifest").text.splitlines()
    assert len(rows) == written

    again = client.post(f"/jobs/{job['id']}/cancel")
    assert again.status_code == 409
    assert again.headers["content-type"].startswith("application/problem+json")


def dispatched(stack: Stack, job_id: str) -> int:
    sql = "SELECT count(*) FROM job_chunks WHERE job_id = :j AND dispatched_at IS NOT NULL"
    return count_rows(stack, sql, j=job_id)


def test_cancel_queued_job(deployed: Stack) -> None:
    client = deployed.client(deployed.new_key())
    deployed.worker.stop()
    try:
        job = submit(client, count=30)
        window = min(deployed.settings.dispatch_window, job["chunks"])
        wait_for(lambda: dispatched(deployed, job["id"]) == window, timeout=20, what="dispatch")
        response = client.post(f"/jobs/{job['id']}/cancel")
        assert response.status_code == 200
        assert response.json()["status"] == "canceled"
    finally:
        deployed.worker.start()
    pending = "SELECT count(*) FROM job_chunks WHERE job_id = :j AND status <> 'canceled'"
    assert count_rows(deployed, pending, j=job["id"]) == 0
    # only the dispatch window's chunks were sent; the rest never leave the database
    sent = dispatched(deployed, job["id"])
    assert sent == window < job["chunks"]
    # the restarted worker takes each sent chunk's message and drops it without generating:
    # wait for that evidence (one "skipped" result per message in its log), then for images
    deployed.worker.wait_ready()

    def skipped() -> int:
        return sum(
            job["id"] in line and "'skipped': True" in line
            for line in deployed.worker.log_since_start().splitlines()
        )

    wait_for(lambda: skipped() == sent, timeout=60, what="every sent chunk skipped")
    assert count_rows(deployed, "SELECT count(*) FROM images WHERE job_id = :j", j=job["id"]) == 0
    assert client.get(f"/jobs/{job['id']}").json()["progress"]["done"] == 0


def test_idempotency_key_returns_the_same_job(deployed: Stack) -> None:
    client = deployed.client(deployed.new_key())
    first = client.post(
        "/jobs", json={"condition": "psoriasis", "count": 2, "idempotency_key": "k1"}
    )
    second = client.post(
        "/jobs", json={"condition": "psoriasis", "count": 2, "idempotency_key": "k1"}
    )
    assert first.status_code == 202
    assert second.status_code == 200
    assert second.json()["id"] == first.json()["id"]
    listed = client.get("/jobs").json()["items"]
    assert [j["id"] for j in listed] == [first.json()["id"]]
    deployed.wait_job(client, first.json()["id"])


def test_a_chunk_whose_heartbeat_stopped_shows_as_stalled(deployed: Stack) -> None:
    """A running chunk that missed three heartbeats is `stalled` (its worker likely died) until
    recovery re-queues it; a canceled job is `canceling` only while a live chunk finishes."""
    from sqlalchemy import update

    from app.db.tables import JobChunk, utcnow

    client = deployed.client(deployed.new_key())
    deployed.worker.stop()  # no worker: nothing claims, beats or recovers the chunks
    try:
        job = submit(client, count=16)  # two chunks of 8
        assert job["chunks"] == 2
        now = utcnow()
        old = now - timedelta(seconds=30)  # stale_after_s is 4 here, the interval 0.5

        def chunk(index: int, **values: object) -> None:
            with deployed.session() as session:
                session.execute(
                    update(JobChunk)
                    .where(JobChunk.job_id == job["id"], JobChunk.index == index)
                    .values(**values)
                )

        chunk(0, status="running", started_at=old, heartbeat_at=old, step=3, steps=4)
        chunk(1, status="running", started_at=now, heartbeat_at=now, step=1, steps=4)
        running = {
            c["chunk"]: c for c in client.get(f"/jobs/{job['id']}").json()["progress"]["running"]
        }
        assert running[0]["stalled"] is True and running[0]["heartbeat_age_s"] >= 30
        assert running[1]["stalled"] is False and running[1]["heartbeat_age_s"] < 1.5

        # canceled while chunk 1 (alive) finishes its batch: canceling, then canceled
        canceled = client.post(f"/jobs/{job['id']}/cancel").json()
        assert canceled["status"] == "canceling"
        assert [c["chunk"] for c in canceled["progress"]["running"]] == [0, 1]
        listed = client.get("/jobs", params={"status": "canceled"}).json()["items"]
        assert [j["status"] for j in listed if j["id"] == job["id"]] == ["canceling"]
        chunk(1, status="canceled", done=3, finished_at=utcnow())
        final = client.get(f"/jobs/{job['id']}").json()
        assert final["status"] == "canceled"  # chunk 0 is stalled: it holds nothing up
        assert [c["chunk"] for c in final["progress"]["running"]] == [0]
    finally:
        deployed.worker.start()
