"""Classifier experiments end to end: POST /experiments -> a real worker trains heads on the
packaged EfficientNet-Lite0 -> metrics, per-skin-tone report, predictions and plots through
the API. The classes of the crafted data are separable, so accuracy must be well above chance.
"""

from __future__ import annotations

import csv
import io
import json

import httpx
import pytest
from sqlalchemy import text

from app.db.session import session_factory
from app.db.tables import ApiKey, Job
from app.experiments import grid
from app.experiments import runs as runs_module
from app.schemas import ExperimentCreate
from tests.conftest import Stack, count_rows, wait_for
from tests.factories import SEPARABLE, make_classification_data

pytestmark = pytest.mark.slow
FAST_TRAINING = {"image_size": 64, "max_epochs": 15, "validation_per_class": 8}


def wait_experiment(
    stack: Stack, client: httpx.Client, experiment_id: str, *, timeout: float = 300
) -> dict:
    def poll() -> dict | None:
        body = client.get(f"/experiments/{experiment_id}").json()
        return body if body["status"] in ("succeeded", "failed", "canceled") else None

    body = wait_for(poll, timeout=timeout, interval=0.5, what=f"experiment {experiment_id}")
    assert body["status"] == "succeeded", (body.get("error"), stack.worker.log()[-3000:])
    return body


@pytest.fixture
def data(deployed: Stack) -> tuple[Stack, httpx.Client, str, str]:
    key = deployed.new_key()
    real, synthetic = make_classification_data(
        deployed, key, pool_per_class=20, test_per_class=8, children_per_parent=3
    )
    return deployed, deployed.client(key), real, synthetic


