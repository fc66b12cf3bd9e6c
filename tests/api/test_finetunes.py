"""POST /finetunes end to end (issue 22): the paper's DreamBooth per condition and joint, its
inpainting variant and LoRA, on real photos, through a real worker, database and store; the
registered models generate through POST /jobs."""

from __future__ import annotations

import io
from typing import Any

import httpx
import pytest
from PIL import Image
from sqlalchemy import text

from tests.conftest import Stack, count_rows, wait_for
from tests.factories import make_split_dataset
from tests.helpers import assert_problem

C1, C2 = "folliculitis", "basal-cell-carcinoma"
# a few steps of the tiny model at a learning rate it notices
FAST = {
    "max_train_steps": 4,
    "train_batch_size": 2,
    "learning_rate": 1e-3,
    "checkpoint_every_steps": 2,
    "validation_every_steps": 2,
    "validation_images": 2,
    "validation_inference_steps": 2,
    "seed": 7,
}


def wait_finetune(
    stack: Stack, client: httpx.Client, finetune_id: str, *, timeout: float = 180
) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        body = client.get(f"/finetunes/{finetune_id}").json()
        return body if body["status"] in ("succeeded", "failed", "canceled") else None

    try:
        return wait_for(done, timeout=timeout, interval=0.3, what=f"fine-tune {finetune_id}")
    except AssertionError as error:
        raise AssertionError(f"{error}\nworker log:\n{stack.worker.log()[-4000:]}") from None


def generate(stack: Stack, client: httpx.Client, **body: Any) -> tuple[dict[str, Any], list[bytes]]:
    """A finished generation job and its images' bytes, in index order."""
    response = client.post("/jobs", json={"count": 2, "seed": 11, **body})
    assert response.status_code == 202, response.text
    job = stack.wait_job(client, response.json()["id"])
    with stack.session() as session:
        keys = [
            row[0]
            for row in session.execute(
                text('SELECT storage_key FROM images WHERE job_id = :j ORDER BY "index"'),
                {"j": job["id"]},
            )
        ]
    return job, [stack.store.get_bytes(key) for key in keys]


@pytest.fixture
def lab(stack: Stack) -> tuple[Stack, str, httpx.Client, str, dict[str, dict[str, list[str]]]]:
    key = stack.new_key("lab")
    dataset_id, ids = make_split_dataset(
        stack, key, splits={C1: {"train": 4, "test": 2}, C2: {"train": 4, "test": 2}}
    )
    return stack, key, stack.client(key), dataset_id, ids


