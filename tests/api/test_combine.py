"""POST /datasets/combine: a real train split plus the synthetic children of exactly those
images, as one self-contained dataset (the classifier protocol's mixture)."""

from __future__ import annotations

import collections
import json

from tests.conftest import Stack, count_rows
from tests.helpers import csv_text, make_zip, png, upload


def test_train_split_plus_its_children(deployed: Stack) -> None:
    client = deployed.client(deployed.new_key())
    splits = ["train", "train", "train", "validation", "test"]
    files = {f"{i}.png": png(200 + i) for i in range(5)}
    rows = [[f"{i}.png", "psoriasis", 3, split] for i, split in enumerate(splits)]
    archive = make_zip(
        files | {"metadata.csv": csv_text(["file", "label", "fitzpatrick", "split"], rows)}
    )
    real = deployed.wait_job(client, upload(client, archive)["id"])["dataset_id"]
    children = deployed.wait_job(client, client.post("/jobs", json={
        "condition": "psoriasis", "strategy": "image-to-image", "source_dataset": real,
        "synthetic_per_real": 2, "strength": 0.5}).json()["id"])  # fmt: skip
    assert children["progress"]["done"] == 10

    response = client.post("/datasets/combine", json={
        "name": "train+children",
        "parts": [{"dataset_id": real, "split": "train"},
                  {"dataset_id": children["dataset_id"], "children_of": 0}],
    })  # fmt: skip
    assert response.status_code == 201, response.text
    combined = response.json()
    assert combined["kind"] == "mixed"
    assert combined["image_count"] == 3 + 6

    manifest = [
        json.loads(x) for x in client.get(f"/datasets/{combined['id']}/manifest").text.splitlines()
    ]
    by_source = collections.Counter(r["source"] for r in manifest)
    assert by_source == {"real": 3, "synthetic": 6}
    real_ids = {r["image_id"] for r in manifest if r["source"] == "real"}
    parents = collections.Counter(
        r["parent_image_id"] for r in manifest if r["source"] == "synthetic"
    )
    assert set(parents) == real_ids  # links point inside the combined dataset
    assert set(parents.values()) == {2}
    # the originals are untouched; the objects are shared, not copied
    assert client.get(f"/datasets/{real}").json()["image_count"] == 5
    lines = client.get(f"/datasets/{real}/manifest").text.splitlines()
    originals = {json.loads(x)["sha256"] for x in lines}
    assert {r["sha256"] for r in manifest if r["source"] == "real"} <= originals


def test_combine_refuses_bad_parts(deployed: Stack) -> None:
    client = deployed.client(deployed.new_key())
    other = deployed.client(deployed.new_key())
    theirs = other.post("/jobs", json={"condition": "psoriasis", "count": 1}).json()["dataset_id"]
    before = count_rows(deployed, "SELECT count(*) FROM datasets")
    foreign = client.post(
        "/datasets/combine", json={"name": "x", "parts": [{"dataset_id": theirs}]}
    )
    assert foreign.status_code == 422
    assert foreign.json()["errors"][0]["field"] == "parts.0.dataset_id"
    forward = client.post("/datasets/combine", json={
        "name": "x", "parts": [{"dataset_id": theirs, "children_of": 0}]})  # fmt: skip
    assert forward.status_code == 422
    empty = client.post("/datasets/combine", json={"name": "x", "parts": []})
    assert empty.status_code == 422
    assert count_rows(deployed, "SELECT count(*) FROM datasets") == before
