"""GET /datasets/{id}/manifest: JSON lines, CSV and Parquet hold the same rows and values,
every filter selects what it says, paging returns each row once, URLs download the bytes the
rows describe, on both stacks."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlalchemy import select, update

from app.datasets import manifest, manifest_stream
from app.datasets.manifest import ManifestFilter
from app.datasets.repository import upsert_image
from app.db.tables import Image, Job
from app.ids import new_id
from app.keys import authenticate
from app.schemas import MANIFEST_COLUMNS, ManifestFormat
from tests.conftest import Stack
from tests.factories import make_real_dataset
from tests.helpers import assert_problem

FORMATS = ("jsonl", "csv", "parquet")
NEGATIVE = {0: None, 1: "blurry, low quality", 2: ""}  # by index: null, text, empty string
GROUPS = {1: "I-II", 2: "I-II", 3: "III-IV", 4: "III-IV", 5: "V-VI", 6: "V-VI"}
INTS = {"size_bytes", "skin_tone", "seed", "steps", "width", "height"}
# Text that needs escaping in JSON and quoting in CSV; \x1e is the separator PostgreSQL
# joins a range's texts with, so CSV falls back to reading that range row by row.
NASTY = 'An "image", of psoriasis\nwith \\ backslash, é ✓ and \x1e\ttab'


@dataclass
class Crafted:
    client: httpx.Client
    dataset_id: str
    job_a: str
    job_b: str
    parent: str
    objects: dict[str, bytes]  # image id -> bytes in the store


def craft(stack: Stack) -> Crafted:
    """Four real images (a Fitzpatrick type, only a group, neither, a type that overrides a
    contradicting group; splits, labels, odd file names) and four synthetic children of three
    of them, from two jobs and two conditions, in one dataset."""
    key = stack.new_key()
    dataset_id, parents = make_real_dataset(stack, key, condition="psoriasis", n=4)
    real = [p.image_id for p in parents]
    real_values: list[dict[str, Any]] = [
        {"skin_tone": 1, "skin_tone_group": None, "split": "train",
         "labels": {"md5hash": "0a1b", "malignant": False}, "original_name": 'a,"b"\nc.jpg'},
        {"skin_tone": None, "skin_tone_group": "V-VI", "split": "test", "labels": None,
         "original_name": "ddi_0001.png"},
        {"skin_tone": None, "skin_tone_group": None, "split": None, "labels": {},
         "original_name": None},
        {"skin_tone": 4, "skin_tone_group": "V-VI", "split": "validation",
         "labels": {"note": NASTY}, "original_name": "é.jpg"},
    ]  # fmt: skip
    objects = {p.image_id: stack.store.get_bytes(_key(stack, p.image_id)) for p in parents}
    with stack.session() as session:
        for image_id, values in zip(real, real_values, strict=True):
            session.execute(update(Image).where(Image.id == image_id).values(**values))
        owner = authenticate(session=session, raw_key=key)
        assert owner is not None
        jobs = []
        for condition, strategy in (("psoriasis", "inpaint"), ("lichen-planus", "text-to-image")):
            job = Job(
                id=new_id(), owner_id=owner.id, dataset_id=dataset_id, kind="generate",
                status="succeeded", condition=condition, strategy=strategy, count=3, seed=1,
                chunk_size=8, params={},
            )  # fmt: skip
            session.add(job)
            jobs.append(job.id)
        session.flush()
        children = [
            (jobs[0], 0, real[0], "psoriasis", 1, "inpaint", NASTY, 3.0),
            (jobs[0], 1, real[0], "psoriasis", 1, "inpaint", NASTY, 3.0),
            (jobs[0], 2, real[3], "psoriasis", 4, "inpaint", "plain", 3.0),
            (jobs[1], 0, real[1], "lichen-planus", None, "text-to-image", "plain", 7.5),
        ]
        for job_id, index, parent, condition, tone, strategy, prompt, guidance in children:
            image_id = new_id()
            data = f"png bytes of {image_id}".encode()
            object_key = f"datasets/{dataset_id}/{condition}/{image_id}.png"
            stack.store.put_bytes(object_key, data, content_type="image/png")
            objects[image_id] = data
            upsert_image(
                session=session,
                values={
                    "id": image_id, "dataset_id": dataset_id, "job_id": job_id,
                    "index": index, "source": "synthetic", "condition": condition,
                    "skin_tone": tone, "strategy": strategy, "model_id": "tiny-random",
                    "prompt": prompt, "negative_prompt": NEGATIVE[index],
                    "seed": 2**62 + index, "steps": 50, "guidance_scale": guidance,
                    "width": 64, "height": 64, "sha256": hashlib.sha256(data).hexdigest(),
                    "size_bytes": len(data), "storage_key": object_key,
                    "parent_image_id": parent, "provenance": {"seed": 2**62 + index},
                },
            )  # fmt: skip
    return Crafted(stack.client(key), dataset_id, jobs[0], jobs[1], real[0], objects)


def _key(stack: Stack, image_id: str) -> str:
    with stack.session() as session:
        return session.scalar(select(Image.storage_key).where(Image.id == image_id))


def expected_rows(stack: Stack, dataset_id: str) -> list[dict[str, Any]]:
    """Every manifest column but url, from the database rows, by image id."""
    with stack.session() as session:
        images = session.scalars(
            select(Image).where(Image.dataset_id == dataset_id).order_by(Image.id)
        ).all()
        return [
            {
                "image_id": i.id, "dataset_id": i.dataset_id, "sha256": i.sha256,
                "size_bytes": i.size_bytes, "condition": i.condition, "skin_tone": i.skin_tone,
                "source": i.source, "strategy": i.strategy, "model": i.model_id,
                "seed": i.seed, "steps": i.steps, "guidance_scale": i.guidance_scale,
                "prompt": i.prompt, "negative_prompt": i.negative_prompt,
                "parent_image_id": i.parent_image_id, "width": i.width, "height": i.height,
                "job_id": i.job_id, "storage_key": i.storage_key,
                "created_at": i.created_at.isoformat(timespec="microseconds"),
                "split": i.split,
                "skin_tone_group": GROUPS.get(i.skin_tone or 0, i.skin_tone_group),
                "labels": i.labels, "original_name": i.original_name,
            }
            for i in images
        ]  # fmt: skip


def get_rows(client: httpx.Client, dataset_id: str, fmt: str = "jsonl", **params: Any) -> list:
    """The manifest's rows as dicts, whatever the format (CSV and Parquet turned back into
    JSON's values: labels parsed, numbers typed, empty CSV fields None)."""
    response = client.get(f"/datasets/{dataset_id}/manifest", params={"format": fmt, **params})
    assert response.status_code == 200, response.text
    return parse(response, fmt)