def test_dreambooth_per_condition_registers_models_that_generate(lab: Any) -> None:
    stack, _key, client, dataset_id, ids = lab
    response = client.post(
        "/finetunes",
        json={"dataset": dataset_id, "base_model": "tiny-random", "name": "fitz db", **FAST},
    )
    assert response.status_code == 202, response.text
    created = response.json()
    assert response.headers["location"] == f"/finetunes/{created['id']}"
    assert created["method"] == "dreambooth" and created["variant"] == "text-to-image"
    assert created["conditions"] == sorted([C1, C2])
    assert created["training_data"] == {
        "dataset": dataset_id, "split": "train", "note": None, "images": 8, "excluded": 0,
    }  # fmt: skip
    assert created["hyperparameters"]["learning_rate"] == 1e-3
    assert created["hyperparameters"]["adam_weight_decay"] == 1e-2  # the paper's default
    family = created["family_id"]
    assert family.startswith("fitz-db-")

    body = wait_finetune(stack, client, created["id"])
    assert body["status"] == "succeeded", body
    assert [m["status"] for m in body["members"]] == ["succeeded", "succeeded"]
    assert body["progress"] == {"step": 8, "steps": 8, "models_done": 2, "models": 2}
    by_condition = {m["conditions"][0]: m for m in body["members"]}
    for condition, member in by_condition.items():
        assert member["model_id"] == f"{family}-{condition}"
        assert member["registered"] and member["train_images"] == 4
        assert member["step"] == member["steps"] == 4 and member["final_loss"] > 0
        assert len(member["weights_sha256"]) == 64

    # lineage: exactly the train split of each condition, never its test images
    with stack.session() as session:
        for index, condition in enumerate(sorted([C1, C2])):
            trained = {
                r[0]
                for r in session.execute(
                    text('SELECT image_id FROM finetune_images WHERE job_id = :j AND "index" = :i'),
                    {"j": created["id"], "i": index},
                )
            }
            assert trained == set(ids[condition]["train"])
    # the loss of every step, the samples of steps 2 and 4 (2 images each), the figures
    assert count_rows(stack, "SELECT count(*) FROM finetune_losses WHERE job_id = :j",
                      j=created["id"]) == 8  # fmt: skip
    samples = client.get(f"/finetunes/{created['id']}/samples").json()["items"]
    assert sorted((s["model_id"], s["step"]) for s in samples) == sorted(
        (f"{family}-{c}", step) for c in (C1, C2) for step in (2, 2, 4, 4)
    )
    png = client.get(samples[0]["url"].removeprefix(stack.base_url))
    assert png.status_code == 200 and Image.open(io.BytesIO(png.content)).size == (64, 64)
    plot = client.get(f"/finetunes/{created['id']}/plots/loss.png")
    assert plot.status_code == 200 and plot.content.startswith(b"\x89PNG")
    assert client.get(f"/finetunes/{created['id']}/plots/loss.svg").text.lstrip().startswith("<")

    # registered: listed with their training, and named by the family in POST /jobs
    models = {m["id"]: m for m in client.get("/models").json()["items"]}
    member = models[f"{family}-{C1}"]
    assert member["base_model"] == "tiny-random" and member["condition"] == C1
    assert member["training"]["finetune_id"] == created["id"]
    assert member["training"]["method"] == "dreambooth"
    assert member["training"]["train_images"] == 4 and member["training"]["steps"] == 4
    job, tuned = generate(stack, client, condition=C1, model=family)
    assert job["model"] == f"{family}-{C1}"
    _base_job, base = generate(stack, client, condition=C1, model="tiny-random")
    assert tuned != base  # same seed and prompt, other weights
    assert (
        count_rows(
            stack,
            "SELECT count(*) FROM images WHERE job_id = :j AND model_id = :m",
            j=job["id"],
            m=f"{family}-{C1}",
        )
        == 2
    )
    # a family without the job's condition, and another key, are refused by name
    assert_problem(
        client.post("/jobs", json={"condition": "psoriasis", "count": 1, "model": family}),
        422,
        "model",
    )
    stranger = stack.client(stack.new_key("stranger"))
    assert family not in str(stranger.get("/models").json())
    assert_problem(
        stranger.post("/jobs", json={"condition": C1, "count": 1, "model": family}), 422, "model"
    )
    assert stranger.get(f"/finetunes/{created['id']}").status_code == 404


