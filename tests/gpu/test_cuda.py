"""The paths a GPU takes: the fp16 pipelines with channels_last and CUDA generators, the
classifier's backbone and head on CUDA. They run on CUDA where there is a GPU and on the CPU
elsewhere (CI), so they cannot rot unseen; on a lent GPU `bash bench/gpu.sh` runs them with
`pytest --noconftest tests/gpu` (they need only torch, diffusers and models/), with
`SYNTHDERM_GPU_TEST_DEVICE=cuda` so that a GPU that is not seen fails them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from models import tiny_random
from models.backbones import load_backbone
from models.classifier import HeadConfig, TrainOptions, predict, train_head
from models.devices import dtype_for
from models.parents import prepare_parent
from models.pipelines import load_pipeline
from models.strategies import INPAINT_OUTPAINT, TEXT_TO_IMAGE, SampleParams, generate
from tests.models.helpers import blobs

DEVICE = torch.device(
    os.environ.get("SYNTHDERM_GPU_TEST_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
)
PROMPT = "An image of psoriasis, a skin disease"


def params(strategy: str, **overrides: Any) -> SampleParams:
    values: dict[str, Any] = {"strategy": strategy, "prompt": PROMPT, "negative_prompt": None,
                              "num_inference_steps": 4, "guidance_scale": 3.0, "width": 64,
                              "height": 64}  # fmt: skip
    if strategy != TEXT_TO_IMAGE:
        values["strength"] = 0.97
    return SampleParams(**(values | overrides))


def pixels(images: list[Image.Image]) -> list[np.ndarray]:
    return [np.asarray(image.convert("RGB")) for image in images]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("tiny")
    return {
        TEXT_TO_IMAGE: tiny_random.save(folder / "tiny-random"),
        INPAINT_OUTPAINT: tiny_random.save(folder / "tiny-random-inpaint", inpaint=True),
    }


@pytest.mark.parametrize("strategy", [TEXT_TO_IMAGE, INPAINT_OUTPAINT])
def test_pipelines_sample_on_the_device_reproducibly(saved: dict[str, Path], strategy: str) -> None:
    pipe = load_pipeline(saved[strategy], device=DEVICE, dtype=dtype_for(DEVICE))
    assert pipe.unet.device.type == DEVICE.type and pipe.unet.dtype == dtype_for(DEVICE)
    if DEVICE.type == "cuda":
        assert pipe.unet.dtype == torch.float16
        weight = next(p for p in pipe.unet.parameters() if p.dim() == 4)
        assert weight.is_contiguous(memory_format=torch.channels_last)
    gradient = np.linspace(0, 255, 96 * 64 * 3).reshape(64, 96, 3).astype(np.uint8)
    parents = [prepare_parent(Image.fromarray(gradient), size=64)] * 3
    edit = strategy != TEXT_TO_IMAGE

    def sample(seeds: list[int]) -> list[Image.Image]:
        return generate(pipe, params=params(strategy), seeds=seeds, device=DEVICE,
                        parents=parents[: len(seeds)] if edit else None)  # fmt: skip

    first = sample([1, 2, 3])
    assert [image.size for image in first] == [(64, 64)] * 3
    assert all(np.isfinite(p.astype(float)).all() and p.std() > 0 for p in pixels(first))
    # the same seeds, batch and device: the same pixels; another seed: others
    assert all(np.array_equal(a, b) for a, b in zip(pixels(first), pixels(sample([1, 2, 3])),
                                                     strict=True))  # fmt: skip
    assert not np.array_equal(pixels(first)[0], pixels(sample([4, 2, 3]))[0])


def test_backbone_features_on_the_device_match_the_cpu() -> None:
    rng = np.random.default_rng(0)
    batch = torch.from_numpy(rng.random((4, 3, 224, 224), dtype=np.float32))
    on_cpu = load_backbone("efficientnet-lite0", device="cpu").features(batch)
    on_device = load_backbone("efficientnet-lite0", device=DEVICE).features(batch)
    assert on_device.device.type == "cpu" and on_device.shape == on_cpu.shape == (4, 2560)
    # cuDNN may use TF32 for convolutions: equal to ~1e-3 relative, not to the last bit
    assert torch.allclose(on_device, on_cpu, rtol=1e-2, atol=1e-2)


def test_head_trains_on_the_device_and_a_seed_repeats() -> None:
    (x, y), (vx, vy), (tx, ty) = blobs(80), blobs(10, seed=1), blobs(30, seed=2)

    def fit() -> Any:
        return train_head(
            train_features=lambda epoch, rows: x[rows], train_labels=y,
            val_features=lambda: vx, val_labels=vy,
            config=HeadConfig(in_features=x.shape[1], n_classes=3, hidden=32),
            options=TrainOptions(max_epochs=50, patience=3, batch_size=8, seed=5), device=DEVICE,
        )  # fmt: skip

    first, second = fit(), fit()
    assert next(first.head.parameters()).device.type == DEVICE.type
    probs = predict(first.head, tx)
    assert float((probs.argmax(1) == ty).float().mean()) >= 0.95
    # the same seed on the same device: the same curve (dropout masks drawn on the device)
    assert [h["val_loss"] for h in first.history] == [h["val_loss"] for h in second.history]