def test_experiment_end_to_end(data, monkeypatch: pytest.MonkeyPatch) -> None:
    stack, client, real, synthetic = data
    body = {
        "dataset": real,
        "synthetic_datasets": [synthetic],
        "strategies": ["inpaint"],
        "n_real_per_class": [4, None],
        "synthetic_per_real": [0, 2],
        "seeds": [1, 2],
        **FAST_TRAINING,
    }
    response = client.post("/experiments", json=body)
    assert response.status_code == 202, response.text
    experiment = response.json()
    assert response.headers["location"] == f"/experiments/{experiment['id']}"
    # 2 n_real x 2 k x 2 seeds; the classes are the dataset's conditions
    assert experiment["progress"]["total"] == 8
    assert experiment["params"]["classes"] == sorted(SEPARABLE)

    done = wait_experiment(stack, client, experiment["id"])
    assert done["progress"]["done"] == 8
    runs = done["runs"]
    assert len(runs) == 8 and {r["status"] for r in runs} == {"succeeded"}
    for run in runs:
        config, split, metrics = run["config"], run["split"], run["metrics"]
        n_real = config["n_real_per_class"]
        # counts per class: n_real (or all: 20 - 8 validation) and n_real x k
        expected_real = 12 if n_real is None else n_real
        assert split["train_real"] == dict.fromkeys(SEPARABLE, expected_real)
        assert split["train_synthetic"] == dict.fromkeys(
            SEPARABLE, expected_real * config["synthetic_per_real"]
        )
        assert split["validation"] == dict.fromkeys(SEPARABLE, 8)
        assert split["test"] == dict.fromkeys(SEPARABLE, 8)
        # separable classes: far above chance (1/3)
        assert metrics["top1"]["value"] >= 0.75, run
        assert metrics["top3"]["value"] == 1.0
        assert 0 <= metrics["top1"]["ci_wilson"][0] <= metrics["top1"]["value"]
        assert metrics["n"] == 24 and len(metrics["confusion"]) == 3
        assert metrics["macro_auroc"] >= 0.8
        groups = metrics["by_skin_tone"]["groups"]
        assert set(groups) == {"I-II", "III-IV", "V-VI", "unknown"}
        assert sum(g["n"] for g in groups.values()) == 24
        # a curve per epoch, early stopping at most max_epochs, the best epoch restored
        assert 1 <= len(run["history"]) <= 15
        assert run["best_epoch"] == min(run["history"], key=lambda h: h["val_loss"])["epoch"]

    # the report: per setting over seeds, and real+synthetic minus real-only, paired
    report = done["report"]
    assert report["runs"]["succeeded"] == 8
    assert len(report["settings"]) == 4
    for entry in report["settings"]:
        assert entry["top1"]["n"] == 2 and entry["top1"]["sd"] is not None
        if entry["setting"]["synthetic_per_real"]:
            versus = entry["versus_real_only"]
            assert versus["control"]["synthetic_per_real"] == 0
            lo, hi = versus["top1"]["ci"]
            assert lo <= versus["top1"]["difference"] <= hi
            assert versus["top1"]["n_images"] == 24
            # and per Fitzpatrick group, each on its own test images
            by_tone = versus["by_skin_tone"]["top1"]
            assert sum(g["n_images"] for g in by_tone["groups"].values() if g) == 24
            for group, value in by_tone["groups"].items():
                images = entry["by_skin_tone"][group]["pooled"]["n"]
                assert (value is None) == (images == 0), group
                if value:
                    assert value["n_images"] == images
                    assert value["ci"][0] <= value["difference"] <= value["ci"][1]

    # any two settings compared the same way: a k=2 setting against its real-only control
    treated = next(e for e in report["settings"] if e["setting"]["synthetic_per_real"])
    control = next(
        e for e in report["settings"]
        if e["setting"] == treated["versus_real_only"]["control"]
    )  # fmt: skip
    compared = client.get(f"/experiments/{experiment['id']}/compare",
                          params={"a": treated["label"], "b": control["label"]})  # fmt: skip
    assert compared.status_code == 200, compared.text
    assert (
        compared.json()["top1"]["difference"] == treated["versus_real_only"]["top1"]["difference"]
    )
    assert compared.json()["top1"]["ci"] == treated["versus_real_only"]["top1"]["ci"]
    unknown = client.get(f"/experiments/{experiment['id']}/compare",
                         params={"a": "n=999 k=0", "b": control["label"]})  # fmt: skip
    assert unknown.status_code == 422 and unknown.json()["errors"][0]["field"] == "a"
    assert control["label"] in unknown.json()["detail"]
    missing = client.get(f"/experiments/{experiment['id']}/compare", params={"a": "x"})
    assert missing.status_code == 422 and missing.json()["errors"][0]["field"] == "b"

    # per-image predictions: JSON lines and CSV, from the store
    run = runs[0]
    lines = client.get(f"/runs/{run['id']}/predictions").text.splitlines()
    assert len(lines) == 24
    row = json.loads(lines[0])
    assert row["true_label"] in SEPARABLE and len(row["predictions"]) == 3
    assert abs(sum(p["probability"] for p in row["predictions"]) - 1.0) < 1e-3
    table = list(csv.DictReader(io.StringIO(client.get(
        f"/runs/{run['id']}/predictions", params={"format": "csv"}).text)))  # fmt: skip
    assert len(table) == 24 and table[0]["top1_label"] in SEPARABLE

    # every run's predictions at once, each row saying its run, setting and seed
    response = client.get(f"/experiments/{experiment['id']}/predictions")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/csv")
    every = list(csv.DictReader(io.StringIO(response.text)))
    assert len(every) == 8 * 24
    assert {r["run_id"] for r in every} == {r["id"] for r in runs}
    first = [r for r in every if r["run_id"] == run["id"]]
    assert [r["image_id"] for r in first] == [json.loads(line)["image_id"] for line in lines]
    assert first[0]["seed"] == str(run["config"]["seed"])
    assert first[0]["setting"] == next(
        e["label"] for e in report["settings"] if run["id"] in e["runs"])  # fmt: skip
    synthetic_rows = [r for r in every if r["synthetic_per_real"] == "2"]
    assert synthetic_rows and all(r["strategy"] == "inpaint" for r in synthetic_rows)
    jsonl = client.get(f"/experiments/{experiment['id']}/predictions", params={"format": "jsonl"})
    assert len(jsonl.text.splitlines()) == 8 * 24
    assert json.loads(jsonl.text.splitlines()[0])["predictions"][0]["label"] in SEPARABLE
    bad = client.get(f"/experiments/{experiment['id']}/predictions", params={"format": "xml"})
    assert bad.status_code == 422 and "format" in bad.text

    # plots: PNG and SVG of each figure the experiment lists
    assert [path.rsplit("/", 1)[1] for path in done["plots"]] == [
        "accuracy-vs-n-real.png", "dose-response.png", "skin-tone.png",
        "skin-tone-difference.png", "training-curves.png",
    ]  # fmt: skip
    for name in ("accuracy-vs-n-real", "dose-response", "skin-tone", "skin-tone-difference",
                 "training-curves"):  # fmt: skip
        png = client.get(f"/experiments/{experiment['id']}/plots/{name}.png")
        assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n", name
        svg = client.get(f"/experiments/{experiment['id']}/plots/{name}.svg")
        assert svg.status_code == 200 and b"<svg" in svg.content[:500], name
    assert client.get(f"/experiments/{experiment['id']}/plots/nope.png").status_code == 404
    curve = client.get(f"/runs/{run['id']}/plots/training-curves.svg")
    assert curve.status_code == 200 and curve.headers["content-type"].startswith("image/svg")

    # the feature cache holds each image's vector once per transform
    assert count_rows(stack, "SELECT count(*) FROM feature_cache") > 0
    with stack.session() as session:
        duplicates = session.execute(
            text(
                "SELECT count(*) FROM (SELECT sha256, backbone, transform FROM feature_cache "
                "GROUP BY 1, 2, 3 HAVING count(*) > 1) d"
            )
        ).scalar_one()
    assert duplicates == 0

    # submitted again: every run reuses a finished twin's results instead of training
    again = client.post("/experiments", json=body).json()
    redone = wait_experiment(stack, client, again["id"])
    by_config = {json.dumps(r["config"], sort_keys=True): r for r in runs}
    for twin in redone["runs"]:
        original = by_config[json.dumps(twin["config"], sort_keys=True)]
        assert twin["reused_from"] == original["id"]
        assert twin["metrics"] == original["metrics"]

    # code that computes runs differently (RESULTS_VERSION bumped) does not reuse them: the
    # API's own create_experiment, run here with the bumped version against the same
    # database (the API is another process), gives every run a key no finished run has
    monkeypatch.setattr(grid, "RESULTS_VERSION", grid.RESULTS_VERSION + 1)
    keys = "SELECT DISTINCT config_key FROM runs WHERE job_id IN (:a, :b)"
    session = session_factory(stack.settings.database_url)()
    try:
        owner = session.get(ApiKey, session.get(Job, experiment["id"]).owner_id)
        fresh, created = runs_module.create_experiment(
            session=session, settings=stack.settings, params=ExperimentCreate(**body), owner=owner
        )
        assert created
        new_keys = set(session.execute(text(keys), {"a": fresh.id, "b": fresh.id}))
        old_keys = set(session.execute(text(keys), {"a": experiment["id"], "b": again["id"]}))
    finally:
        session.rollback()  # nothing of it is stored
        session.close()
    assert len(new_keys) == len(old_keys) == len(runs) and not new_keys & old_keys