def test_bad_requests_are_refused_by_field_and_create_nothing(embedded: Stack) -> None:
    stack = embedded
    key = stack.new_key("lab")
    client = stack.client(key)
    dataset_id, _ids = make_split_dataset(stack, key, splits={C1: {"train": 3}, C2: {"test": 2}})
    other_dataset, _ = make_split_dataset(stack, stack.new_key("other"), splits={C1: {"train": 2}})
    good = {"dataset": dataset_id, "base_model": "tiny-random", "conditions": [C1], **FAST}
    cases = [
        ({"dataset": "no-such-dataset"}, "dataset"),
        ({"dataset": other_dataset}, "dataset"),  # another key's is unknown
        ({"base_model": "no-such-model"}, "base_model"),
        ({"variant": "inpaint"}, "base_model"),  # a text-to-image base cannot inpaint
        ({"base_model": "tiny-random-inpaint"}, "base_model"),
        ({"conditions": ["no-such-condition"]}, "conditions"),
        ({"conditions": [C2]}, "conditions"),  # no training images of it (only test)
        ({"train_split": "validation"}, "train_split"),
        ({"train_batch_size": 4}, "train_batch_size"),  # 3 training images
        ({"method": "lora", "lora_rank": 0}, "lora_rank"),
        ({"method": "lora", "lora_rank": 300}, "lora_rank"),
        ({"method": "lora", "lora_target_modules": ["conv_in"]}, "lora_target_modules.0"),
        ({"exclude_datasets": [other_dataset]}, "exclude_datasets"),
        ({"resolution": 60}, "resolution"),
        ({"learning_rate": 0}, "learning_rate"),
        ({"unknown_field": 1}, "unknown_field"),
    ]
    for change, field in cases:
        assert_problem(client.post("/finetunes", json={**good, **change}), 422, field)
    # excluding the dataset's own images leaves nothing to train
    assert_problem(
        client.post("/finetunes", json={**good, "exclude_datasets": [dataset_id]}),
        422,
        "conditions",
    )
    with stack.session() as session:
        owner = session.execute(
            text("SELECT owner_id FROM datasets WHERE id = :d"), {"d": dataset_id}
        ).scalar_one()
    assert count_rows(stack, "SELECT count(*) FROM jobs WHERE owner_id = :o", o=owner) == 0
    assert client.get("/finetunes").json()["items"] == []
    assert client.get("/finetunes/nope").status_code == 404


def test_loras_of_one_base_serve_alternating_jobs_without_a_reload(deployed: Stack) -> None:
    """A per-condition LoRA fine-tune gives two adapters of tiny-random; jobs alternate
    between them and the base on one loaded pipeline: no load after the first, and each
    model's images are the same whenever it comes back."""
    stack = deployed
    key = stack.new_key("lab")
    client = stack.client(key)
    dataset_id, _ids = make_split_dataset(stack, key, splits={C1: {"train": 4}, C2: {"train": 4}})
    response = client.post(
        "/finetunes",
        json={"dataset": dataset_id, "base_model": "tiny-random", "method": "lora",
              "lora_rank": 4, **FAST, "learning_rate": 5e-2},
    )  # fmt: skip
    assert response.status_code == 202, response.text
    body = wait_finetune(stack, client, response.json()["id"])
    assert body["status"] == "succeeded", body
    family = body["family_id"]
    models = {m["id"]: m for m in client.get("/models").json()["items"]}
    assert models[f"{family}-{C1}"]["training"]["method"] == "lora"
    assert models[f"{family}-{C1}"]["base_model"] == "tiny-random"

    _job, base = generate(stack, client, condition=C1, model="tiny-random")
    mark = len(stack.worker.log())
    _job, lora1 = generate(stack, client, condition=C1, model=family)
    _job, lora2 = generate(stack, client, condition=C2, model=family)
    assert lora2 not in (lora1, base)
    _job, base_again = generate(stack, client, condition=C1, model="tiny-random")
    _job, lora1_again = generate(stack, client, condition=C1, model=family)
    assert lora1 != base and base_again == base and lora1_again == lora1
    _job, lora2_as_c1 = generate(stack, client, condition=C1, model=f"{family}-{C2}")
    assert lora2_as_c1 not in (lora1, base)  # the other adapter, same prompt and seed
    since = stack.worker.log()[mark:]
    assert "loading pipeline" not in since, since[-3000:]
    assert since.count("applied to the loaded tiny-random") == 2


