"""Guidance in a limited interval (SampleParams.guidance_interval): the pipeline combines its two
predictions with the job's scale only on the steps inside the interval, on every strategy, and
an unset interval samples exactly as before."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from models import strategies, tiny_random
from models.parents import prepare_parent
from models.pipelines import load_pipeline

CPU = torch.device("cpu")
PROMPT = "An image of psoriasis, a skin disease"
OFF = strategies.GUIDANCE_OFF


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("tiny")
    return {
        kind: load_pipeline(
            tiny_random.save(folder / kind, inpaint=kind == "inpaint"),
            device=CPU,
            dtype=torch.float32,
        )
        for kind in ("text-to-image", "inpaint")
    }


@pytest.fixture(scope="module")
def parent() -> Image.Image:
    rng = np.random.default_rng(0)
    return prepare_parent(
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), size=64
    )


def params(strategy: str, interval: tuple[float, float] | None, steps: int = 10) -> Any:
    return strategies.SampleParams(
        strategy=strategy, prompt=PROMPT, negative_prompt=None, num_inference_steps=steps,
        guidance_scale=7.0, width=64, height=64, guidance_interval=interval,
    )  # fmt: skip


def sample(pipelines: dict[str, Any], p: Any, parent: Image.Image) -> tuple[list[float], Any]:
    """(the guidance scale in force at each UNet call, the images)."""
    kind = "inpaint" if p.strategy in strategies.NEEDS_INPAINT_PIPELINE else "text-to-image"
    pipe = pipelines[kind]
    img2img = None
    if p.strategy == strategies.IMAGE_TO_IMAGE:  # the variant that samples, sharing the UNet
        pipe = img2img = strategies.image_to_image_pipeline(pipelines[kind])
    scales: list[float] = []
    handle = pipe.unet.register_forward_pre_hook(lambda *_: scales.append(pipe._guidance_scale))
    parents = None if p.strategy == strategies.TEXT_TO_IMAGE else [parent]
    try:
        images = strategies.generate(
            pipelines[kind], params=p, seeds=[5], device=CPU, parents=parents, img2img=img2img
        )
    finally:
        handle.remove()
    return scales, np.asarray(images[0])


def test_text_to_image_guides_only_inside_the_interval(pipelines: dict[str, Any]) -> None:
    scales, guided_late = sample(pipelines, params("text-to-image", (0.4, 1.0)), None)
    assert scales == [OFF] * 4 + [7.0] * 6  # steps 0..3 of 10 are before 0.4
    scales, guided_early = sample(pipelines, params("text-to-image", (0.0, 0.3)), None)
    assert scales == [7.0] * 3 + [OFF] * 7
    scales, everywhere = sample(pipelines, params("text-to-image", None), None)
    assert scales == [7.0] * 10
    assert not np.array_equal(guided_late, everywhere)
    assert not np.array_equal(guided_early, guided_late)
    # the whole schedule is the same as no interval, to the byte
    _, whole = sample(pipelines, params("text-to-image", (0.0, 1.0)), None)
    assert np.array_equal(whole, everywhere)


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        # strength 0.97 of 10 steps runs 9: schedule steps 1..9
        ("inpaint", [OFF] * 4 + [7.0] * 5),
        # then the outpaint pass, strength 0.95 of 10: steps 1..9 again
        ("inpaint-outpaint", ([OFF] * 4 + [7.0] * 5) * 2),
        # strength 0.75 of 10 runs 7: schedule steps 3..9
        ("image-to-image", [OFF] * 2 + [7.0] * 5),
    ],
)
def test_edits_count_the_interval_on_the_whole_schedule(
    pipelines: dict[str, Any], parent: Image.Image, strategy: str, expected: list[float]
) -> None:
    scales, _ = sample(pipelines, params(strategy, (0.5, 1.0)), parent)
    assert scales == expected


def test_outside_the_interval_the_prediction_is_the_conditional_one(
    pipelines: dict[str, Any],
) -> None:
    """Guidance 1 is the conditional prediction: an interval that excludes every step but the
    first equals guidance 1 on all but the first (checked against a scale of exactly 1 after
    step 0, which diffusers would otherwise treat as 'no guidance')."""
    pipe = pipelines["text-to-image"]
    p = params("text-to-image", (0.0, 0.1), steps=4)
    _, limited = sample(pipelines, p, None)

    def conditional_after_first(pipe_: Any, step: int, _t: Any, kwargs: dict[str, Any]) -> Any:
        pipe_._guidance_scale = 1.0 + 1e-12
        return kwargs

    with torch.inference_mode():
        manual = pipe(
            prompt=[PROMPT], num_inference_steps=4, guidance_scale=7.0, width=64, height=64,
            generator=[torch.Generator().manual_seed(5)], output_type="np",
            callback_on_step_end=conditional_after_first,
        ).images[0]  # fmt: skip
    manual = (manual * 255).round().astype(np.uint8)
    assert np.abs(limited.astype(int) - manual.astype(int)).max() <= 1


@pytest.mark.parametrize("interval", [(0.5, 0.5), (0.6, 0.2), (-0.1, 0.5), (0.2, 1.2)])
def test_a_bad_interval_is_refused_before_sampling(
    pipelines: dict[str, Any], interval: tuple[float, float]
) -> None:
    with pytest.raises(ValueError, match="guidance_interval"):
        strategies.generate(
            pipelines["text-to-image"],
            params=params("text-to-image", interval),
            seeds=[1],
            device=CPU,
        )


def test_provenance_records_the_interval() -> None:
    assert params("text-to-image", (0.4, 1.0)).provenance()["guidance_interval"] == (0.4, 1.0)
    assert params("text-to-image", None).provenance()["guidance_interval"] is None
