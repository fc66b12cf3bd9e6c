"""The tiny random-weight pipelines: both save and load from a local folder like a real
checkpoint, and the inpainter samples reproducibly with the paper's masks (PAPER.md section 2b).

The random VAE does not reconstruct images, so nothing here asserts that kept pixels survive.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)
from PIL import Image

from models import tiny_random
from models.masks import central_mask, frame_mask
from models.parents import prepare_parent
from models.pipelines import load_pipeline
from tests.conftest import ROOT

PROMPT = "An image of psoriasis, a skin disease"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Both pipelines, saved once for the module."""
    folder = tmp_path_factory.mktemp("tiny")
    return {
        "text-to-image": tiny_random.save(folder / "tiny-random"),
        "inpaint": tiny_random.save(folder / "tiny-random-inpaint", inpaint=True),
    }


@pytest.fixture(scope="module")
def inpainter(saved: dict[str, Path]) -> Any:
    return load_pipeline(saved["inpaint"], device=CPU, dtype=torch.float32)


@pytest.fixture(scope="module")
def parent() -> Image.Image:
    """A 64x64 parent with structure (a gradient and a dark disc), prepared like a real one."""
    yy, xx = np.mgrid[0:64, 0:96]  # (H, W) of a wide source image
    rgb = np.stack([xx * 2, yy * 3, 255 - xx * 2], axis=-1).clip(0, 255)  # (H, W, 3)
    rgb[(yy - 32) ** 2 + (xx - 48) ** 2 < 144] = (60, 30, 20)
    return prepare_parent(Image.fromarray(rgb.astype(np.uint8)), size=64)


def inpaint(
    pipe: Any,
    parent: Image.Image,
    mask: Image.Image,
    seeds: Sequence[int],
    **kwargs: Any,
) -> list[Image.Image]:
    with torch.inference_mode():
        result = pipe(
            prompt=[PROMPT] * len(seeds),
            image=[parent] * len(seeds),
            mask_image=[mask] * len(seeds),
            strength=kwargs.pop("strength", 0.97),
            num_inference_steps=4,
            guidance_scale=3.0,
            width=64,
            height=64,
            generator=[torch.Generator().manual_seed(seed) for seed in seeds],
            output_type="pil",
            **kwargs,
        )
    return result.images