def test_inpaint_variant_trains_the_nine_channel_unet(stack: Stack) -> None:
    key = stack.new_key("lab")
    client = stack.client(key)
    dataset_id, _ids = make_split_dataset(stack, key, splits={C1: {"train": 4}})
    response = client.post(
        "/finetunes",
        json={"dataset": dataset_id, "base_model": "tiny-random-inpaint", "variant": "inpaint",
              "joint": True, **FAST},
    )  # fmt: skip
    assert response.status_code == 202, response.text
    body = wait_finetune(stack, client, response.json()["id"])
    assert body["status"] == "succeeded", body
    (member,) = body["members"]
    assert member["model_id"] == body["family_id"]  # a joint model is the family itself
    models = {m["id"]: m for m in client.get("/models").json()["items"]}
    assert models[body["family_id"]]["pipeline_class"] == "StableDiffusionInpaintPipeline"
    assert models[body["family_id"]]["condition"] is None
    job, images = generate(
        stack, client, condition=C1, model=body["family_id"], strategy="inpaint",
        source_dataset=dataset_id,
    )  # fmt: skip
    assert job["model"] == body["family_id"] and len(images) == 2
    # a text-to-image job cannot use an inpainting model
    assert_problem(
        client.post("/jobs", json={"condition": C1, "count": 1, "model": body["family_id"]}),
        422,
        "model",
    )


LONG = {**FAST, "max_train_steps": 40, "checkpoint_every_steps": 10,
        "validation_every_steps": 1000, "validation_images": 0}  # fmt: skip


def _member(client: httpx.Client, finetune_id: str) -> dict[str, Any]:
    return client.get(f"/finetunes/{finetune_id}").json()["members"][0]


def test_cancel_mid_run_registers_no_model(stack: Stack) -> None:
    key = stack.new_key("lab")
    client = stack.client(key)
    dataset_id, _ids = make_split_dataset(stack, key, splits={C1: {"train": 4}})
    body = {"dataset": dataset_id, "base_model": "tiny-random", **LONG, "max_train_steps": 5000}
    finetune = client.post("/finetunes", json=body).json()
    wait_for(lambda: _member(client, finetune["id"])["step"] >= 2, timeout=120, what="training")
    canceled = client.post(f"/finetunes/{finetune['id']}/cancel")
    assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
    wait_for(
        lambda: _member(client, finetune["id"])["status"] == "canceled", timeout=60, what="stop"
    )
    member = _member(client, finetune["id"])
    assert not member["registered"] and member["step"] < 5000
    assert finetune["family_id"] not in str(client.get("/models").json())
    assert (
        count_rows(
            stack, "SELECT count(*) FROM generator_models WHERE finetune_id = :f", f=finetune["id"]
        )
        == 0
    )
    assert client.post(f"/finetunes/{finetune['id']}/cancel").status_code == 409


def test_killed_worker_resumes_to_bit_identical_weights(deployed: Stack) -> None:
    """SIGKILL after the first checkpoint; the recovery step re-sends the member, which resumes
    from the checkpoint and ends with the weights of an uninterrupted run of the same seed."""
    stack = deployed
    key = stack.new_key("lab")
    client = stack.client(key)
    dataset_id, _ids = make_split_dataset(stack, key, splits={C1: {"train": 4}})
    body = {"dataset": dataset_id, "base_model": "tiny-random", **LONG}
    whole = wait_finetune(stack, client, client.post("/finetunes", json=body).json()["id"])
    assert whole["status"] == "succeeded", whole

    killed = client.post("/finetunes", json=body).json()
    wait_for(
        lambda: (_member(client, killed["id"])["checkpoint_step"] or 0) >= 10,
        timeout=120,
        interval=0.05,
        what="the first checkpoint",
    )
    stack.worker.kill()
    at_kill = _member(client, killed["id"])
    assert at_kill["status"] == "running" and at_kill["step"] < 40
    stack.worker.start()
    resumed = wait_finetune(stack, client, killed["id"])
    assert resumed["status"] == "succeeded", resumed
    assert "resuming at step" in stack.worker.log_since_start()
    assert resumed["members"][0]["weights_sha256"] == whole["members"][0]["weights_sha256"]
    # one loss per step, the steps trained again after the checkpoint not counted twice
    assert (
        count_rows(stack, "SELECT count(*) FROM finetune_losses WHERE job_id = :j", j=killed["id"])
        == 40
    )


