"""Dataset exports: POST /datasets/{id}/exports -> a worker -> WebDataset shards, a dataset
card and Croissant metadata in the store, read back as a user would (download URLs, tarfile)."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import uuid

import httpx
import numpy as np
from PIL import Image as PILImage
from sqlalchemy import insert, select

from app.db.tables import Dataset, Image
from app.keys import authenticate
from app.storage import image_key
from tests.conftest import Stack, count_rows, wait_for
from tests.factories import make_real_dataset
from tests.helpers import submit

REAL_CONDITION = "basal-cell-carcinoma"
# Keys of every sample's JSON (PAPER.md section 5's fields where they apply, and provenance).
SAMPLE_FIELDS = {
    "image_id", "dataset_id", "name", "md5hash", "label", "condition", "skin_tone",
    "skin_tone_group", "source", "method", "strategy", "model", "seed", "steps",
    "guidance_scale", "prompt", "negative_prompt", "parent_image_id", "width", "height",
    "sha256", "size_bytes", "job_id", "split", "labels", "created_at",
}  # fmt: skip
# Manifest columns that a sample's JSON repeats with the same value.
SAME_AS_MANIFEST = (
    "image_id", "dataset_id", "condition", "skin_tone", "source", "strategy", "model", "seed",
    "steps", "guidance_scale", "prompt", "parent_image_id", "width", "height", "sha256",
    "size_bytes", "job_id",
)  # fmt: skip


# --- helpers --------------------------------------------------------------------------------


def export(client: httpx.Client, dataset_id: str, **body: object) -> dict:
    response = client.post(f"/datasets/{dataset_id}/exports", json=body)
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["kind"] == "export"
    assert response.headers["location"] == f"/datasets/{dataset_id}/exports/{job['id']}"
    return job


def run_export(stack: Stack, client: httpx.Client, dataset_id: str, **body: object) -> dict:
    return stack.wait_job(client, export(client, dataset_id, **body)["id"])


def manifest(client: httpx.Client, dataset_id: str) -> dict[str, dict]:
    lines = client.get(f"/datasets/{dataset_id}/manifest").text.splitlines()
    return {row["image_id"]: row for row in map(json.loads, lines)}


def download(url: str) -> bytes:
    response = httpx.get(url, timeout=30)  # no API key: the URL is the credential
    assert response.status_code == 200, response.text
    return response.content


def read_shard(data: bytes) -> list[tuple[str, dict[str, bytes]]]:
    """The samples of a WebDataset tar, in order: (key, {extension: bytes})."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        for member in archive.getmembers():
            # deterministic headers: the same export gives the same bytes
            assert (member.mtime, member.uid, member.gid, member.mode) == (0, 0, 0, 0o644)
            assert (member.uname, member.gname) == ("", "")
            assert member.isfile()
            key, extension = member.name.split(".", 1)  # WebDataset's split: the first dot
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            handle = archive.extractfile(member)
            assert handle is not None
            samples[-1][1][extension] = handle.read()
    keys = [k for k, _ in samples]
    assert len(keys) == len(set(keys)), "a sample's files must be contiguous"
    return samples


def shard_samples(result: dict) -> list[tuple[str, dict[str, bytes]]]:
    """Every sample of an export, downloaded through its URLs, with each shard checked."""
    samples = []
    for shard in result["shards"]:
        data = download(shard["url"])
        assert hashlib.sha256(data).hexdigest() == shard["sha256"]
        assert len(data) == shard["size_bytes"]
        inside = read_shard(data)
        assert len(inside) == shard["samples"]
        samples += inside
    return samples


def readme_counts(card: str) -> dict[tuple[str, int | None, str | None], int]:
    """The condition x skin tone x strategy table of a dataset card."""
    counts = {}
    for line in card.splitlines():
        match = re.fullmatch(r"\| ([a-z0-9-]+) \| (\d|unknown) \| ([a-z-]+) \| (\d+) \|", line)
        if match:
            condition, tone, strategy, n = match.groups()
            key = (
                condition,
                None if tone == "unknown" else int(tone),
                None if strategy == "real" else strategy,
            )
            counts[key] = int(n)
    return counts


def api_counts(client: httpx.Client, dataset_id: str) -> dict:
    body = client.get(f"/datasets/{dataset_id}").json()
    return {(c["condition"], c["skin_tone"], c["strategy"]): c["count"] for c in body["counts"]}


