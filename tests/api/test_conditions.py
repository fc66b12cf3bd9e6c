"""The condition vocabulary per key (issue 21): the seeded conditions are everyone's; labels a
key uploads (junk included) are that key's, in GET /conditions, POST /jobs validation and the
prompts of its jobs, and nobody else's."""

from __future__ import annotations

import json
import uuid

import httpx

from tests.conftest import Stack
from tests.helpers import assert_problem, csv_text, make_zip, png, submit, upload
from tests.test_migrations import PAPER_SLUGS

SEEDED = set(PAPER_SLUGS)


def conditions(client: httpx.Client) -> dict[str, dict[str, object]]:
    response = client.get("/conditions")
    assert response.status_code == 200, response.text
    return {c["slug"]: c for c in response.json()["items"]}


def upload_labels(stack: Stack, client: httpx.Client, labels: list[str]) -> dict[str, object]:
    """Upload one small image per label; the finished ingest job's result."""
    images = {f"{i}.png": png(1000 + i) for i in range(len(labels))}
    rows = [[f"{i}.png", label, 3] for i, label in enumerate(labels)]
    images["metadata.csv"] = csv_text(["file", "label", "fitzpatrick"], rows)
    job = stack.wait_job(client, upload(client, make_zip(images), name="labels")["id"])
    assert job["status"] == "succeeded", job
    return job["result"]


def prompts(client: httpx.Client, dataset_id: str) -> set[str]:
    lines = client.get(f"/datasets/{dataset_id}/manifest").text.splitlines()
    return {json.loads(line)["prompt"] for line in lines}


def test_uploaded_labels_are_the_uploading_keys_own(stack: Stack) -> None:
    a = stack.client(stack.new_key("alice"))
    b = stack.client(stack.new_key("bob"))
    junk = f"zz junk {uuid.uuid4().hex[:8]}"  # a label nobody else ever uploaded
    junk_slug = junk.replace(" ", "-")
    result = upload_labels(stack, a, ["Granuloma annulare", junk, "Psoriasis"])
    # new to A's vocabulary even if another key uploaded granuloma annulare before; psoriasis
    # is shared, so nothing is added for it
    assert result["conditions_added"] == sorted(["granuloma-annulare", junk_slug])

    seen_by_a, seen_by_b = conditions(a), conditions(b)
    assert seen_by_a[junk_slug] == {"slug": junk_slug, "name": junk, "shared": False}
    assert seen_by_a["granuloma-annulare"]["shared"] is False
    assert junk_slug not in seen_by_b
    assert "granuloma-annulare" not in seen_by_b or seen_by_b["granuloma-annulare"]["shared"]
    assert not [s for s, c in seen_by_b.items() if not c["shared"]]  # B uploaded nothing
    for seen in (seen_by_a, seen_by_b):  # the seeded vocabulary is everyone's
        assert {s for s, c in seen.items() if c["shared"]} >= SEEDED
        assert seen["psoriasis"] == {"slug": "psoriasis", "name": "psoriasis", "shared": True}

    # B naming A's label is the 422 of a label nobody has; nothing is created
    jobs_before = b.get("/jobs").json()["items"]
    for slug in (junk_slug, f"never-uploaded-{uuid.uuid4().hex[:8]}"):
        response = b.post(
            "/jobs", json={"condition": slug, "strategy": "text-to-image", "count": 1}
        )
        body = assert_problem(response, 422, field="condition")
        assert (
            body["detail"] == f"condition: unknown condition {slug!r} (GET /conditions lists them)"
        )
    assert b.get("/jobs").json()["items"] == jobs_before

    # A uses its label, and the prompt has it in A's words
    job = stack.wait_job(a, submit(a, condition=junk_slug, skin_tone=None, count=1)["id"])
    assert job["status"] == "succeeded", job
    assert prompts(a, job["dataset_id"]) == {f"An image of {junk}, a skin disease"}


def test_two_keys_own_one_label_each_in_its_own_words(stack: Stack) -> None:
    """The same slug uploaded by two keys, written differently: each owns it and its prompts
    use its own words (a third key sees neither)."""
    a = stack.client(stack.new_key("alice"))
    b = stack.client(stack.new_key("bob"))
    c = stack.client(stack.new_key("carol"))
    word = uuid.uuid4().hex[:6]
    a_label, b_label = f"Café {word} macule", f"cafe {word} macule"
    slug = f"cafe-{word}-macule"
    assert upload_labels(stack, a, [a_label])["conditions_added"] == [slug]
    assert slug not in conditions(b)
    assert upload_labels(stack, b, [b_label])["conditions_added"] == [slug]
    assert upload_labels(stack, b, [a_label])["conditions_added"] == []  # B's already
    assert conditions(a)[slug]["name"] == f"café {word} macule"
    assert conditions(b)[slug]["name"] == f"cafe {word} macule"  # its first upload's words
    assert slug not in conditions(c)
    assert_problem(c.post("/jobs", json={"condition": slug, "count": 1}), 422, field="condition")

    for client, words in ((a, f"café {word} macule"), (b, f"cafe {word} macule")):
        job = stack.wait_job(client, submit(client, condition=slug, skin_tone=2, count=1)["id"])
        assert job["status"] == "succeeded", job
        assert prompts(client, job["dataset_id"]) == {
            f"An image of {words}, a skin disease, Fitzpatrick skin type 2"
        }