def test_experiments_refuse_generators_that_saw_their_held_out_images(embedded: Stack) -> None:
    stack = embedded
    key = stack.new_key("lab")
    client = stack.client(key)
    per_class = {"train": 4, "validation": 2, "test": 2}
    dataset_id, ids = make_split_dataset(stack, key, splits={C1: per_class, C2: per_class})
    finetune = client.post(
        "/finetunes", json={"dataset": dataset_id, "base_model": "tiny-random", **FAST}
    ).json()
    body = wait_finetune(stack, client, finetune["id"])
    assert body["status"] == "succeeded", body
    synthetic = None
    for condition in (C1, C2):
        job, _images = generate(
            stack, client, condition=condition, model=body["family_id"],
            **({"dataset_id": synthetic} if synthetic else {"dataset_name": "tuned"}),
        )  # fmt: skip
        synthetic = job["dataset_id"]
    experiment = {"dataset": dataset_id, "synthetic_datasets": [synthetic],
                  "synthetic_per_real": [0], "validation_per_class": 1, "seeds": [1],
                  "max_epochs": 1}  # fmt: skip

    # validation and test come from splits the generators never saw: accepted, nothing said
    clean = client.post("/experiments", json=experiment)
    assert clean.status_code == 202, clean.text
    assert "generator_leakage" not in clean.json()["params"]
    # testing on the split the generators trained on is refused, naming the models
    leaky = {**experiment, "test_split": "train"}
    problem = assert_problem(client.post("/experiments", json=leaky), 422, "synthetic_datasets")
    assert f"{body['family_id']}-{C1}" in problem["detail"]
    allowed = client.post("/experiments", json={**leaky, "allow_generator_leakage": True})
    assert allowed.status_code == 202, allowed.text
    seen = allowed.json()["params"]["generator_leakage"]["models"]
    assert seen == {
        f"{body['family_id']}-{c}": {"validation_images": 0, "test_images": len(ids[c]["train"])}
        for c in (C1, C2)
    }
    assert allowed.json()["report"]["generator_leakage"] == {"models": seen}
    for response in (clean, allowed):
        client.post(f"/experiments/{response.json()['id']}/cancel")


def test_broker_flushed_mid_run_still_trains_every_model(deployed: Stack) -> None:
    import redis

    stack = deployed
    key = stack.new_key("lab")
    client = stack.client(key)
    dataset_id, _ids = make_split_dataset(stack, key, splits={C1: {"train": 4}, C2: {"train": 4}})
    body = {"dataset": dataset_id, "base_model": "tiny-random", **LONG, "max_train_steps": 12}
    finetune = client.post("/finetunes", json=body).json()
    wait_for(lambda: _member(client, finetune["id"])["step"] >= 1, timeout=120, what="training")
    broker = redis.Redis.from_url(stack.settings.broker_url)
    broker.flushdb()  # Redis restarted empty: the second model's message is gone
    broker.set("synthderm:test-run-lock", "held", ex=3600)  # keep this run's db index
    done = wait_finetune(stack, client, finetune["id"])
    assert done["status"] == "succeeded", done
    assert [m["registered"] for m in done["members"]] == [True, True]