def synthetic_dataset(stack: Stack, client: httpx.Client, count: int, **body: object) -> str:
    job = submit(client, count=count, seed=7, **body)
    return stack.wait_job(client, job["id"])["dataset_id"]


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    PILImage.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def bulk_dataset(stack: Stack, raw_key: str, n: int, *, missing: int | None = None) -> str:
    """A real dataset of n rows, fast: all share one stored PNG (row `missing`, when given,
    points at an object that does not exist)."""
    data = png(0)
    sha = hashlib.sha256(data).hexdigest()
    with stack.session() as session:
        owner = authenticate(session=session, raw_key=raw_key)
        assert owner is not None
        dataset = Dataset(id=str(uuid.uuid4()), owner_id=owner.id, name="bulk", kind="real")
        session.add(dataset)
        session.flush()
        shared = image_key(dataset_id=dataset.id, condition="psoriasis", image_id="shared")
        stack.store.put_bytes(shared, data, content_type="image/png")
        rows = []
        for i in range(n):
            image_id = str(uuid.uuid4())
            key = shared
            if i == missing:
                key = image_key(dataset_id=dataset.id, condition="psoriasis", image_id=image_id)
            rows.append(
                {
                    "id": image_id, "dataset_id": dataset.id, "source": "real",
                    "condition": "psoriasis", "skin_tone": 1 + i % 6, "width": 16, "height": 16,
                    "sha256": sha, "size_bytes": len(data), "storage_key": key, "provenance": {},
                }
            )  # fmt: skip
        if rows:
            session.execute(insert(Image), rows)
        return dataset.id


# --- tests ----------------------------------------------------------------------------------


def test_export_writes_shards_card_and_croissant(stack: Stack) -> None:
    client = stack.client(stack.new_key())
    dataset_id = synthetic_dataset(stack, client, 7)
    rows = manifest(client, dataset_id)

    queued = export(client, dataset_id, shard_size=3)
    assert queued["status"] == "queued"
    assert queued["progress"]["total"] == 7 and queued["count"] == 7
    assert queued["params"]["shard_size"] == 3 and queued["params"]["shuffle"] is False
    job = stack.wait_job(client, queued["id"])
    assert job["progress"]["done"] == 7
    result = job["result"]
    prefix = f"exports/{dataset_id}/{job['id']}/"
    assert result["samples"] == 7

    # 3 shards of 3, 3 and 1 samples, named with a 5-digit index
    assert [s["samples"] for s in result["shards"]] == [3, 3, 1]
    assert [s["key"] for s in result["shards"]] == [f"{prefix}shard-{i:05d}.tar" for i in range(3)]
    samples = shard_samples(result)

    # every image exactly once, in image-id order, its bytes and provenance as the manifest says
    assert [json.loads(files["json"])["image_id"] for _, files in samples] == sorted(rows)
    for key, files in samples:
        assert set(files) == {"png", "json"}
        meta = json.loads(files["json"])
        row = rows[meta["image_id"]]
        assert key == f"psoriasis_text-to-image_{row['image_id']}"
        assert "." not in key
        assert hashlib.sha256(files["png"]).hexdigest() == row["sha256"]
        assert set(meta) == SAMPLE_FIELDS
        for field in SAME_AS_MANIFEST:
            assert meta[field] == row[field], field
        assert meta["label"] == "psoriasis"
        assert meta["method"] == "text-to-image"
        assert meta["skin_tone_group"] == "V-VI"
        assert meta["md5hash"] is None and meta["split"] is None
        assert meta["created_at"][:19] == row["created_at"][:19]

    # the dataset card: counts that match GET /datasets/{id}, how it was made, how to load it
    card = download(result["card"]["url"]).decode()
    assert result["card"]["key"] == f"{prefix}README.md"
    assert readme_counts(card) == api_counts(client, dataset_id)
    assert "| **total** | | | **7** |" in card
    assert "`text-to-image`" in card and "`tiny-random`" in card
    assert "import webdataset as wds" in card and "shard-{00000..00002}.tar" in card
    assert "licence" in card.lower()

    # Croissant: JSON-LD naming each shard with its sha256, and a field per JSON key
    document = json.loads(download(result["croissant"]["url"]))
    assert result["croissant"]["key"] == f"{prefix}croissant.json"
    assert document["@type"] == "sc:Dataset"
    assert document["conformsTo"] == "http://mlcommons.org/croissant/1.0"
    assert document["@context"]["cr"] == "http://mlcommons.org/croissant/"
    assert document["name"] and document["description"]
    files = [d for d in document["distribution"] if d["@type"] == "cr:FileObject"]
    assert [(f["contentUrl"], f["sha256"], f["encodingFormat"]) for f in files] == [
        (s["key"].rsplit("/", 1)[1], s["sha256"], "application/x-tar") for s in result["shards"]
    ]
    file_sets = {d["@id"]: d for d in document["distribution"] if d["@type"] == "cr:FileSet"}
    assert file_sets["image-files"]["containedIn"] == [{"@id": f["@id"]} for f in files]
    assert file_sets["image-files"]["encodingFormat"] == "image/png"
    record_sets = {r["@id"]: r for r in document["recordSet"]}
    assert set(record_sets) == {"images", "samples"}
    names = {f["name"] for f in record_sets["samples"]["field"]}
    assert names >= SAMPLE_FIELDS - {"labels", "negative_prompt", "size_bytes"}
    assert {"image", "__key__"} <= names
    # every reference resolves: file sets to distributions, fields to fields
    ids = {d["@id"] for d in document["distribution"]}
    field_ids = {f["@id"] for r in record_sets.values() for f in r["field"]}
    for record_set in record_sets.values():
        for field in record_set["field"]:
            assert field["@id"] == f"{record_set['@id']}/{field['name']}"
            source = field["source"]
            assert (
                source["fileSet"]["@id"] in ids
                if "fileSet" in source
                else (source["field"]["@id"] in field_ids)
            )

    # the store holds exactly these files; GET of the export signs its URLs again
    assert sorted(stack.store.iter_keys(prefix)) == sorted(
        [s["key"] for s in result["shards"]] + [f"{prefix}README.md", f"{prefix}croissant.json"]
    )
    again = client.get(f"/datasets/{dataset_id}/exports/{job['id']}").json()
    assert [s["sha256"] for s in again["result"]["shards"]] == [
        s["sha256"] for s in result["shards"]
    ]
    assert (
        hashlib.sha256(download(again["result"]["shards"][2]["url"])).hexdigest()
        == (result["shards"][2]["sha256"])
    )
    listed = client.get(f"/datasets/{dataset_id}/exports").json()["items"]
    assert [j["id"] for j in listed] == [job["id"]]
    assert client.get(f"/jobs/{job['id']}").json()["kind"] == "export"


