"""The `synthderm` client commands against a live server: upload, submit --wait, download
(resumable, verified), through the REST API only."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

from tests.conftest import ROOT, Stack
from tests.helpers import csv_text, make_zip, png


def run_cli(
    stack: Stack, key: str, tmp_path: Path, *args: str, columns: int = 120
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNTHDERM_")}
    env |= {
        "SYNTHDERM_API_URL": stack.base_url,
        "SYNTHDERM_API_KEY": key,
        "SYNTHDERM_CONFIG": str(tmp_path / "no-config.json"),
        "COLUMNS": str(columns),
    }
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def last_json(stdout: str) -> dict:
    start = stdout.index("{")
    return json.loads(stdout[start:])


def test_upload_submit_download_verify(deployed: Stack, tmp_path: Path) -> None:
    key = deployed.new_key()
    archive = tmp_path / "clinic.zip"
    archive.write_bytes(
        make_zip(
            {f"{i}.png": png(i) for i in range(3)}
            | {"metadata.csv": csv_text(["file", "label", "fitzpatrick"],
                                        [[f"{i}.png", "psoriasis", i + 1] for i in range(3)])}
        )
    )  # fmt: skip
    uploaded = run_cli(deployed, key, tmp_path, "datasets", "upload", str(archive), "--name", "c")
    assert uploaded.returncode == 0, uploaded.stdout + uploaded.stderr
    ingest = last_json(uploaded.stdout)
    assert ingest["status"] == "succeeded" and ingest["result"]["accepted"] == 3
    real = ingest["dataset_id"]

    submitted = run_cli(
        deployed, key, tmp_path, "jobs", "submit", "--condition", "psoriasis",
        "--strategy", "image-to-image", "--source-dataset", real, "--k", "2",
        "--strength", "0.5", "--steps", "4", "--negative-prompt", "blurry",
        "--guidance-interval", "0.5,1", "--dataset-name", "psoriasis-variations", "--wait",
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job = last_json(submitted.stdout)
    assert job["status"] == "succeeded" and job["progress"]["done"] == 6

    # listings on a narrow terminal: whole ids (to copy) and whole words, never an ellipsis
    jobs = run_cli(deployed, key, tmp_path, "jobs", "list", columns=60)
    assert jobs.returncode == 0, jobs.stdout + jobs.stderr
    assert job["id"] in jobs.stdout and ingest["id"] in jobs.stdout
    assert "image-to-image" in jobs.stdout and "succeeded" in jobs.stdout
    datasets = run_cli(deployed, key, tmp_path, "datasets", "list", columns=60)
    assert datasets.returncode == 0, datasets.stdout + datasets.stderr
    assert real in datasets.stdout and job["dataset_id"] in datasets.stdout
    assert "psoriasis-variations" in datasets.stdout
    assert "status" in datasets.stdout and "ready" in datasets.stdout  # nothing writes them now
    assert job["params"]["negative_prompt"] == "blurry", job
    assert job["params"]["guidance_interval"] == [0.5, 1.0], job
    assert "…" not in jobs.stdout + datasets.stdout

    folder = tmp_path / "out"
    first = run_cli(deployed, key, tmp_path, "datasets", "download", job["dataset_id"], str(folder))
    assert first.returncode == 0, first.stdout + first.stderr
    assert "downloaded 6, already there 0, failed 0" in first.stdout
    rows = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    for row in rows:
        path = folder / row["condition"] / f"{row['image_id']}.png"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == row["sha256"]

    # resumable: a complete file is kept, a damaged one fetched again
    damaged = folder / rows[0]["condition"] / f"{rows[0]['image_id']}.png"
    damaged.write_bytes(b"half a file")
    again = run_cli(deployed, key, tmp_path, "datasets", "download", job["dataset_id"], str(folder))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "downloaded 1, already there 5, failed 0" in again.stdout
    assert hashlib.sha256(damaged.read_bytes()).hexdigest() == rows[0]["sha256"]

    exported = run_cli(
        deployed, key, tmp_path, "datasets", "export", job["dataset_id"], "--shard-size", "4"
    )
    assert exported.returncode == 0, exported.stdout + exported.stderr
    export = last_json(exported.stdout)
    assert export["kind"] == "export" and export["status"] == "succeeded"
    assert [shard["samples"] for shard in export["result"]["shards"]] == [4, 2]


def test_jobs_conditions_lists_the_keys_own_vocabulary(deployed: Stack, tmp_path: Path) -> None:
    """`synthderm jobs conditions`: the shared conditions and the caller's uploaded labels,
    never another key's (issue 21)."""
    owner, other = deployed.new_key("owner"), deployed.new_key("other")
    label = f"zz cli label {uuid.uuid4().hex[:8]}"
    archive = tmp_path / "labels.zip"
    archive.write_bytes(make_zip({"0.png": png(7), "metadata.csv": csv_text(
        ["file", "label", "fitzpatrick"], [["0.png", label, 2]])}))  # fmt: skip
    uploaded = run_cli(deployed, owner, tmp_path, "datasets", "upload", str(archive))
    assert uploaded.returncode == 0, uploaded.stdout + uploaded.stderr
    slug = label.replace(" ", "-")
    mine = run_cli(deployed, owner, tmp_path, "jobs", "conditions", columns=60)
    theirs = run_cli(deployed, other, tmp_path, "jobs", "conditions", columns=60)
    assert mine.returncode == 0 and theirs.returncode == 0, mine.stderr + theirs.stderr
    assert re.search(rf"{re.escape(slug)}\s+│\s+{re.escape(label)}\s+│\s+yours", mine.stdout)
    assert slug not in theirs.stdout and "yours" not in theirs.stdout
    for listing in (mine.stdout, theirs.stdout):
        assert re.search(r"basal-cell-carcinoma\s+│\s+basal cell carcinoma\s+│\s+shared", listing)