def test_a_failing_model_leaves_the_others_registered(embedded: Stack) -> None:
    """One condition's photo vanished from the store: its model fails with the reason, the
    other condition's model still trains and is registered, and the fine-tune ends failed."""
    stack = embedded
    key = stack.new_key("lab")
    client = stack.client(key)
    dataset_id, ids = make_split_dataset(stack, key, splits={C1: {"train": 4}, C2: {"train": 4}})
    with stack.session() as session:
        lost = session.execute(
            text("SELECT storage_key FROM images WHERE id = :i"), {"i": ids[C2]["train"][0]}
        ).scalar_one()
    stack.store.delete(lost)
    finetune = client.post(
        "/finetunes", json={"dataset": dataset_id, "base_model": "tiny-random", **FAST}
    ).json()
    body = wait_finetune(stack, client, finetune["id"])
    assert body["status"] == "failed", body
    members = {m["conditions"][0]: m for m in body["members"]}
    assert members[C1]["status"] == "succeeded" and members[C1]["registered"]
    assert members[C2]["status"] == "failed" and not members[C2]["registered"]
    assert lost in members[C2]["error"] or "NotFound" in members[C2]["error"]
    assert body["error"]
    models = [m["id"] for m in client.get("/models").json()["items"]]
    assert members[C1]["model_id"] in models and members[C2]["model_id"] not in models


# method scratch (issue 24): a generator of its own, at a size that trains in seconds
TINY = {
    "resolution": 64, "vae_channels": [8, 16, 16], "vae_steps": 4, "vae_batch_size": 4,
    "text_width": 32, "text_layers": 1, "text_heads": 2, "unet_channels": [16, 32],
    "unet_layers_per_block": 1, "unet_heads": 2, "unet_steps": 4, "unet_batch_size": 4,
    "inpaint_steps": 4, "latent_views": 1, "checkpoint_every_steps": 2,
    "validation_every_steps": 4,
}  # fmt: skip


def _safetensors_dtypes(data: bytes) -> set[str]:
    import json
    import struct

    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


