"""POST /evaluations end to end (issue 23): a synthetic dataset made by the service from real
photos, with a planted copy of a training photo, measured through the API and a real worker;
the report's fields and ranges, the audit table, the figures, exclude_copies on manifests and
runs; the 422s and cancel."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import httpx
from sqlalchemy import text

from tests.conftest import Stack, count_rows, wait_for
from tests.factories import _add_image, make_split_dataset
from tests.helpers import assert_problem

C1, C2 = "folliculitis", "basal-cell-carcinoma"
SPACE = "lite0"
EVALUATIONS = "SELECT count(*) FROM jobs WHERE kind = 'evaluation'"


def wait_evaluation(stack: Stack, client: httpx.Client, evaluation_id: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        body = client.get(f"/evaluations/{evaluation_id}").json()
        return body if body["status"] in ("succeeded", "failed", "canceled") else None

    try:
        return wait_for(done, timeout=240, interval=0.5, what=f"evaluation {evaluation_id}")
    except AssertionError as error:
        raise AssertionError(f"{error}\nworker log:\n{stack.worker.log()[-4000:]}") from None


def synthetic_dataset(stack: Stack, client: httpx.Client, real: str) -> str:
    """image-to-image children of C1's training photos and text-to-image C2 images, by the
    service, in one synthetic dataset."""
    first = client.post("/jobs", json={
        "condition": C1, "strategy": "image-to-image", "source_dataset": real, "count": 4,
        "seed": 3, "dataset_name": "eval-syn",
    })  # fmt: skip
    assert first.status_code == 202, first.text
    dataset = first.json()["dataset_id"]
    second = client.post("/jobs", json={
        "condition": C2, "skin_tone": 5, "count": 4, "seed": 4, "dataset_id": dataset,
    })  # fmt: skip
    assert second.status_code == 202, second.text
    for job in (first.json(), second.json()):
        assert stack.wait_job(client, job["id"])["status"] == "succeeded"
    return dataset


def plant_copy(stack: Stack, *, synthetic: str, copied: str, parent: str) -> str:
    """A synthetic child of `parent` whose bytes are those of another training photo."""
    with stack.session() as session:
        (key,) = session.execute(
            text("SELECT storage_key FROM images WHERE id = :i"), {"i": copied}
        ).one()
        data = stack.store.get_bytes(key)
        return _add_image(stack, session, dataset_id=synthetic, condition=C1, data=data,
                          source="synthetic", strategy="image-to-image", skin_tone=3,
                          parent_image_id=parent)  # fmt: skip


def test_evaluation_end_to_end_flags_a_planted_copy(stack: Stack) -> None:
    """On PostgreSQL + Redis + S3 and on the embedded default (SQLite, local store)."""
    key = stack.new_key("evaluator")
    client = stack.client(key)
    real, ids = make_split_dataset(
        stack, key, splits={C1: {"train": 6, "test": 3}, C2: {"train": 6, "test": 3}}
    )
    synthetic = synthetic_dataset(stack, client, real)
    planted = plant_copy(stack, synthetic=synthetic, copied=ids[C1]["train"][5],
                         parent=ids[C1]["train"][0])  # fmt: skip

    # without an evaluation, exclude_copies is refused
    assert_problem(client.get(f"/datasets/{synthetic}/manifest?exclude_copies=true"), 422,
                   "exclude_copies")  # fmt: skip

    response = client.post("/evaluations", json={
        "synthetic_dataset": synthetic, "real_dataset": real, "seed": 1,
    })  # fmt: skip
    assert response.status_code == 202, response.text
    created = response.json()
    assert response.headers["location"] == f"/evaluations/{created['id']}"
    assert created["conditions"] == sorted([C1, C2])
    assert created["backbone"] == "efficientnet-lite0" and created["progress"]["steps"] == 6
    body = wait_evaluation(stack, client, created["id"])
    assert body["status"] == "succeeded", body["error"]
    assert body["progress"]["step"] == body["progress"]["steps"]
    result = body["result"]

    # the reference: no lineage (a base model), so the train split
    assert result["reference"]["source"] == "split" and result["reference"]["split"] == "train"
    assert result["reference"]["images"] == 12 and result["synthetic"]["images"] == 9
    assert result["feature_space"]["name"] == SPACE and result["feature_space"]["dim"] == 2560

    # fidelity: every distance with its floor, each with its bootstrap interval around it,
    # PRDC in [0, 1]
    fidelity = result["fidelity"]
    assert "percentile bootstrap" in fidelity["ci_method"]
    assert fidelity["bootstrap_resamples"] == {"fd": 50, "kid": 1000}
    overall = fidelity["overall"]
    assert overall[f"fd_{SPACE}"] >= 0 and overall[f"fd_{SPACE}_floor"] >= 0
    assert overall[f"kid_{SPACE}"] is not None and overall[f"kid_{SPACE}_floor"] is not None
    for scope in [overall, *fidelity["by_condition"].values()]:
        for name in (f"fd_{SPACE}", f"fd_{SPACE}_floor", f"kid_{SPACE}", f"kid_{SPACE}_floor"):
            low, high = scope[f"{name}_ci"]
            assert low <= scope[name] <= high and low < high, (name, scope)
        assert scope[f"fd_{SPACE}_ci"][0] >= 0
    for name in ("precision", "recall", "coverage"):
        assert 0 <= overall[f"{name}_{SPACE}"] <= 1
        low, high = overall[f"{name}_{SPACE}_ci"]
        assert 0 <= low <= overall[f"{name}_{SPACE}"] <= high <= 1
    assert set(result["fidelity"]["by_condition"]) == {C1, C2}
    assert "V-VI" in result["fidelity"]["by_skin_tone"]

    # utility: synthetic-trained head beside an equal number of real images, on the test split
    utility = result["utility"]
    assert utility["classes"] == sorted([C1, C2]) and utility["test_images"] == 6
    for part in ("synthetic", "real"):
        assert 0 <= utility[part]["top1"] <= 1
        assert len(utility[part]["top1_ci"]) == 2
        assert set(utility[part]["by_skin_tone"]) == {"I-II", "III-IV", "V-VI", "unknown"}
    assert utility["train_images"]["synthetic"] == {C1: 5, C2: 4}

    # skin tone: ITA per requested type beside real images of that type
    tone = result["skin_tone"]
    assert tone["by_type"]["5"]["synthetic"]["n"] + tone["unmeasured_synthetic"] >= 4
    assert [b[0] for b in tone["bands"]] == [1, 2, 3, 4, 5, 6]

    # memorisation: the planted copy (of ANOTHER patient's photo than its parent) is flagged
    audit = result["memorisation"]
    assert audit["audited"] == 9
    assert 0 <= audit[f"copy_fraction_{SPACE}"] <= 1
    assert planted in audit["flagged"]
    assert audit["threshold"]["value"] <= 1.0 and audit["threshold"]["n_copies"] == 12
    assert audit["parents"]["images"] == 5

    # the audit table, CSV and JSON lines, most similar first
    table = client.get(f"/evaluations/{created['id']}/pairs?format=csv")
    assert table.status_code == 200 and table.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(table.text)))
    assert len(rows) == 9 and rows[0]["image_id"] == planted
    assert rows[0]["nearest_image_id"] == ids[C1]["train"][5]
    assert float(rows[0]["cosine"]) > 0.999 and float(rows[0]["ssim"]) > 0.99
    lines = client.get(f"/evaluations/{created['id']}/pairs?format=jsonl").text.splitlines()
    first = json.loads(lines[0])
    assert len(lines) == 9 and first["flagged"] is True and first["parent_cosine"] is not None

    # the figures: the overview contact sheet and one per condition (condition x skin type)
    sheets = [f"contact-sheet-{C2}", f"contact-sheet-{C1}"]
    assert body["plots"] == ["contact-sheet", "closest-pairs", "ita", "pca", "prdc", *sheets]
    for name in body["plots"]:
        png = client.get(f"/evaluations/{created['id']}/plots/{name}.png")
        assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    svg = client.get(f"/evaluations/{created['id']}/plots/pca.svg")
    assert svg.headers["content-type"] == "image/svg+xml" and b"<svg" in svg.content
    svg = client.get(f"/evaluations/{created['id']}/plots/contact-sheet-{C1}.svg")
    assert svg.headers["content-type"] == "image/svg+xml" and b"<svg" in svg.content
    assert_problem(client.get(f"/evaluations/{created['id']}/plots/nope.png"), 404)
    assert_problem(client.get(f"/evaluations/{created['id']}/plots/contact-sheet-acne.png"), 404)

    # exclude_copies: the manifest leaves the flagged images out and says how many
    flagged = len(audit["flagged"])
    manifest = client.get(f"/datasets/{synthetic}/manifest?exclude_copies=true")
    assert manifest.status_code == 200
    assert manifest.headers["x-copies-excluded"] == str(flagged)
    listed = [json.loads(line)["image_id"] for line in manifest.text.splitlines()]
    assert planted not in listed and len(listed) == 9 - flagged

    # ... and a run never trains on them
    run = client.post("/runs", json={
        "dataset": real, "synthetic_datasets": [synthetic], "synthetic_per_real": 1,
        "strategy": "image-to-image", "validation_per_class": 2, "exclude_copies": True,
        "conditions": [C1, C2], "max_epochs": 2,
    })  # fmt: skip
    assert run.status_code == 202, run.text
    finished = stack.wait_job(client, run.json()["experiment_id"], timeout=180)
    assert finished["status"] == "succeeded"
    run_row = client.get(f"/runs/{run.json()['id']}").json()
    assert run_row["split"]["copies_excluded"] >= 1
    assert run_row["config"]["copy_audits"] == {synthetic: created["id"]}

    # listing
    listed_evaluations = client.get("/evaluations").json()["items"]
    assert [e["id"] for e in listed_evaluations] == [created["id"]]


def test_evaluation_refuses_bad_input_and_cancels(embedded: Stack) -> None:
    stack = embedded
    key = stack.new_key("evaluator")
    client = stack.client(key)
    real, _ids = make_split_dataset(stack, key, splits={C1: {"train": 2, "test": 1}})
    other_real, _ = make_split_dataset(stack, key, splits={C2: {"train": 2}}, name="c2")
    job = client.post("/jobs", json={"condition": C1, "count": 2, "seed": 1}).json()
    synthetic = job["dataset_id"]
    assert stack.wait_job(client, job["id"])["status"] == "succeeded"
    strangers = stack.client(stack.new_key("stranger"))
    their_real, _ = make_split_dataset(stack, stack.new_key("x"), splits={C1: {"train": 1}})

    evaluations_before = count_rows(stack, EVALUATIONS)

    def post(**body: Any) -> httpx.Response:
        return client.post("/evaluations", json={"synthetic_dataset": synthetic,
                                                 "real_dataset": real, **body})  # fmt: skip

    assert_problem(post(real_dataset=other_real), 422, "synthetic_dataset")  # no shared condition
    assert_problem(post(real_split="validation"), 422, "real_split")  # an empty split
    assert_problem(post(test_split="holdout"), 422, "test_split")
    assert_problem(post(real_dataset=their_real), 422, "real_dataset")  # another key's
    assert_problem(post(synthetic_dataset=real), 422, "synthetic_dataset")  # real as synthetic
    assert_problem(post(real_dataset=synthetic), 422, "real_dataset")  # synthetic as real
    assert_problem(post(conditions=[C2]), 422, "conditions")
    assert_problem(post(backbone="resnet"), 422, "backbone")
    assert count_rows(stack, EVALUATIONS) == evaluations_before  # nothing was created
    assert_problem(client.post("/runs", json={
        "dataset": real, "synthetic_datasets": [synthetic], "synthetic_per_real": 1,
        "exclude_copies": True,
    }), 422, "exclude_copies")  # fmt: skip

    # cancel: a queued or running evaluation stops and keeps nothing
    created = post(idempotency_key="once").json()
    again = post(idempotency_key="once")
    assert again.status_code == 200 and again.json()["id"] == created["id"]
    canceled = client.post(f"/evaluations/{created['id']}/cancel")
    assert canceled.status_code == 200 and canceled.json()["status"] in ("canceled", "canceling")
    body = wait_evaluation(stack, client, created["id"])
    assert body["status"] == "canceled" and body["result"] is None
    assert_problem(client.get(f"/evaluations/{created['id']}/pairs"), 404)
    assert_problem(strangers.get(f"/evaluations/{created['id']}"), 404)


def test_reference_defaults_to_the_generators_lineage_and_a_running_evaluation_cancels(
    embedded: Stack,
) -> None:
    """Images of a fine-tuned family are measured against the photos that trained it (not the
    whole train split); a running evaluation stops on cancel and keeps no result."""
    stack = embedded
    key = stack.new_key("lab")
    client = stack.client(key)
    dataset_id, ids = make_split_dataset(
        stack, key, splits={C1: {"train": 6, "test": 2}, C2: {"train": 6, "test": 2}}
    )
    # the fine-tune leaves out C1's first 2 photos (their bytes are in `held`): its lineage is
    # 10 of the 12 training photos
    held, _ = make_split_dataset(stack, key, splits={C1: {"train": 2}}, name="held")
    tune = {"max_train_steps": 2, "train_batch_size": 2, "learning_rate": 1e-3,
            "validation_images": 0, "seed": 5}  # fmt: skip
    finetune = client.post(
        "/finetunes",
        json={"dataset": dataset_id, "base_model": "tiny-random", "exclude_datasets": [held],
              **tune},
    )  # fmt: skip
    assert finetune.status_code == 202, finetune.text
    family = finetune.json()["family_id"]
    wait_for(
        lambda: (
            client.get(f"/finetunes/{finetune.json()['id']}").json()["status"]
            in ("succeeded", "failed")
        ),
        timeout=240,
        what="fine-tune",
    )
    synthetic = None
    for condition in (C1, C2):
        body = {"condition": condition, "count": 3, "seed": 1, "model": family}
        body |= {"dataset_id": synthetic} if synthetic else {"dataset_name": "tuned"}
        job = client.post("/jobs", json=body).json()
        assert stack.wait_job(client, job["id"])["status"] == "succeeded"
        synthetic = job["dataset_id"]
    request = {"synthetic_dataset": synthetic, "real_dataset": dataset_id, "seed": 1}
    created = client.post("/evaluations", json=request)
    assert created.status_code == 202, created.text
    result = wait_evaluation(stack, client, created.json()["id"])
    assert result["status"] == "succeeded", result
    reference = result["result"]["reference"]
    assert reference["source"] == "lineage", reference
    assert reference["images"] == len(ids[C1]["train"]) + len(ids[C2]["train"]) - 2

    # the same evaluation again, canceled while it runs
    again = client.post("/evaluations", json={**request, "seed": 2}).json()
    wait_for(
        lambda: client.get(f"/evaluations/{again['id']}").json()["status"] == "running",
        timeout=120,
        interval=0.05,
        what="the evaluation running",
    )
    assert client.post(f"/evaluations/{again['id']}/cancel").status_code == 200
    ended = wait_evaluation(stack, client, again["id"])
    assert ended["status"] == "canceled" and ended["result"] is None