def test_submit_subscribes_a_webhook(deployed: Stack, tmp_path: Path) -> None:
    """`--webhook` and `--webhook-events` on `jobs submit` reach the job (issue 21); events
    without a URL are refused before any request."""
    key = deployed.new_key()
    url = "http://127.0.0.1:9/hooks/synthderm"
    submitted = run_cli(deployed, key, tmp_path, "jobs", "submit", "--condition", "psoriasis",
                        "--count", "1", "--webhook", url, "--webhook-events",
                        "started, completed")  # fmt: skip
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job = last_json(submitted.stdout)
    assert (job["webhook"], job["webhook_events"]) == (url, ["started", "completed"])
    refused = run_cli(deployed, key, tmp_path, "jobs", "submit", "--condition", "psoriasis",
                      "--webhook-events", "completed")  # fmt: skip
    assert refused.returncode == 2 and "--webhook" in refused.stderr
    bad = run_cli(deployed, key, tmp_path, "experiments", "submit", "--dataset", "x",
                  "--webhook", "ftp://example.org/hook")  # fmt: skip
    assert bad.returncode == 1 and "webhook" in bad.stderr


def test_client_reports_api_errors(deployed: Stack, tmp_path: Path) -> None:
    key = deployed.new_key()
    bad = run_cli(deployed, key, tmp_path, "jobs", "submit", "--condition", "nope", "--count", "1")
    assert bad.returncode == 1
    assert "condition" in bad.stderr
    for interval, code in (("0.5", 2), ("0.6,0.2", 1)):  # not a pair; a pair the API refuses
        bad = run_cli(deployed, key, tmp_path, "jobs", "submit", "--condition", "psoriasis",
                      "--count", "1", "--guidance-interval", interval)  # fmt: skip
        assert bad.returncode == code, bad.stdout + bad.stderr
        assert "guidance-interval" in bad.stderr or "guidance_interval" in bad.stderr
    unauthorized = run_cli(deployed, "wrong-key", tmp_path, "datasets", "list")
    assert unauthorized.returncode != 0