def test_scratch_trains_both_generators_that_jobs_then_use(deployed: Stack) -> None:
    stack = deployed
    key = stack.new_key("lab")
    client = stack.client(key)
    dataset_id, _ids = make_split_dataset(
        stack, key, splits={C1: {"train": 4, "test": 1}, C2: {"train": 4}}
    )
    response = client.post(
        "/finetunes",
        json={"dataset": dataset_id, "method": "scratch", "name": "own", "seed": 5,
              "scratch": TINY},
    )  # fmt: skip
    assert response.status_code == 202, response.text
    created = response.json()
    family = created["family_id"]
    assert created["method"] == "scratch" and created["base_model"] is None
    assert created["joint"] and created["caption_skin_tone"]  # scratch's defaults
    assert created["conditions"] == sorted([C1, C2])
    assert created["training_data"]["images"] == 8
    assert created["hyperparameters"]["vae_channels"] == [8, 16, 16]
    assert created["hyperparameters"]["vae_kl_weight"] == 1e-6  # the default model's
    (member,) = created["members"]
    assert member["model_id"] == family and member["stage"] == "autoencoder"

    body = wait_finetune(stack, client, created["id"])
    assert body["status"] == "succeeded", body
    (member,) = body["members"]
    assert member["registered"] and member["stage"] is None
    assert member["step"] == member["steps"] == 12  # 4 per stage, counted as one run
    assert body["progress"] == {"step": 12, "steps": 12, "models_done": 1, "models": 1}
    assert count_rows(stack, "SELECT count(*) FROM finetune_losses WHERE job_id = :j",
                      j=created["id"]) == 12  # fmt: skip
    # 8 validation images at the end of each UNet stage (global steps 8 and 12)
    samples = client.get(f"/finetunes/{created['id']}/samples").json()["items"]
    assert sorted({(s["stage"], s["step"]) for s in samples}) == [
        ("inpaint", 12), ("text-to-image", 8),
    ]  # fmt: skip
    assert len(samples) == 16 and "Fitzpatrick" in samples[0]["prompt"]
    png = client.get(samples[0]["url"].removeprefix(stack.base_url))
    assert Image.open(io.BytesIO(png.content)).size == (64, 64)

    # two models, full pipelines in the store as fp16 safetensors
    models = {m["id"]: m for m in client.get("/models").json()["items"]}
    text_model, inpaint_model = models[family], models[f"{family}-inpaint"]
    assert text_model["pipeline_class"] == "StableDiffusionPipeline"
    assert inpaint_model["pipeline_class"] == "StableDiffusionInpaintPipeline"
    for model, variant in ((text_model, "text-to-image"), (inpaint_model, "inpaint")):
        training = model["training"]
        assert model["base_model"] is None and model["condition"] is None
        assert training["method"] == "scratch" and training["variant"] == variant
        assert training["train_images"] == 8 and training["steps"] == 12
        assert [(s["stage"], s["steps"]) for s in training["stages"]] == [
            ("autoencoder", 4), ("text-to-image", 4), ("inpaint", 4),
        ]  # fmt: skip
        assert all(s["final_loss"] > 0 for s in training["stages"])
        assert training["reconstruction_psnr_db"] > 0
    assert text_model["weights_sha256"] != inpaint_model["weights_sha256"]
    with stack.session() as session:
        prefix = session.execute(
            text("SELECT weights_key FROM generator_models WHERE id = :m"), {"m": family}
        ).scalar_one()
    unet = stack.store.get_bytes(f"{prefix}/unet/diffusion_pytorch_model.safetensors")
    assert _safetensors_dtypes(unet) == {"F16"}
    assert b"StableDiffusionPipeline" in stack.store.get_bytes(f"{prefix}/model_index.json")

    # jobs: the family names the text-to-image model, or for an inpaint job its sibling
    job, images = generate(stack, client, condition=C1, model=family, skin_tone=5)
    assert job["model"] == family and len(images) == 2
    assert Image.open(io.BytesIO(images[0])).size == (64, 64)
    job, images = generate(stack, client, condition=C2, model=family,
                           strategy="image-to-image", source_dataset=dataset_id)  # fmt: skip
    assert job["model"] == family and len(images) == 2
    job, images = generate(stack, client, condition=C1, model=family, strategy="inpaint",
                           source_dataset=dataset_id)  # fmt: skip
    assert job["model"] == f"{family}-inpaint" and len(images) == 2
    assert Image.open(io.BytesIO(images[0])).size == (64, 64)
    with stack.session() as session:
        used = session.execute(
            text("SELECT DISTINCT model_id FROM images WHERE job_id = :j"), {"j": job["id"]}
        ).scalar_one()
    assert used == f"{family}-inpaint"
    # the inpaint model by its own id refuses a text-to-image job; another key sees neither
    assert_problem(
        client.post("/jobs", json={"condition": C1, "count": 1, "model": f"{family}-inpaint"}),
        422,
        "model",
    )
    stranger = stack.client(stack.new_key("stranger"))
    assert_problem(
        stranger.post("/jobs", json={"condition": C1, "count": 1, "model": family}), 422, "model"
    )


