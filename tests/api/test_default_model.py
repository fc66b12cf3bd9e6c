"""The project's own generator (issue 24), as committed under models/synthderm-fitz64: every
`db upgrade` registers it, it loads offline, and every strategy runs it through a real worker.
The inpainting strategies give back the parent's own pixels outside their masks."""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image
from sqlalchemy import text

from app.vocabulary import BUILTIN_MODELS, weights_sha256
from models.masks import central_mask, frame_mask
from models.parents import load_parent
from tests.api.test_finetunes import FAST, generate, wait_finetune
from tests.conftest import ROOT, Stack
from tests.factories import make_split_dataset

CONDITION = "folliculitis"  # seeded in every key's vocabulary, and one the model trained on


def test_the_committed_model_is_small_registered_and_documented(stack: Stack) -> None:
    folder = ROOT / "models" / "synthderm-fitz64"
    weights = [p for p in folder.rglob("*.safetensors")]
    assert len(weights) == 6  # vae, text encoder, unet of each of the two pipelines
    assert sum(p.stat().st_size for p in weights) <= 50 * 2**20  # the 50 MB
    training = json.loads((folder / "training.json").read_text())
    assert training["data"]["split"] == "train" and training["data"]["images"] > 2000
    assert "research" in (folder / "MODEL_CARD.md").read_text().lower()
    client = stack.client(stack.new_key())
    models = {row["id"]: row for row in client.get("/models").json()["items"]}
    for model_id, relative in BUILTIN_MODELS.items():
        assert models[model_id]["weights_sha256"] == weights_sha256(ROOT / relative)
    assert models["synthderm-fitz64"]["pipeline_class"] == "StableDiffusionPipeline"
    assert models["synthderm-fitz64-inpaint"]["pipeline_class"] == "StableDiffusionInpaintPipeline"
    # its own sampler defaults (synthderm.json beside model_index.json); the tiny ones have none
    for model_id in BUILTIN_MODELS:
        assert models[model_id]["sampling_defaults"] == {"guidance_scale": 12.0}
    assert models["tiny-random"]["sampling_defaults"] is None


def test_every_strategy_runs_the_committed_model(stack: Stack) -> None:
    key = stack.new_key("lab")
    client = stack.client(key)
    dataset_id, _ = make_split_dataset(stack, key, splits={CONDITION: {"train": 2}})
    made: dict[str, tuple[list[bytes], list[bytes]]] = {}  # strategy: (parents, images)
    for strategy, model in (
        ("text-to-image", "synthderm-fitz64"),
        ("image-to-image", "synthderm-fitz64"),
        ("inpaint", "synthderm-fitz64-inpaint"),
        ("inpaint-outpaint", "synthderm-fitz64-inpaint"),
    ):
        body: dict[str, object] = {"condition": CONDITION, "model": model, "strategy": strategy}
        if strategy == "text-to-image":
            body["skin_tone"] = 5  # the prompt's suffix, as the model was trained
        else:
            body |= {"source_dataset": dataset_id, "synthetic_per_real": 1}
        job, images = generate(stack, client, **body)
        assert job["model"] == model and len(images) == 2, job
        pixels = [np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for data in images]
        assert all(p.shape == (64, 64, 3) for p in pixels)
        assert all(p.std() > 5 for p in pixels)  # not a flat colour
        assert guidance_of(stack, job["id"]) == [12.0, 12.0]  # the model's default, not 3
        made[strategy] = (parents_of(stack, job["id"]), images)
    # a job's own guidance wins over the model's
    job, _ = generate(stack, client, condition=CONDITION, model="synthderm-fitz64",
                      guidance_scale=5, num_inference_steps=2)  # fmt: skip
    assert guidance_of(stack, job["id"]) == [5.0, 5.0]
    row = client.get(f"/datasets/{job['dataset_id']}/manifest").text.splitlines()[0]
    assert json.loads(row)["guidance_scale"] == 5.0
    # the inpainted images keep their parents' pixels outside the mask, and change inside it
    for strategy, mask in (
        ("inpaint", central_mask(size=64, latent_size=8)),
        ("inpaint-outpaint", frame_mask(size=64, frame_px=16)),
    ):
        keep = np.asarray(mask) == 0
        parents, images = made[strategy]
        assert len(parents) == len(images) == 2
        for parent, child in zip(parents, images, strict=True):
            original = np.asarray(load_parent(parent, size=64))
            out = np.asarray(Image.open(io.BytesIO(child)).convert("RGB"))
            assert np.array_equal(out[keep], original[keep]), strategy
            assert not np.array_equal(out[~keep], original[~keep]), strategy


def test_a_lora_of_the_committed_model_samples_at_its_guidance(embedded: Stack) -> None:
    stack = embedded
    key = stack.new_key("lab")
    client = stack.client(key)
    dataset_id, _ = make_split_dataset(stack, key, splits={CONDITION: {"train": 2}})
    response = client.post(
        "/finetunes",
        json={"dataset": dataset_id, "base_model": "synthderm-fitz64", "method": "lora",
              "lora_rank": 2, **FAST},
    )  # fmt: skip
    assert response.status_code == 202, response.text
    body = wait_finetune(stack, client, response.json()["id"])
    assert body["status"] == "succeeded", body
    model_id = f"{body['family_id']}-{CONDITION}"
    models = {row["id"]: row for row in client.get("/models").json()["items"]}
    assert models[model_id]["base_model"] == "synthderm-fitz64"
    assert models[model_id]["sampling_defaults"] == {"guidance_scale": 12.0}  # the base's
    job, _ = generate(stack, client, condition=CONDITION, model=model_id, num_inference_steps=2)
    assert job["model"] == model_id and guidance_of(stack, job["id"]) == [12.0, 12.0]


def parents_of(stack: Stack, job_id: str) -> list[bytes]:
    """The bytes of the real parents of a job's images, in image order."""
    with stack.session() as session:
        keys = [
            row[0]
            for row in session.execute(
                text(
                    "SELECT p.storage_key FROM images c JOIN images p "
                    'ON p.id = c.parent_image_id WHERE c.job_id = :j ORDER BY c."index"'
                ),
                {"j": job_id},
            )
        ]
    return [stack.store.get_bytes(key) for key in keys]


def guidance_of(stack: Stack, job_id: str) -> list[float]:
    """The guidance scale each image of a job was made with, in image order."""
    with stack.session() as session:
        return [
            row[0]
            for row in session.execute(
                text('SELECT guidance_scale FROM images WHERE job_id = :j ORDER BY "index"'),
                {"j": job_id},
            )
        ]