def sha256(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return hashlib.sha256(buffer.getvalue()).hexdigest()


@pytest.mark.parametrize(
    ("kind", "cls", "in_channels"),
    [
        ("text-to-image", StableDiffusionPipeline, 4),
        ("inpaint", StableDiffusionInpaintPipeline, 9),
    ],
)
def test_saves_and_loads_from_a_local_folder(
    saved: dict[str, Path], kind: str, cls: type, in_channels: int
) -> None:
    folder = saved[kind]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == cls.__name__
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    assert unet_config["in_channels"] == in_channels
    assert unet_config["out_channels"] == 4
    pipe = cls.from_pretrained(str(folder), local_files_only=True)
    assert type(pipe) is cls
    assert pipe.unet.config.in_channels == in_channels
    assert pipe.vae_scale_factor == 2


def test_text_to_image_still_samples(saved: dict[str, Path]) -> None:
    pipe = load_pipeline(saved["text-to-image"], device=CPU, dtype=torch.float32)
    assert type(pipe) is StableDiffusionPipeline
    with torch.inference_mode():
        images = pipe(
            prompt=[PROMPT],
            num_inference_steps=2,
            guidance_scale=3.0,
            generator=[torch.Generator().manual_seed(0)],
            output_type="pil",
        ).images
    assert [image.size for image in images] == [(64, 64)]


def test_build_pipeline_is_unchanged_by_the_inpaint_variant() -> None:
    """Same seed, same text-to-image weights, whichever pipeline was built before."""
    first = tiny_random.build_pipeline(3).unet.state_dict()
    tiny_random.build_inpaint_pipeline(3)
    again = tiny_random.build_pipeline(3).unet.state_dict()
    assert all(torch.equal(first[name], again[name]) for name in first)


def test_save_keeps_an_existing_folder(saved: dict[str, Path]) -> None:
    before = (saved["inpaint"] / "model_index.json").stat().st_mtime_ns
    assert tiny_random.save(saved["inpaint"], inpaint=True) == saved["inpaint"]
    assert (saved["inpaint"] / "model_index.json").stat().st_mtime_ns == before
    assert not list(saved["inpaint"].parent.glob(".tiny-*"))


def test_cli_inpaint_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out_dir = tmp_path / "cli-inpaint"
    monkeypatch.setattr(sys, "argv", ["tiny_random", str(out_dir), "--inpaint"])
    tiny_random.main()
    index = json.loads((out_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionInpaintPipeline"


def test_building_prints_the_folder_alone(tmp_path: Path) -> None:
    # as `synthderm run` builds them on first start: no saving bars, and not transformers'
    # advice to install torchvision (PyPI's does not import beside the pinned torch)
    out_dir = tmp_path / "quiet"
    built = subprocess.run(
        [sys.executable, "-m", "models.tiny_random", str(out_dir), "--inpaint"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert built.stdout.strip() == str(out_dir)
    assert "torchvision" not in built.stderr and "Writing model shards" not in built.stderr
    assert (out_dir / "model_index.json").is_file()


def test_only_the_torchvision_advice_is_dropped() -> None:
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("transformers.utils.import_utils")
    level = logger.level  # another test may have made transformers quiet (quiet_loading)
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        logger.warning("`CLIPImageProcessor` requires torchvision (not installed); falling back")
        logger.warning("something else worth knowing")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert records == ["something else worth knowing"]


def test_load_pipeline_sets_up_the_inpainter(inpainter: Any) -> None:
    assert type(inpainter) is StableDiffusionInpaintPipeline
    assert isinstance(inpainter.scheduler, DPMSolverMultistepScheduler)
    assert inpainter.scheduler.config.algorithm_type == "dpmsolver++"


def test_inpaint_with_the_central_mask(inpainter: Any, parent: Image.Image) -> None:
    mask = central_mask(size=64, latent_size=8)
    images = inpaint(inpainter, parent, mask, [1, 2])
    assert [image.size for image in images] == [(64, 64), (64, 64)]
    assert all(image.mode == "RGB" for image in images)
    assert sha256(images[0]) != sha256(images[1])
    assert all(sha256(image) != sha256(parent) for image in images)


def test_same_seeds_same_bytes(inpainter: Any, parent: Image.Image) -> None:
    mask = central_mask(size=64, latent_size=8)
    first = [sha256(image) for image in inpaint(inpainter, parent, mask, [5, 6])]
    again = [sha256(image) for image in inpaint(inpainter, parent, mask, [5, 6])]
    other = [sha256(image) for image in inpaint(inpainter, parent, mask, [7, 6])]
    assert first == again
    assert other[0] != first[0]
    # one generator per image: seed 6 gives the same bytes whatever its neighbour's seed
    assert other[1] == first[1]


def test_output_depends_on_mask_and_parent(inpainter: Any, parent: Image.Image) -> None:
    central = inpaint(inpainter, parent, central_mask(size=64, latent_size=8), [9])[0]
    framed = inpaint(inpainter, parent, frame_mask(size=64, frame_px=2), [9])[0]
    other_parent = parent.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    moved = inpaint(inpainter, other_parent, central_mask(size=64, latent_size=8), [9])[0]
    assert sha256(central) != sha256(framed)
    assert sha256(central) != sha256(moved)


def test_unet_sees_the_mask_and_runs_strength_times_steps(
    inpainter: Any, parent: Image.Image
) -> None:
    """The 9-channel UNet gets the central square as its mask channel (white = regenerate),
    and strength 0.97 of 4 steps runs int(4 * 0.97) = 3 denoising steps."""
    calls: list[tuple[torch.Tensor, int]] = []

    def record(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        sample = args[0] if args else kwargs["sample"]  # (2B, 9, 32, 32) with guidance
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        calls.append((sample.detach().clone(), int(timestep)))

    handle = inpainter.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        inpaint(inpainter, parent, central_mask(size=64, latent_size=8), [1])
    finally:
        handle.remove()
    # the first of the scheduler's 4 timesteps (the pure-noise one) is skipped
    assert [timestep for _, timestep in calls] == inpainter.scheduler.timesteps[1:].tolist()
    sample = calls[0][0]
    assert sample.shape == (2, 9, 32, 32)  # (2B, latents 4 + mask 1 + masked-image 4, h, w)
    expected = torch.zeros(32, 32)
    expected[8:24, 8:24] = 1  # pixels 16..47 of 64 at VAE scale factor 2
    for row in sample:  # unconditional and conditional halves
        assert torch.equal(row[4], expected)


@pytest.mark.parametrize("strategy", ["inpaint", "inpaint-outpaint"])
def test_edits_keep_the_parent_outside_the_mask(
    inpainter: Any, parent: Image.Image, strategy: str
) -> None:
    """The pipeline decodes the whole image through the VAE; the strategy puts the parent's
    own pixels back outside the mask (the frame the paper keeps), and changes the inside."""
    from models import strategies

    params = strategies.SampleParams(
        strategy=strategy, prompt=PROMPT, negative_prompt=None, num_inference_steps=4,
        guidance_scale=3.0, width=64, height=64, frame_px=4,
    )  # fmt: skip
    image = strategies.generate(inpainter, params=params, seeds=[3], device=CPU, parents=[parent])
    out, original = np.asarray(image[0]), np.asarray(parent)
    if strategy == "inpaint":
        keep = np.asarray(central_mask(size=64, latent_size=8)) == 0
    else:
        keep = np.asarray(frame_mask(size=64, frame_px=4)) == 0
    assert keep.any() and (~keep).any()
    assert np.array_equal(out[keep], original[keep])
    assert not np.array_equal(out[~keep], original[~keep])