def parse(response: httpx.Response, fmt: str) -> list[dict[str, Any]]:
    if fmt == "jsonl":
        assert response.headers["content-type"] == "application/x-ndjson"
        return [json.loads(line) for line in response.text.splitlines()]
    if fmt == "csv":
        assert response.headers["content-type"].startswith("text/csv")
        reader = csv.DictReader(io.StringIO(response.text, newline=""))
        assert reader.fieldnames == MANIFEST_COLUMNS
        rows = []
        for raw in reader:
            row: dict[str, Any] = {k: (v if v != "" else None) for k, v in raw.items()}
            for name in INTS:
                row[name] = int(row[name]) if row[name] is not None else None
            gs = row["guidance_scale"]
            row["guidance_scale"] = float(gs) if gs is not None else None
            row["labels"] = json.loads(row["labels"]) if row["labels"] is not None else None
            rows.append(row)
        return rows
    assert response.headers["content-type"] == "application/vnd.apache.parquet"
    table = pq.read_table(io.BytesIO(response.content))
    assert table.schema.names == MANIFEST_COLUMNS
    rows = table.to_pylist()
    for row in rows:
        row["created_at"] = row["created_at"].isoformat(timespec="microseconds")
        row["labels"] = json.loads(row["labels"]) if row["labels"] is not None else None
    return rows


