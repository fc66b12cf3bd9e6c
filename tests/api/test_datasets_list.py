"""GET /datasets is cursor-paged like /jobs: pages of `limit`, newest first, every dataset once,
with the `kind` filter and each dataset's image count."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from app.db.tables import Dataset
from app.ids import new_id
from app.keys import authenticate
from tests.conftest import Stack
from tests.factories import make_real_dataset
from tests.helpers import assert_problem

MANY = 130  # over the default page of 50


def make_datasets(stack: Stack, raw_key: str, n: int) -> list[str]:
    """n empty datasets owned by the key, as rows: every third one real, the rest synthetic;
    pairs share a created_at (paging must break the tie on the id). Returns their ids."""
    base = datetime.now(UTC) - timedelta(days=1)
    ids = []
    with stack.session() as session:
        owner = authenticate(session=session, raw_key=raw_key)
        assert owner is not None
        for i in range(n):
            dataset = Dataset(
                id=new_id(),
                owner_id=owner.id,
                name=f"bulk-{i}",
                kind="real" if i % 3 == 0 else "synthetic",
                created_at=base + timedelta(seconds=i // 2),
            )
            session.add(dataset)
            ids.append(dataset.id)
    return ids


def all_pages(client: httpx.Client, **params: Any) -> list[list[dict[str, Any]]]:
    pages: list[list[dict[str, Any]]] = []
    cursor = None
    while True:
        response = client.get("/datasets", params=params | ({"cursor": cursor} if cursor else {}))
        assert response.status_code == 200, response.text
        body = response.json()
        pages.append(body["items"])
        cursor = body["next_cursor"]
        if cursor is None:
            return pages
        assert len(pages) < 100, "paging does not end"


def newest_first(items: list[dict[str, Any]]) -> bool:
    keys = [(item["created_at"], item["id"]) for item in items]
    return keys == sorted(keys, reverse=True)


def test_datasets_are_paged_newest_first(stack: Stack) -> None:
    key = stack.new_key()
    client = stack.client(key)
    bulk = make_datasets(stack, key, MANY)
    with_images, _ = make_real_dataset(stack, key, condition="psoriasis", n=3)  # the newest
    everything = {*bulk, with_images}

    # the default page is 50, and the last page says so with a null cursor
    pages = all_pages(client)
    assert [len(page) for page in pages] == [50, 50, 31]
    listed = [item for page in pages for item in page]
    assert len(listed) == len({item["id"] for item in listed}) == MANY + 1
    assert {item["id"] for item in listed} == everything
    assert newest_first(listed)
    assert listed[0]["id"] == with_images and listed[0]["image_count"] == 3
    assert all(item["image_count"] == 0 for item in listed[1:])

    # a chosen limit, and the kind filter kept across pages
    pages = all_pages(client, limit=7)
    assert all(len(page) == 7 for page in pages[:-1]) and 1 <= len(pages[-1]) <= 7
    listed = [item for page in pages for item in page]
    assert [item["id"] for item in listed] == [item["id"] for p in all_pages(client) for item in p]
    real = [item for page in all_pages(client, kind="real", limit=10) for item in page]
    assert {item["kind"] for item in real} == {"real"}
    assert len(real) == len({item["id"] for item in real}) == (MANY + 2) // 3 + 1
    assert newest_first(real)

    body = client.get("/datasets", params={"limit": 1000}).json()
    assert len(body["items"]) == MANY + 1 and body["next_cursor"] is None


def test_a_bad_cursor_or_limit_is_a_422(stack: Stack) -> None:
    key = stack.new_key()
    client = stack.client(key)
    assert client.get("/datasets").json() == {"items": [], "next_cursor": None}
    assert_problem(client.get("/datasets", params={"cursor": "no-such-dataset"}), 422, "cursor")
    # another key's dataset is no cursor of this key's
    other = stack.new_key()
    (theirs,) = make_datasets(stack, other, 1)
    assert_problem(client.get("/datasets", params={"cursor": theirs}), 422, "cursor")
    assert_problem(client.get("/datasets", params={"limit": 0}), 422, "limit")
    assert_problem(client.get("/datasets", params={"limit": 1001}), 422, "limit")


def test_datasets_say_whether_a_job_still_writes_them(deployed: Stack) -> None:
    """An upload's dataset is `ingesting` (not a finished one with 0 images) until its ingest
    ends; a synthetic one `generating` while a job appends to it, `failed` when every job
    into it failed, else `ready`."""
    from sqlalchemy import update

    from app.db.tables import Job
    from tests.helpers import csv_text, make_zip, png, submit, upload

    client = deployed.client(deployed.new_key())

    def status(dataset_id: str) -> str:
        listed = {d["id"]: d["status"] for d in client.get("/datasets").json()["items"]}
        shown = client.get(f"/datasets/{dataset_id}").json()["status"]
        assert listed[dataset_id] == shown
        return shown

    deployed.worker.stop()  # nothing runs: the jobs stay queued
    try:
        archive = make_zip({"a.png": png(7), "metadata.csv": csv_text(
            ["file", "label", "fitzpatrick"], [["a.png", "psoriasis", 2]])})  # fmt: skip
        ingest = upload(client, archive)
        generate = submit(client, count=2, num_inference_steps=2)
        assert status(ingest["dataset_id"]) == "ingesting"
        assert status(generate["dataset_id"]) == "generating"
    finally:
        deployed.worker.start()
    deployed.wait_job(client, ingest["id"])
    deployed.wait_job(client, generate["id"])
    assert status(ingest["dataset_id"]) == "ready"
    assert status(generate["dataset_id"]) == "ready"

    # a dataset whose every job failed says so
    with deployed.session() as session:
        session.execute(update(Job).where(Job.id == generate["id"]).values(status="failed"))
    assert status(generate["dataset_id"]) == "failed"