def test_a_preset_submits_the_papers_grid_and_options_override_it(
    deployed: Stack, tmp_path: Path
) -> None:
    from tests.factories import make_classification_data

    key = deployed.new_key()
    real, synthetic = make_classification_data(
        deployed, key, pool_per_class=12, test_per_class=4, children_per_parent=1
    )
    submitted = run_cli(
        deployed, key, tmp_path, "experiments", "submit", "--dataset", real, "--preset",
        "paper", "--synthetic", synthetic, "--strategies", "inpaint", "--seeds", "1",
        "--validation-per-class", "4", "--max-epochs", "1",
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    summary = json.loads(submitted.stdout)
    # 7 n_real x (real-only + k=10 inpaint) x augmentation off, on x 1 seed
    assert summary["progress"]["total"] == 7 * 2 * 2
    client = deployed.client(key)
    params = client.get(f"/experiments/{summary['id']}", params={"runs": "false"}).json()["params"]
    assert params["n_real_per_class"] == [1, 8, 16, 32, 64, 128, 228]
    assert params["synthetic_per_real"] == [0, 10] and params["augmentation"] == [False, True]
    assert params["strategies"] == ["inpaint"]  # the command line's, not the preset's two
    assert params["top_n_classes"] == 9 and params["seeds"] == [1]
    assert client.post(f"/experiments/{summary['id']}/cancel").status_code == 200

    unknown = run_cli(deployed, key, tmp_path, "experiments", "submit", "--dataset", real,
                      "--preset", "paper-2023")  # fmt: skip
    assert unknown.returncode != 0
    assert "'paper-2023' is not one of paper, paper-dose-response" in unknown.stderr


def test_experiments_submit_wait_and_report(deployed: Stack, tmp_path: Path) -> None:
    from tests.factories import SEPARABLE, make_classification_data

    key = deployed.new_key()
    real, _synthetic = make_classification_data(
        deployed, key, pool_per_class=12, test_per_class=4, children_per_parent=0
    )
    # what the grid has to work with: images per class and split
    shown = run_cli(deployed, key, tmp_path, "datasets", "show", real)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    by_split = shown.stdout[shown.stdout.index("by split") :]
    assert re.search(r"condition\s+┃\s+test\s+┃\s+train", by_split), by_split
    for condition in SEPARABLE:
        assert re.search(rf"{condition}\s+│\s+4\s+│\s+12", by_split), by_split

    submitted = run_cli(
        deployed, key, tmp_path, "experiments", "submit", "--dataset", real, "--n-real", "2,all",
        "--seeds", "1,2", "--validation-per-class", "4", "--max-epochs", "5", "--patience", "2",
        "--image-size", "96", "--no-cache-features", "--wait",
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    # the table (rich folds its cells at the terminal's width): a row per setting, a summary
    assert "n=2" in submitted.stdout and "n=all" in submitted.stdout
    summary = last_json(submitted.stdout[submitted.stdout.rindex('{\n  "id"') :])
    assert summary["status"] == "succeeded" and summary["progress"]["done"] == 4
    assert "runs: 4 succeeded" in submitted.stdout

    out = tmp_path / "report"
    reported = run_cli(deployed, key, tmp_path, "experiments", "report", summary["id"],
                       "--out", str(out))  # fmt: skip
    assert reported.returncode == 0, reported.stdout + reported.stderr
    # an 80-column terminal: the table comes in panels, each led by the setting, none wider
    narrow = run_cli(deployed, key, tmp_path, "experiments", "report", summary["id"],
                     "--out", str(tmp_path / "again"), columns=80)  # fmt: skip
    assert narrow.returncode == 0, narrow.stdout + narrow.stderr
    assert max(map(len, narrow.stdout.splitlines())) <= 80
    for column in ("top-1 %", "AUROC", "top-1 V-VI %", "Δ top-1 vs real-only (pts, 95% CI)"):
        assert column in narrow.stdout
    assert narrow.stdout.count("│ n=all k=0 ") == narrow.stdout.count("┃ setting ") > 1
    # report.md stands alone: the experiment, its data and protocol, the table, the figures
    markdown = (out / "report.md").read_text()
    name = json.loads((out / "report.json").read_text())["name"]
    assert markdown.startswith(f"# {name}\n\nExperiment `{summary['id']}`: succeeded")
    assert f"Real dataset `{real}` (separable-real)" in markdown
    assert "patience 2, at most 5 epochs" in markdown and "96 px" in markdown
    assert "computed every epoch (the paper's path)" in markdown
    table = [line for line in markdown.splitlines() if line.startswith("|")]
    assert table[0].startswith("| setting |") and len(table) == 4  # header, rule, 2 rows
    figures = re.findall(r"!\[[^]]*\]\(([^)]+)\)", markdown)
    assert len(figures) == 4 and all((out / name).is_file() for name in figures)
    # real-only: no real+synthetic setting to compare per skin tone, so no such figure
    assert not (out / "skin-tone-difference.png").exists()
    saved = json.loads((out / "report.json").read_text())
    assert (saved["params"]["cache_features"], saved["params"]["patience"],
            saved["params"]["image_size"]) == (False, 2, 96)  # fmt: skip
    report = saved["report"]
    assert report["classes"] == sorted(SEPARABLE)
    for name in ("accuracy-vs-n-real", "dose-response", "skin-tone", "training-curves"):
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
        assert b"<svg" in (out / f"{name}.svg").read_bytes()[:500]

    # two settings of the grid, paired on the same test images
    compared = run_cli(deployed, key, tmp_path, "experiments", "compare", summary["id"],
                       "n=all k=0", "n=2 k=0", columns=200)  # fmt: skip
    assert compared.returncode == 0, compared.stdout + compared.stderr
    assert "n=all k=0 (seeds 1, 2) minus n=2 k=0 (seeds 1, 2)" in compared.stdout
    assert re.search(r"│ top-3\s+│ -\s+│ -", compared.stdout)  # 3 classes: always 100%
    for metric in ("top-1", "top-1 V-VI", "gap change"):
        assert re.search(rf"│ {metric}\s+│ [+-]\d+\.\d\s+│ \[", compared.stdout), compared.stdout
    as_json = run_cli(deployed, key, tmp_path, "experiments", "compare", summary["id"],
                      "n=all k=0", "n=2 k=0", "--json")  # fmt: skip
    assert json.loads(as_json.stdout)["top1"]["n_images"] == 4 * len(SEPARABLE)
    wrong = run_cli(deployed, key, tmp_path, "experiments", "compare", summary["id"],
                    "n=3 k=0", "n=2 k=0")  # fmt: skip
    assert wrong.returncode != 0 and "a: no finished setting is labelled 'n=3 k=0'" in (
        wrong.stdout + wrong.stderr
    )

    # every run's predictions in one CSV: 4 runs x 4 classes x 4 test images
    table = tmp_path / "predictions.csv"
    saved = run_cli(deployed, key, tmp_path, "experiments", "predictions", summary["id"],
                    "--out", str(table))  # fmt: skip
    assert saved.returncode == 0, saved.stdout + saved.stderr
    rows = list(csv.DictReader(table.open()))
    assert len(rows) == 4 * len(SEPARABLE) * 4
    assert {(r["setting"], r["seed"]) for r in rows} == {
        ("n=2 k=0", "1"), ("n=2 k=0", "2"), ("n=all k=0", "1"), ("n=all k=0", "2")}  # fmt: skip
    assert {r["true_label"] for r in rows} == set(SEPARABLE)
    piped = run_cli(deployed, key, tmp_path, "experiments", "predictions", summary["id"],
                    "--format", "jsonl")  # fmt: skip
    assert [json.loads(line)["image_id"] for line in piped.stdout.splitlines()] == [
        r["image_id"] for r in rows]  # fmt: skip

    # a refused grid: the API's sentence, exit 1
    refused = run_cli(deployed, key, tmp_path, "experiments", "submit", "--dataset", real,
                      "--k", "0,5", "--validation-per-class", "4")  # fmt: skip
    assert refused.returncode == 1 and "synthetic_datasets" in refused.stdout + refused.stderr
    refused = run_cli(deployed, key, tmp_path, "experiments", "submit", "--dataset", real)
    assert refused.returncode == 1 and "acne (12)" in refused.stdout + refused.stderr


def test_datasets_list_follows_every_page(deployed: Stack, tmp_path: Path) -> None:
    """Over a page of datasets: the listing shows all of them, newest first, once each."""
    from datetime import UTC, datetime, timedelta

    from app.db.tables import Dataset
    from app.ids import new_id
    from app.keys import authenticate

    key = deployed.new_key()
    base = datetime.now(UTC) - timedelta(days=1)
    with deployed.session() as session:
        owner = authenticate(session=session, raw_key=key)
        assert owner is not None
        datasets = [
            Dataset(
                id=new_id(),
                owner_id=owner.id,
                name=f"bulk-{i}",
                kind="real" if i % 2 else "synthetic",
                created_at=base + timedelta(seconds=i),
            )
            for i in range(75)
        ]
        session.add_all(datasets)
    ids = [d.id for d in datasets]

    def listed(*options: str) -> list[str]:
        result = run_cli(deployed, key, tmp_path, "datasets", "list", *options)
        assert result.returncode == 0, result.stdout + result.stderr
        return re.findall(r"\b[0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12}\b", result.stdout)

    newest_first = ids[::-1]
    assert listed() == newest_first
    assert listed("--page-size", "20") == newest_first  # four requests, every row once
    assert listed("--page-size", "20", "--kind", "real") == newest_first[1::2]  # the odd ones
    assert listed("--limit", "30", "--page-size", "7") == newest_first[:30]


def test_finetunes_submit_wait_show_list_samples_cancel(deployed: Stack, tmp_path: Path) -> None:
    from tests.factories import make_split_dataset

    key = deployed.new_key()
    dataset_id, _ids = make_split_dataset(deployed, key, splits={"folliculitis": {"train": 4}})
    submitted = run_cli(
        deployed, key, tmp_path, "finetunes", "submit", "--dataset", dataset_id,
        "--base-model", "tiny-random", "--name", "cli tune", "--seed", "3",
        "--set", "max_train_steps=4", "--set", "train_batch_size=2",
        "--set", "validation_every_steps=2", "--set", "validation_images=1",
        "--set", "validation_inference_steps=2", "--set", "learning_rate=1e-3", "--wait",
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    finished = last_json(submitted.stdout)
    assert finished["status"] == "succeeded"
    assert finished["hyperparameters"]["max_train_steps"] == 4
    # the live bar showed the steps, the loss and the models
    assert "steps" in submitted.stderr and "models" in submitted.stderr
    finetune_id, family = finished["id"], finished["family_id"]

    shown = last_json(run_cli(deployed, key, tmp_path, "finetunes", "show", finetune_id).stdout)
    assert shown["members"][0]["model_id"] == f"{family}-folliculitis"
    listed = run_cli(deployed, key, tmp_path, "finetunes", "list")
    assert finetune_id in listed.stdout and family in listed.stdout
    out = tmp_path / "samples"
    samples = run_cli(deployed, key, tmp_path, "finetunes", "samples", finetune_id, "--out",
                      str(out))  # fmt: skip
    assert samples.returncode == 0, samples.stderr
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    model = f"{family}-folliculitis"
    assert files == [f"{model}/step-00000002-00.png", f"{model}/step-00000004-00.png"]
    assert (out / files[0]).read_bytes().startswith(b"\x89PNG")

    bad = run_cli(deployed, key, tmp_path, "finetunes", "submit", "--dataset", dataset_id,
                  "--base-model", "tiny-random", "--set", "lora_rank=0",
                  "--method", "lora")  # fmt: skip
    assert bad.returncode == 1 and "lora_rank" in bad.stderr
    queued = last_json(run_cli(
        deployed, key, tmp_path, "finetunes", "submit", "--dataset", dataset_id,
        "--base-model", "tiny-random", "--set", "max_train_steps=100000",
    ).stdout)  # fmt: skip
    canceled = run_cli(deployed, key, tmp_path, "finetunes", "cancel", queued["id"])
    assert last_json(canceled.stdout)["status"] == "canceled"


def test_finetunes_submit_scratch(deployed: Stack, tmp_path: Path) -> None:
    """--method scratch with --scratch-set settings (JSON values: lists too) trains both
    models; a bad setting is refused naming it; --set's hyperparameters are not scratch's."""
    from tests.api.test_finetunes import TINY
    from tests.factories import make_split_dataset

    key = deployed.new_key()
    dataset_id, _ids = make_split_dataset(deployed, key, splits={"folliculitis": {"train": 4}})
    settings = [arg for name, value in TINY.items()
                for arg in ("--scratch-set", f"{name}={json.dumps(value)}")]  # fmt: skip
    submitted = run_cli(
        deployed, key, tmp_path, "finetunes", "submit", "--dataset", dataset_id,
        "--method", "scratch", *settings, "--wait",
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    finished = last_json(submitted.stdout)
    assert finished["status"] == "succeeded" and finished["base_model"] is None
    assert finished["hyperparameters"]["unet_channels"] == [16, 32]
    assert finished["caption_skin_tone"] and finished["joint"]
    models = [m["id"] for m in deployed.client(key).get("/models").json()["items"]]
    assert f"{finished['family_id']}-inpaint" in models

    for args, field in (
        (("--scratch-set", "vae_steps=0"), "scratch.vae_steps"),
        (("--set", "max_train_steps=4"), "max_train_steps"),
        (("--base-model", "tiny-random"), "base_model"),
    ):
        bad = run_cli(deployed, key, tmp_path, "finetunes", "submit", "--dataset", dataset_id,
                      "--method", "scratch", *args)  # fmt: skip
        assert bad.returncode == 1 and field in bad.stderr, bad.stderr


def test_evaluations_submit_wait_report_list_cancel(deployed: Stack, tmp_path: Path) -> None:
    from tests.factories import make_split_dataset

    key = deployed.new_key()
    conditions = ("folliculitis", "basal-cell-carcinoma")
    real, _ids = make_split_dataset(
        deployed, key, splits={c: {"train": 3, "test": 1} for c in conditions}
    )
    client = deployed.client(key)
    first = client.post("/jobs", json={"condition": conditions[0], "count": 2, "seed": 1}).json()
    synthetic = first["dataset_id"]
    second = client.post("/jobs", json={"condition": conditions[1], "count": 2, "seed": 2,
                                        "dataset_id": synthetic}).json()  # fmt: skip
    for job in (first, second):
        assert deployed.wait_job(client, job["id"])["status"] == "succeeded"
    submitted = run_cli(
        deployed, key, tmp_path, "evaluations", "submit", "--synthetic-dataset", synthetic,
        "--real-dataset", real, "--seed", "2", "--wait",
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    finished = last_json(submitted.stdout)
    assert finished["status"] == "succeeded" and finished["result"]["memorisation"]["audited"] == 4

    out = tmp_path / "report"
    report = run_cli(deployed, key, tmp_path, "evaluations", "report", finished["id"], "--out",
                     str(out))  # fmt: skip
    assert report.returncode == 0, report.stderr
    assert "FD (lite0)" in report.stdout and "Copy threshold" in report.stdout
    text = (out / "report.md").read_text()
    assert "## Memorisation audit" in text and "![pca](pca.png)" in text
    assert (out / "pca.png").read_bytes().startswith(b"\x89PNG")
    assert b"<svg" in (out / "contact-sheet.svg").read_bytes()
    for condition in conditions:  # a contact sheet per condition, in report.md and the folder
        assert (out / f"contact-sheet-{condition}.png").read_bytes().startswith(b"\x89PNG")
        assert b"<svg" in (out / f"contact-sheet-{condition}.svg").read_bytes()
        assert f"![contact-sheet-{condition}](contact-sheet-{condition}.png)" in text
    # FD and KID and their floors, each with its interval
    assert "In brackets, 95% intervals" in text
    overall = next(line for line in text.splitlines() if line.startswith("| overall |"))
    assert overall.count(" [") == 4, overall
    assert (out / "pairs.csv").read_text().splitlines()[0].startswith("image_id,")

    listed = run_cli(deployed, key, tmp_path, "evaluations", "list")
    assert finished["id"] in listed.stdout
    shown = last_json(
        run_cli(deployed, key, tmp_path, "evaluations", "show", finished["id"]).stdout
    )
    assert shown["id"] == finished["id"]
    bad = run_cli(deployed, key, tmp_path, "evaluations", "submit", "--synthetic-dataset", real,
                  "--real-dataset", real)  # fmt: skip
    assert bad.returncode == 1 and "synthetic_dataset" in bad.stderr
    queued = last_json(
        run_cli(deployed, key, tmp_path, "evaluations", "submit", "--synthetic-dataset",
                synthetic, "--real-dataset", real).stdout
    )  # fmt: skip
    canceled = run_cli(deployed, key, tmp_path, "evaluations", "cancel", queued["id"])
    assert last_json(canceled.stdout)["status"] in ("canceled", "canceling")