def without_url(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k != "url"} for row in rows]


def ids(rows: list[dict[str, Any]]) -> list[str]:
    return [row["image_id"] for row in rows]


# --- formats ------------------------------------------------------------------------------


def test_three_formats_hold_the_same_rows_and_values(stack: Stack) -> None:
    crafted = craft(stack)
    expected = expected_rows(stack, crafted.dataset_id)
    assert len(expected) == 8
    by_format = {fmt: get_rows(crafted.client, crafted.dataset_id, fmt) for fmt in FORMATS}
    for fmt, rows in by_format.items():
        assert list(rows[0]) == MANIFEST_COLUMNS, fmt
        if fmt == "csv":  # Python's csv reads "" and an empty field alike: see below
            rows = [{k: "" if v is None and e[k] == "" else v for k, v in r.items()}
                    for r, e in zip(rows, expected, strict=True)]  # fmt: skip
        assert without_url(rows) == expected, fmt
        # the same URLs, but for their expiry (signed at another second, maybe)
        paths = [urlsplit(r["url"]).path for r in rows]
        assert paths == [urlsplit(r["url"]).path for r in by_format["jsonl"]], fmt

    rows = {r["image_id"]: r for r in by_format["jsonl"]}
    real = [r for r in rows.values() if r["source"] == "real"]
    groups = {(r["skin_tone"], r["skin_tone_group"]) for r in real}
    assert groups == {(1, "I-II"), (4, "III-IV"), (None, None), (None, "V-VI")}
    assert [r["labels"] for r in rows.values() if r["original_name"] == 'a,"b"\nc.jpg'] == [
        {"md5hash": "0a1b", "malignant": False}
    ]
    assert sum(r["prompt"] == NASTY for r in rows.values()) == 2
    assert {type(r["guidance_scale"]) for r in rows.values() if r["source"] == "synthetic"} == {
        float
    }
    assert max(r["seed"] for r in rows.values() if r["seed"] is not None) == 2**62 + 2
    for row in rows.values():
        assert datetime.fromisoformat(row["created_at"]).utcoffset().total_seconds() == 0
    # an empty string is not null: "" in CSV (an empty field is null), kept by Parquet
    assert [r["negative_prompt"] for r in by_format["parquet"]].count("") == 1
    csv_text = crafted.client.get(
        f"/datasets/{crafted.dataset_id}/manifest", params={"format": "csv"}
    ).text
    assert csv_text.count(',"",') == 1


def test_parquet_has_an_explicit_schema(embedded: Stack) -> None:
    crafted = craft(embedded)
    response = crafted.client.get(
        f"/datasets/{crafted.dataset_id}/manifest", params={"format": "parquet"}
    )
    schema = pq.read_schema(io.BytesIO(response.content))
    assert schema == manifest_stream.parquet_schema()
    assert schema.field("created_at").type == pa.timestamp("us", tz="UTC")
    assert schema.field("seed").type == pa.int64()
    assert schema.field("skin_tone").type == pa.int8()
    assert schema.field("labels").type == pa.string()
    assert not schema.field("image_id").nullable and schema.field("split").nullable
    assert response.headers["content-disposition"].endswith(f'{crafted.dataset_id}.parquet"')


def test_an_empty_selection_is_a_valid_file_in_every_format(embedded: Stack) -> None:
    crafted = craft(embedded)
    manifest = f"/datasets/{crafted.dataset_id}/manifest"
    params = {"condition": "no-such-condition"}
    assert crafted.client.get(manifest, params=params).text == ""
    csv_text = crafted.client.get(manifest, params={**params, "format": "csv"}).text
    assert csv_text == ",".join(MANIFEST_COLUMNS) + "\n"
    content = crafted.client.get(manifest, params={**params, "format": "parquet"}).content
    table = pq.read_table(io.BytesIO(content))
    assert table.num_rows == 0 and table.schema == manifest_stream.parquet_schema()


# --- filters ------------------------------------------------------------------------------