def test_augmentation_and_the_uncached_path_train(data) -> None:
    stack, client, real, _synthetic = data
    # one run, the paper's path: every epoch through the frozen body, augmented
    response = client.post(
        "/runs",
        json={"dataset": real, "n_real_per_class": 6, "augmentation": True,
              "cache_features": False, "seed": 5, **FAST_TRAINING, "max_epochs": 4},
    )  # fmt: skip
    assert response.status_code == 202, response.text
    run = response.json()
    assert response.headers["location"] == f"/runs/{run['id']}"

    def finished() -> dict | None:
        body = client.get(f"/runs/{run['id']}").json()
        return body if body["status"] in ("succeeded", "failed", "canceled") else None

    done = wait_for(finished, timeout=300, interval=0.5, what="run")
    assert done["status"] == "succeeded", (done["error"], stack.worker.log()[-3000:])
    assert done["metrics"]["top1"]["value"] >= 0.6
    assert done["timings"]["features_computed"] == 0  # nothing cached on this path
    assert client.get("/runs").json()["items"][0]["id"] == run["id"]


def test_a_test_set_held_out_per_class_is_the_same_for_every_seed(data) -> None:
    """test_per_class (for datasets without a split, as PH2): one fixed draw per class,
    scored by every run, never trained or validated on."""
    stack, client, real, _synthetic = data
    both = client.post("/experiments", json={"dataset": real, "test_per_class": 6,
                                             "test_dataset": real, **FAST_TRAINING})  # fmt: skip
    assert both.status_code == 422 and "test_per_class" in both.text, both.text
    body = {"dataset": real, "test_per_class": 6, "n_real_per_class": [5], "seeds": [1, 2],
            **FAST_TRAINING}  # fmt: skip
    response = client.post("/experiments", json=body)
    assert response.status_code == 202, response.text
    done = wait_experiment(stack, client, response.json()["id"])
    tested = []
    for run in done["runs"]:
        assert run["split"]["test"] == dict.fromkeys(SEPARABLE, 6)  # the split column unused
        assert run["split"]["train_real"] == dict.fromkeys(SEPARABLE, 5)
        lines = client.get(f"/runs/{run['id']}/predictions").text.splitlines()
        tested.append(sorted(json.loads(line)["image_id"] for line in lines))
        assert run["metrics"]["top1"]["value"] >= 0.6
    assert len(tested[0]) == 6 * len(SEPARABLE) and tested[0] == tested[1]
    with stack.session() as session:
        rows = session.execute(
            text("SELECT config FROM runs WHERE job_id = :j"), {"j": done["id"]}
        ).scalars()
        assert all(config["test_per_class"] == 6 for config in rows)