def test_real_images_keep_their_bytes_and_labels(stack: Stack) -> None:
    key = stack.new_key()
    client = stack.client(key)
    dataset_id, parents = make_real_dataset(stack, key, condition=REAL_CONDITION, n=5)
    md5 = {p.image_id: hashlib.md5(p.image_id.encode()).hexdigest() for p in parents}
    with stack.session() as session:
        for image in session.scalars(select(Image).where(Image.dataset_id == dataset_id)):
            image.labels = {"md5hash": md5[image.id], "fitzpatrick_centaur": "3"}
            image.split = "train"
            image.original_name = f"{md5[image.id]}.jpg"

    job = run_export(stack, client, dataset_id, shard_size=2)
    assert [s["samples"] for s in job["result"]["shards"]] == [2, 2, 1]
    samples = shard_samples(job["result"])
    by_id = {p.image_id: p for p in parents}
    assert sorted(json.loads(f["json"])["image_id"] for _, f in samples) == sorted(by_id)
    for key_, files in samples:
        meta = json.loads(files["json"])
        parent = by_id[meta["image_id"]]
        (extension,) = set(files) - {"json"}
        data = files[extension]
        # a real JPEG stays a JPEG, byte for byte (its object key says .png)
        assert extension == ("jpg" if data.startswith(b"\xff\xd8\xff") else "png")
        assert hashlib.sha256(data).hexdigest() == parent.sha256 == meta["sha256"]
        assert key_ == f"{REAL_CONDITION}_real_{parent.image_id}"
        assert meta["source"] == "real" and meta["method"] == "real"
        assert meta["strategy"] is None and meta["model"] is None and meta["seed"] is None
        assert meta["skin_tone"] == parent.skin_tone
        assert meta["md5hash"] == md5[parent.image_id]
        assert meta["labels"]["fitzpatrick_centaur"] == "3"
        assert meta["split"] == "train" and meta["name"] == f"{md5[parent.image_id]}.jpg"
    card = download(job["result"]["card"]["url"]).decode()
    assert readme_counts(card) == api_counts(client, dataset_id)
    assert "real images" in card
    document = json.loads(download(job["result"]["croissant"]["url"]))
    file_sets = {d["@id"]: d for d in document["distribution"] if d["@type"] == "cr:FileSet"}
    assert file_sets["image-files"]["encodingFormat"] in ("image/jpeg", "image/png")