def test_each_filter_selects_what_it_says(stack: Stack) -> None:
    crafted = craft(stack)
    everything = expected_rows(stack, crafted.dataset_id)

    def where(**conditions: Any) -> list[str]:
        return [r["image_id"] for r in everything if all(r[k] == v for k, v in conditions.items())]

    cases: list[tuple[dict[str, Any], list[str]]] = [
        ({"condition": "lichen-planus"}, where(condition="lichen-planus")),
        ({"skin_tone": 4}, where(skin_tone=4)),
        ({"skin_tone_group": "I-II"}, where(skin_tone_group="I-II")),
        ({"skin_tone_group": "III-IV"}, where(skin_tone_group="III-IV")),
        ({"skin_tone_group": "V-VI"}, where(skin_tone_group="V-VI")),
        ({"skin_tone_group": "unknown"}, where(skin_tone_group=None)),
        ({"strategy": "inpaint"}, where(strategy="inpaint")),
        ({"source": "real"}, where(source="real")),
        ({"source": "synthetic"}, where(source="synthetic")),
        ({"parent_image_id": crafted.parent}, where(parent_image_id=crafted.parent)),
        ({"job_id": crafted.job_b}, where(job_id=crafted.job_b)),
        ({"split": "test"}, where(split="test")),
        ({"split": "train"}, where(split="train")),
        (
            {"source": "synthetic", "skin_tone_group": "I-II"},
            where(source="synthetic", skin_tone_group="I-II"),
        ),
        ({"job_id": crafted.job_a, "skin_tone": 4}, where(job_id=crafted.job_a, skin_tone=4)),
        ({"split": "validation", "source": "synthetic"}, []),
    ]
    # the crafted rows make every case select something, and not everything, but the last
    assert all(0 < len(want) < len(everything) for _, want in cases[:-1])
    # a group comes from skin_tone before the stored group; "unknown" has neither
    assert len(where(skin_tone_group="V-VI")) == 1 and len(where(skin_tone_group=None)) == 2
    for params, want in cases:
        assert ids(get_rows(crafted.client, crafted.dataset_id, **params)) == want, params
    params, want = cases[2]
    for fmt in ("csv", "parquet"):
        assert ids(get_rows(crafted.client, crafted.dataset_id, fmt, **params)) == want


@pytest.mark.parametrize(
    ("params", "field"),
    [
        pytest.param({"skin_tone_group": "VII"}, "skin_tone_group", id="group"),
        pytest.param({"skin_tone_group": "i-ii"}, "skin_tone_group", id="group-case"),
        pytest.param({"split": "holdout"}, "split", id="split"),
        pytest.param({"skin_tone": 7}, "skin_tone", id="skin-tone"),
        pytest.param({"skin_tone": "dark"}, "skin_tone", id="skin-tone-text"),
        pytest.param({"source": "imagined"}, "source", id="source"),
        pytest.param({"strategy": "magic"}, "strategy", id="strategy"),
        pytest.param({"format": "xlsx"}, "format", id="format"),
        pytest.param({"limit": 0}, "limit", id="limit"),
    ],
)
def test_bad_filter_values_are_422_naming_the_field(
    embedded: Stack, params: dict[str, Any], field: str
) -> None:
    crafted = craft(embedded)
    response = crafted.client.get(f"/datasets/{crafted.dataset_id}/manifest", params=params)
    assert_problem(response, 422, field)