def test_the_datasets_validation_split_validates_and_never_trains(data) -> None:
    stack, client, real, _synthetic = data
    mark = text(
        "UPDATE images SET split = 'validation' WHERE id IN (SELECT id FROM (SELECT id, "
        "row_number() OVER (PARTITION BY condition ORDER BY id) AS r FROM images WHERE "
        "dataset_id = :d AND split = 'train') t WHERE r <= 3)"
    )
    with stack.session() as session:
        session.execute(mark, {"d": real})
        session.commit()
    response = client.post("/runs", json={"dataset": real, "seed": 3, **FAST_TRAINING})
    assert response.status_code == 202, response.text
    run_id = response.json()["id"]

    def finished() -> dict | None:
        body = client.get(f"/runs/{run_id}").json()
        return body if body["status"] in ("succeeded", "failed", "canceled") else None

    done = wait_for(finished, timeout=300, interval=0.5, what="run")
    assert done["status"] == "succeeded", done["error"]
    # the 3 declared per class (fewer than validation_per_class=8); the other 17 all train
    assert done["split"]["validation"] == dict.fromkeys(SEPARABLE, 3)
    assert done["split"]["train_real"] == dict.fromkeys(SEPARABLE, 17)

    # a class the validation split lacks is named
    with stack.session() as session:
        session.execute(
            text("UPDATE images SET split = 'train' WHERE dataset_id = :d AND split = "
                 "'validation' AND condition = :c"), {"d": real, "c": "acne"})  # fmt: skip
        session.commit()
    refused = client.post("/experiments", json={"dataset": real, **FAST_TRAINING})
    assert refused.status_code == 422, refused.text
    assert "validation split has no images of acne" in refused.text


def test_cancel_stops_a_run_and_resume_finishes_only_the_rest(data) -> None:
    stack, client, real, _synthetic = data
    body = {"dataset": real, "n_real_per_class": [3, 5], "seeds": [1], "cache_features": False,
            **FAST_TRAINING, "max_epochs": 400, "patience": 400}  # fmt: skip
    response = client.post("/experiments", json=body)
    assert response.status_code == 202, response.text
    experiment = response.json()

    def training() -> dict | None:
        runs = client.get(f"/experiments/{experiment['id']}").json()["runs"]
        return runs[0] if runs[0]["progress"]["epoch"] >= 1 else None

    wait_for(training, timeout=120, interval=0.2, what="first epoch")
    canceled = client.post(f"/experiments/{experiment['id']}/cancel")
    assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"

    def stopped() -> dict | None:
        runs = client.get(f"/experiments/{experiment['id']}").json()["runs"]
        return runs if runs[0]["status"] == "canceled" else None

    runs = wait_for(stopped, timeout=30, interval=0.2, what="the run to stop")
    assert runs[0]["progress"]["epoch"] < 400
    assert runs[1]["status"] == "canceled"  # queued: never started
    assert client.post(f"/experiments/{experiment['id']}/cancel").status_code == 409

    # resume with short runs: mark run 1 finished by hand, then only run 0 trains again
    with stack.session() as session:
        session.execute(
            text("UPDATE runs SET status = 'succeeded', metrics = NULL WHERE job_id = :j "
                 "AND index = 1"), {"j": experiment["id"]},
        )  # fmt: skip
        session.execute(
            text("UPDATE job_chunks SET status = 'succeeded', done = 1 WHERE job_id = :j "
                 "AND index = 1"), {"j": experiment["id"]},
        )  # fmt: skip
        config = session.execute(
            text("SELECT config FROM runs WHERE job_id = :j AND index = 0"),
            {"j": experiment["id"]},
        ).scalar_one()
        config = json.loads(config) if isinstance(config, str) else config
        config.update(max_epochs=3, patience=3)
        session.execute(
            text("UPDATE runs SET config = :c WHERE job_id = :j AND index = 0"),
            {"c": json.dumps(config), "j": experiment["id"]},
        )
    resumed = client.post(f"/experiments/{experiment['id']}/resume")
    assert resumed.status_code == 200 and resumed.json()["status"] == "queued"
    done = wait_experiment(stack, client, experiment["id"])
    first, second = done["runs"]
    assert first["status"] == "succeeded" and len(first["history"]) <= 3
    assert second["metrics"] is None  # not redone
    assert client.post(f"/experiments/{experiment['id']}/resume").status_code == 409