def test_shuffle_is_reproducible_and_bytes_are_deterministic(deployed: Stack) -> None:
    client = deployed.client(deployed.new_key())
    dataset_id = synthetic_dataset(deployed, client, 7)

    def order(job: dict) -> list[str]:
        return [k for k, _ in shard_samples(job["result"])]

    plain = run_export(deployed, client, dataset_id, shard_size=3)
    first = run_export(deployed, client, dataset_id, shard_size=3, shuffle=True, seed=42)
    second = run_export(deployed, client, dataset_id, shard_size=3, shuffle=True, seed=42)
    other = run_export(deployed, client, dataset_id, shard_size=3, shuffle=True, seed=43)
    assert first["seed"] == 42 and first["params"]["seed"] == 42
    assert order(first) == order(second)
    assert sorted(order(first)) == order(plain)  # unshuffled is image-id order
    assert order(first) != order(plain)
    assert order(other) != order(first)
    # the same export gives the same bytes: equal shard hashes under different jobs' keys
    assert [s["sha256"] for s in first["result"]["shards"]] == [
        s["sha256"] for s in second["result"]["shards"]
    ]

    # a shuffle without a seed records the one it drew, which reproduces it
    drawn = run_export(deployed, client, dataset_id, shard_size=3, shuffle=True)
    seed = drawn["params"]["seed"]
    assert isinstance(seed, int) and drawn["seed"] == seed
    replay = run_export(deployed, client, dataset_id, shard_size=3, shuffle=True, seed=seed)
    assert [s["sha256"] for s in replay["result"]["shards"]] == [
        s["sha256"] for s in drawn["result"]["shards"]
    ]


def test_filters_restrict_the_export(stack: Stack) -> None:
    client = stack.client(stack.new_key())
    dataset_id = synthetic_dataset(stack, client, 3, skin_tone=5)
    more = submit(
        client, count=2, skin_tone=2, condition="lichen-planus", dataset_id=dataset_id, seed=8
    )
    stack.wait_job(client, more["id"])

    def exported(**filters: object) -> list[dict]:
        job = run_export(stack, client, dataset_id, **filters)
        assert job["progress"]["done"] == job["count"] == job["result"]["samples"]
        return [json.loads(files["json"]) for _, files in shard_samples(job["result"])]

    everything = exported()
    assert len(everything) == 5
    lichen = exported(condition="lichen-planus")
    assert len(lichen) == 2 and {m["condition"] for m in lichen} == {"lichen-planus"}
    assert {m["skin_tone_group"] for m in lichen} == {"I-II"}
    tone = exported(skin_tone=5, strategy="text-to-image", source="synthetic")
    assert len(tone) == 3 and {m["skin_tone"] for m in tone} == {5}

    # a selection of nothing is refused, naming the filter
    response = client.post(f"/datasets/{dataset_id}/exports", json={"source": "real"})
    assert response.status_code == 422
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["errors"][0]["field"] == "source"
    response = client.post(f"/datasets/{dataset_id}/exports", json={"condition": "no-such"})
    assert response.status_code == 422


