"""Control characters (C0 and C1: U+0000-U+001F, U+007F-U+009F) in names, keys, ids and
labels are refused with a 422 naming the field (PostgreSQL cannot store NUL; none of them
belongs in a name); a free-text description may keep tab, line feed and CR. A path id with
one cannot exist: 404. Nothing is created, and the service answers on as before."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import Stack
from tests.helpers import assert_problem, csv_text, make_zip, png

JOB = {"condition": "psoriasis", "skin_tone": 5, "strategy": "text-to-image", "count": 2}
RUN = {"dataset": "no-such-dataset"}

BAD_BODIES = [
    ("/jobs", {**JOB, "condition": "psori\x00asis"}, "condition"),
    ("/jobs", {**JOB, "dataset_name": "abc\x00def"}, "dataset_name"),
    ("/jobs", {**JOB, "dataset_name": "abc\x85def"}, "dataset_name"),  # C1
    ("/jobs", {**JOB, "dataset_name": "abc\tdef"}, "dataset_name"),  # a name has no tab
    ("/jobs", {**JOB, "dataset_name": "abc\x7f"}, "dataset_name"),
    ("/jobs", {**JOB, "model": "tiny\x00random"}, "model"),
    ("/jobs", {**JOB, "source_dataset": "abc\x00def"}, "source_dataset"),
    ("/jobs", {**JOB, "dataset_id": "abc\x00def"}, "dataset_id"),
    ("/jobs", {**JOB, "idempotency_key": "key\x00"}, "idempotency_key"),
    ("/jobs", {**JOB, "negative_prompt": "blurry\x00"}, "negative_prompt"),
    ("/experiments", {"dataset": "abc\x00def"}, "dataset"),
    ("/experiments", {**RUN, "conditions": ["psoriasis", "ecz\x00ema"]}, "conditions.1"),
    ("/experiments", {**RUN, "name": "grid\x1b"}, "name"),
    ("/experiments", {**RUN, "synthetic_datasets": ["a\x00"]}, "synthetic_datasets.0"),
    ("/experiments", {**RUN, "test_dataset": "a\x00"}, "test_dataset"),
    ("/experiments", {**RUN, "test_split": "te\x00st"}, "test_split"),
    ("/experiments", {**RUN, "idempotency_key": "k\x00"}, "idempotency_key"),
    ("/runs", {"dataset": "abc\x00def"}, "dataset"),
    ("/runs", {**RUN, "name": "run\x00"}, "name"),
    ("/runs", {**RUN, "backbone": "timm:vit\x00"}, "backbone"),
    ("/datasets/combine", {"name": "a\x00", "parts": [{"dataset_id": "x"}]}, "name"),
    ("/datasets/combine", {"name": "a", "description": "a\x00", "parts": [{"dataset_id": "x"}]},
     "description"),
    ("/datasets/combine", {"name": "a", "parts": [{"dataset_id": "x\x00"}]}, "parts.0.dataset_id"),
    ("/datasets/combine", {"name": "a", "parts": [{"dataset_id": "x", "condition": "p\x00"}]},
     "parts.0.condition"),
    ("/datasets/no-such-dataset/exports", {"condition": "ecz\x00ema"}, "condition"),
]  # fmt: skip


def nothing_made(client: Any) -> None:
    assert client.get("/jobs").json()["items"] == []
    assert client.get("/datasets").json()["items"] == []
    assert client.get("/experiments").json()["items"] == []


def test_control_characters_in_bodies_are_refused(stack: Stack) -> None:
    client = stack.client(stack.new_key())
    for path, body, field in BAD_BODIES:
        problem = assert_problem(client.post(path, json=body), 422, field)
        assert "control character" in problem["detail"], (path, field, problem)
    nothing_made(client)


def test_a_description_may_keep_tabs_and_newlines(stack: Stack) -> None:
    """Refused for its part's unknown dataset, not for its description's whitespace."""
    client = stack.client(stack.new_key())
    body = {"name": "mix", "description": "line one\r\nline\ttwo\n", "parts": [{"dataset_id": "x"}]}
    problem = assert_problem(client.post("/datasets/combine", json=body), 422)
    assert [e["field"] for e in problem.get("errors", [])] != ["description"], problem
    assert "description" not in problem["detail"], problem


@pytest.mark.parametrize("char", ["%00", "%01", "%1F", "%7F", "%C2%85"])
def test_a_path_id_with_a_control_character_is_not_found(stack: Stack, char: str) -> None:
    client = stack.client(stack.new_key())
    bad = f"abc{char}def"
    for method, path in [
        ("GET", f"/jobs/{bad}"),
        ("POST", f"/jobs/{bad}/cancel"),
        ("GET", f"/datasets/{bad}"),
        ("GET", f"/datasets/{bad}/manifest"),
        ("GET", f"/datasets/{bad}/exports"),
        ("GET", f"/datasets/no-such-dataset/exports/{bad}"),
        ("GET", f"/experiments/{bad}"),
        ("POST", f"/experiments/{bad}/cancel"),
        ("GET", f"/runs/{bad}"),
    ]:
        response = client.request(method, path)
        assert_problem(response, 404)
    assert client.get("/jobs").status_code == 200  # the service answers on


def test_query_values_with_a_control_character_are_refused(stack: Stack) -> None:
    client = stack.client(stack.new_key())
    assert_problem(client.get("/jobs", params={"cursor": "abc\x00def"}), 422, "cursor")
    assert_problem(client.get("/experiments", params={"cursor": "a\x00"}), 422, "cursor")
    # a manifest's filters, on a dataset that exists
    job = client.post("/jobs", json={**JOB, "count": 1}).json()
    manifest = f"/datasets/{job['dataset_id']}/manifest"
    for name in ("condition", "job_id", "parent_image_id", "cursor"):
        assert_problem(client.get(manifest, params={name: "abc\x00def"}), 422, name)
    assert client.get(manifest).status_code == 200
    client.post(f"/jobs/{job['id']}/cancel")


@pytest.mark.parametrize(
    ("form", "filename", "field"),
    [
        ({"name": "clinic\x00a"}, "data.zip", "name"),
        ({"name": "clinic\x9fa"}, "data.zip", "name"),
        ({"label_column": "label\x00"}, "data.zip", "label_column"),
        ({"file_column": "file\x01"}, "data.zip", "file_column"),
        ({"skin_tone_column": "tone\x00"}, "data.zip", "skin_tone_column"),
        ({"split_column": "split\x00"}, "data.zip", "split_column"),
        # httpx writes C0 characters but ESC as %XX in a file name; other clients may not
        ({}, "da\x1bta.zip", "archive"),
        ({}, "da\x85ta.zip", "archive"),
    ],
)
def test_upload_form_fields_with_control_characters_are_refused(
    stack: Stack, form: dict[str, str], filename: str, field: str
) -> None:
    client = stack.client(stack.new_key())
    metadata = csv_text(["file", "label"], [["a.png", "psoriasis"]])
    archive = make_zip({"a.png": png(1), "metadata.csv": metadata})
    files = {"archive": (filename, archive, "application/octet-stream")}
    response = client.post("/datasets", files=files, data=form)
    problem = assert_problem(response, 422, field)
    assert "control character" in problem["detail"]
    nothing_made(client)