def test_bad_requests_name_the_field(deployed: Stack) -> None:
    key = deployed.new_key()
    client = deployed.client(key)
    real, synthetic = make_classification_data(
        deployed, key, pool_per_class=6, test_per_class=2, children_per_parent=1
    )

    def problem(body: dict, path: str = "/experiments") -> dict:
        response = client.post(path, json=body)
        assert response.status_code == 422, response.text
        return response.json()

    assert "no dataset 'nope'" in problem({"dataset": "nope"})["detail"]
    assert "not a real dataset" in problem({"dataset": synthetic})["detail"]
    detail = problem({"dataset": real, "validation_per_class": 40})["detail"]
    assert "validation_per_class=40" in detail and "acne (6)" in detail
    assert "test_split" in problem({"dataset": real, "test_split": "holdout",
                                    "validation_per_class": 2})["detail"]  # fmt: skip
    detail = problem({"dataset": real, "synthetic_per_real": [0, 10], "validation_per_class": 2})
    assert detail["detail"].startswith("synthetic_datasets:")
    detail = problem({"dataset": real, "synthetic_datasets": [real], "validation_per_class": 2})
    assert "not a synthetic dataset" in detail["detail"]
    detail = problem(
        {"dataset": real, "conditions": ["acne", "vitiligo"], "validation_per_class": 2}
    )
    assert "vitiligo" in detail["detail"]
    detail = problem({"dataset": real, "max_epochs": 0})
    assert "max_epochs" in json.dumps(detail)
    # every value of a grid's axis is checked as a run's own field is (n=-1 once trained on
    # images[:-1]); an unknown backbone is refused here, not by every run on the worker
    for body, field in (
        ({"n_real_per_class": [4, -1]}, "n_real_per_class.1"),
        ({"synthetic_per_real": [0, -2]}, "synthetic_per_real.1"),
        ({"seeds": [1, -5]}, "seeds.1"),
        ({"backbone": "resnet9000"}, "backbone"),
        ({"backbone": "timm:"}, "backbone"),
    ):
        errors = problem({"dataset": real, **body})["errors"]
        assert [e["field"] for e in errors] == [field], errors
    message = problem({"dataset": real, "backbone": "resnet9000"}, "/runs")["errors"][0]["message"]
    assert message == (
        "unknown backbone 'resnet9000'; one of efficientnet-lite0, efficientnet-v2-m or "
        "timm:<model name>"
    )
    detail = problem({"dataset": real, "synthetic_per_real": 3, "validation_per_class": 2}, "/runs")
    assert detail["detail"].startswith("synthetic_datasets:")
    # nothing was queued by the refused requests
    assert client.get("/experiments").json()["items"] == []
    assert client.get("/runs/nope").status_code == 404
    # the same idempotency key returns the experiment it made, once
    body = {"dataset": real, "validation_per_class": 2, "n_real_per_class": [1], "seeds": [1],
            "max_epochs": 1, "image_size": 64, "idempotency_key": "grid-1"}  # fmt: skip
    first = client.post("/experiments", json=body)
    again = client.post("/experiments", json=body)
    assert (first.status_code, again.status_code) == (202, 200)
    assert first.json()["id"] == again.json()["id"]
    assert len(client.get("/experiments").json()["items"]) == 1