def test_validation_and_ownership(deployed: Stack) -> None:
    owner = deployed.client(deployed.new_key())
    dataset_id = bulk_dataset(deployed, deployed.new_key(), 0)  # a dataset of another key
    assert owner.post(f"/datasets/{dataset_id}/exports", json={}).status_code == 404
    assert owner.get(f"/datasets/{dataset_id}/exports").status_code == 404
    assert owner.post(f"/datasets/{uuid.uuid4()}/exports", json={}).status_code == 404
    assert deployed.client().post(f"/datasets/{dataset_id}/exports", json={}).status_code == 401

    key = deployed.new_key()
    client = deployed.client(key)
    mine = bulk_dataset(deployed, key, 2)
    for body, field in (
        ({"shard_size": 0}, "shard_size"),
        ({"shard_size": 5001}, "shard_size"),
        ({"skin_tone": 7}, "skin_tone"),
        ({"strategy": "paint"}, "strategy"),
        ({"source": "fake"}, "source"),
        ({"shards": 3}, "shards"),
    ):
        response = client.post(f"/datasets/{mine}/exports", json=body)
        assert response.status_code == 422, body
        assert [e["field"] for e in response.json()["errors"]] == [field], response.text
    assert count_rows(deployed, "SELECT count(*) FROM jobs WHERE dataset_id = :d", d=mine) == 0
    job = export(client, mine)
    assert job["params"]["shard_size"] == 5000  # the paper's release: at most 5,000 a shard
    assert owner.get(f"/datasets/{mine}/exports/{job['id']}").status_code == 404
    assert client.get(f"/datasets/{mine}/exports/{uuid.uuid4()}").status_code == 404
    done = deployed.wait_job(client, job["id"])
    assert [s["samples"] for s in done["result"]["shards"]] == [2]


def test_cancel_mid_export_keeps_nothing(stack: Stack) -> None:
    key = stack.new_key()
    client = stack.client(key)
    dataset_id = bulk_dataset(stack, key, 1500)
    job = export(client, dataset_id, shard_size=1)
    prefix = f"exports/{dataset_id}/{job['id']}/"

    def started() -> bool:
        body = client.get(f"/jobs/{job['id']}").json()
        return body["status"] == "running" and body["progress"]["done"] >= 3

    wait_for(started, timeout=60, interval=0.05, what="the first shards")
    assert client.post(f"/jobs/{job['id']}/cancel").status_code == 200
    running = "SELECT count(*) FROM job_chunks WHERE job_id = :j AND status = 'running'"
    wait_for(lambda: count_rows(stack, running, j=job["id"]) == 0, timeout=60, interval=0.1)
    body = client.get(f"/jobs/{job['id']}").json()
    assert body["status"] == "canceled"
    assert body["result"] is None
    assert 3 <= body["progress"]["done"] < 1500
    assert list(stack.store.iter_keys(prefix)) == []


def test_a_missing_image_fails_the_export_and_keeps_nothing(deployed: Stack) -> None:
    key = deployed.new_key()
    client = deployed.client(key)
    dataset_id = bulk_dataset(deployed, key, 6, missing=4)
    job = export(client, dataset_id, shard_size=2)
    failed = deployed.wait_job(client, job["id"], statuses=("failed",))
    assert "missing from the store" in failed["error"]
    assert failed["result"] is None
    assert list(deployed.store.iter_keys(f"exports/{dataset_id}/{job['id']}/")) == []


def test_worker_killed_mid_export_reruns_to_the_same_files(deployed: Stack) -> None:
    key = deployed.new_key()
    client = deployed.client(key)
    dataset_id = bulk_dataset(deployed, key, 300)
    job = export(client, dataset_id, shard_size=1)

    def mid_export() -> bool:
        return client.get(f"/jobs/{job['id']}").json()["progress"]["done"] >= 3

    wait_for(mid_export, timeout=60, interval=0.02, what="the first shards")
    deployed.worker.kill()
    deployed.worker.start()
    done = deployed.wait_job(client, job["id"], timeout=120)
    attempts = "SELECT max(attempts) FROM job_chunks WHERE job_id = :j"
    assert count_rows(deployed, attempts, j=job["id"]) >= 2  # taken again by recovery
    assert done["progress"]["done"] == done["result"]["samples"] == 300
    prefix = f"exports/{dataset_id}/{job['id']}/"
    shards = done["result"]["shards"]
    assert sorted(deployed.store.iter_keys(prefix)) == sorted(
        [s["key"] for s in shards] + [f"{prefix}README.md", f"{prefix}croissant.json"]
    )
    for shard in shards[:5] + shards[-5:]:
        data = deployed.store.get_bytes(shard["key"])
        assert hashlib.sha256(data).hexdigest() == shard["sha256"]
    # the rerun wrote what an uninterrupted export writes
    twin = run_export(deployed, client, dataset_id, shard_size=1)
    assert [s["sha256"] for s in twin["result"]["shards"]] == [s["sha256"] for s in shards]