# --- paging -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [{}, {"source": "synthetic"}, {"skin_tone_group": "unknown"}, {"condition": "psoriasis"}],
    ids=["all", "synthetic", "unknown-group", "psoriasis"],
)
def test_paging_with_filters_returns_every_row_once(stack: Stack, params: dict) -> None:
    crafted = craft(stack)
    want = ids(get_rows(crafted.client, crafted.dataset_id, **params))
    for fmt in ("jsonl", "parquet"):
        seen: list[str] = []
        cursor = None
        pages = 0
        while True:
            page = {**params, "format": fmt, "limit": 2}
            if cursor:
                page["cursor"] = cursor
            response = crafted.client.get(f"/datasets/{crafted.dataset_id}/manifest", params=page)
            rows = parse(response, fmt)
            assert len(rows) <= 2
            seen += ids(rows)
            pages += 1
            cursor = response.headers.get("x-next-cursor")
            if not cursor:
                break
            assert f"cursor={cursor}" in response.headers["link"]
            assert 'rel="next"' in response.headers["link"]
        assert seen == want, fmt  # each once, in id order
        assert pages == max(1, -(-len(want) // 2)), fmt


@pytest.mark.parametrize(
    ("range_rows", "ranges_per_query"),
    [(3, 16), (3, 2), (4, 2), (1, 1)],
    ids=["3-rows", "3-rows-2-a-query", "4-rows-2-a-query", "1-row"],
)
def test_many_ranges_over_parallel_connections(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, range_rows: int, ranges_per_query: int
) -> None:
    """Ranges of 3 ids read 3 at a time (some empty after filtering) give the same rows as
    one range, cut at `limit` and at the cursor; Parquet row groups gather ranges."""
    crafted = craft(stack)
    small = stack.settings.model_copy(update={"manifest_batch_rows": range_rows})
    monkeypatch.setattr(manifest_stream, "PARQUET_ROW_GROUP_ROWS", 4)
    monkeypatch.setattr(manifest, "RANGES_PER_QUERY", ranges_per_query)

    def body(settings: Any, fmt: str, limit: int | None = None, cursor: str | None = None,
             **filters: Any) -> bytes:  # fmt: skip
        return b"".join(
            manifest_stream.stream_manifest(
                settings=settings, store=stack.store, dataset_id=crafted.dataset_id,
                filters=ManifestFilter(**filters), cursor=cursor, limit=limit,
                fmt=ManifestFormat(fmt),
            )
        )  # fmt: skip

    def lines(settings: Any, fmt: str, **kw: Any) -> list[Any]:
        # URLs are signed as they are written: compare them without their query strings
        text = re.sub(r'(https?://[^?"]*)\?[^",]*', r"\1", body(settings, fmt, **kw).decode())
        if fmt == "jsonl":
            return text.splitlines()
        return list(csv.reader(io.StringIO(text, newline="")))[1:]  # rows, not lines

    for fmt in ("jsonl", "csv"):
        assert lines(small, fmt) == lines(stack.settings, fmt)
        whole = lines(stack.settings, fmt)
        assert lines(small, fmt, limit=5) == whole[:5]
        assert len(whole) == 8
        psoriasis = lines(stack.settings, fmt, condition="psoriasis")
        assert lines(small, fmt, condition="psoriasis") == psoriasis
    everything = expected_rows(stack, crafted.dataset_id)
    third = everything[3]["image_id"]
    jsonl = [json.loads(x) for x in body(small, "jsonl", cursor=third, limit=4).splitlines()]
    assert ids(jsonl) == [r["image_id"] for r in everything[3:7]]
    table = pq.read_table(io.BytesIO(body(small, "parquet", source="synthetic")))
    assert table.column("image_id").to_pylist() == [
        r["image_id"] for r in everything if r["source"] == "synthetic"
    ]
    parquet = pq.ParquetFile(io.BytesIO(body(small, "parquet"))).metadata
    # ranges gathered into row groups of at least 4 rows
    groups = [parquet.row_group(i).num_rows for i in range(parquet.num_row_groups)]
    assert sum(groups) == 8 and all(n >= 4 for n in groups[:-1]) and len(groups) <= 2


# --- URLs ---------------------------------------------------------------------------------


def test_urls_download_the_bytes_the_rows_describe(stack: Stack) -> None:
    crafted = craft(stack)
    for fmt in FORMATS:
        rows = get_rows(crafted.client, crafted.dataset_id, fmt)
        assert {r["image_id"] for r in rows} == set(crafted.objects)
        for row in rows:
            data = httpx.get(row["url"], timeout=30).content  # no API key: the URL signs
            assert hashlib.sha256(data).hexdigest() == row["sha256"]
            assert data == crafted.objects[row["image_id"]]