def test_scratch_bad_requests_are_refused_by_field_and_create_nothing(embedded: Stack) -> None:
    stack = embedded
    key = stack.new_key("lab")
    client = stack.client(key)
    dataset_id, _ids = make_split_dataset(stack, key, splits={C1: {"train": 3}})
    good = {"dataset": dataset_id, "method": "scratch", "scratch": TINY}
    cases = [
        ({"scratch": {**TINY, "vae_steps": 0}}, "scratch.vae_steps"),
        ({"scratch": {**TINY, "resolution": 30}}, "scratch.resolution"),
        ({"scratch": {**TINY, "resolution": 68}}, "scratch.resolution"),  # 8s for the UNet
        ({"scratch": {**TINY, "unet_channels": [16, 20]}}, "scratch.unet_channels.1"),
        ({"scratch": {**TINY, "unet_channels": [16]}}, "scratch.unet_channels"),
        ({"scratch": {**TINY, "text_heads": 3}}, "scratch.text_heads"),  # 32 % 3
        ({"scratch": {**TINY, "caption_dropout": 1}}, "scratch.caption_dropout"),
        ({"scratch": {**TINY, "seed": 1}}, "scratch.seed"),  # the fine-tune's seed is
        ({"scratch": {**TINY, "unet_batch_size": 4}}, "scratch.unet_batch_size"),  # 3 images
        ({"base_model": "tiny-random"}, "base_model"),
        ({"variant": "inpaint"}, "variant"),
        ({"joint": False}, "joint"),
        ({"learning_rate": 1e-5}, "learning_rate"),
        ({"max_train_steps": 4, "lora_rank": 8}, "lora_rank"),
        ({"method": "dreambooth"}, "base_model"),  # the other methods still need one
        ({"method": "lora", "scratch": None}, "base_model"),
        ({"method": "dreambooth", "base_model": "tiny-random"}, "scratch"),
    ]
    for change, field in cases:
        assert_problem(client.post("/finetunes", json={**good, **change}), 422, field)
    assert client.get("/finetunes").json()["items"] == []
    with stack.session() as session:
        owner = session.execute(
            text("SELECT owner_id FROM datasets WHERE id = :d"), {"d": dataset_id}
        ).scalar_one()
    assert count_rows(stack, "SELECT count(*) FROM jobs WHERE owner_id = :o", o=owner) == 0
    # variant text-to-image is what scratch makes first: accepted, as are explicit defaults
    accepted = client.post("/finetunes", json={**good, "variant": "text-to-image",
                                               "joint": True, "scratch": {**TINY,
                                               "unet_batch_size": 3}})  # fmt: skip
    assert accepted.status_code == 202, accepted.text
    client.post(f"/finetunes/{accepted.json()['id']}/cancel")


def test_scratch_cancel_and_a_killed_worker_resume(deployed: Stack) -> None:
    """SIGKILL after the first checkpoint: the member resumes from it and finishes, one loss
    row per step; a second fine-tune canceled mid-run registers nothing."""
    stack = deployed
    key = stack.new_key("lab")
    client = stack.client(key)
    dataset_id, _ids = make_split_dataset(stack, key, splits={C1: {"train": 4}})
    long = {**TINY, "vae_steps": 12, "unet_steps": 8, "inpaint_steps": 4,
            "checkpoint_every_steps": 4, "validation_every_steps": 1000}  # fmt: skip
    killed = client.post(
        "/finetunes", json={"dataset": dataset_id, "method": "scratch", "scratch": long}
    ).json()
    wait_for(
        lambda: (_member(client, killed["id"])["checkpoint_step"] or 0) >= 4,
        timeout=120,
        interval=0.05,
        what="the first checkpoint",
    )
    stack.worker.kill()
    at_kill = _member(client, killed["id"])
    assert at_kill["status"] == "running" and at_kill["step"] < 24, at_kill
    stack.worker.start()
    resumed = wait_finetune(stack, client, killed["id"])
    assert resumed["status"] == "succeeded", resumed
    assert "resuming at step" in stack.worker.log_since_start()
    assert (
        count_rows(stack, "SELECT count(*) FROM finetune_losses WHERE job_id = :j", j=killed["id"])
        == 24
    )
    models = [m["id"] for m in client.get("/models").json()["items"]]
    assert {killed["family_id"], f"{killed['family_id']}-inpaint"} <= set(models)

    canceled = client.post(
        "/finetunes",
        json={"dataset": dataset_id, "method": "scratch",
              "scratch": {**long, "vae_steps": 100_000}},
    ).json()  # fmt: skip
    wait_for(lambda: _member(client, canceled["id"])["step"] >= 2, timeout=120, what="training")
    assert _member(client, canceled["id"])["stage"] == "autoencoder"
    assert client.post(f"/finetunes/{canceled['id']}/cancel").status_code == 200
    wait_for(
        lambda: _member(client, canceled["id"])["status"] == "canceled", timeout=60, what="stop"
    )
    assert canceled["family_id"] not in str(client.get("/models").json())
