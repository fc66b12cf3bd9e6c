"""The paper's text-to-image strategy (PAPER.md section 2a): prompt, then one sampler call per
batch with one torch.Generator per image, so every image has its own recorded seed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image


def build_prompt(*, condition_name: str, skin_tone: int | None, template: str, suffix: str) -> str:
    """'An image of psoriasis, a skin disease' (+ ', Fitzpatrick skin type 5' when set)."""
    prompt = template.format(condition=condition_name)
    if skin_tone is not None:
        prompt += suffix.format(skin_tone=skin_tone)
    return prompt


@dataclass(frozen=True)
class SampleParams:
    prompt: str
    negative_prompt: str | None
    num_inference_steps: int
    guidance_scale: float
    width: int
    height: int


def default_size(pipeline: Any) -> tuple[int, int]:
    """The pipeline's native (width, height): UNet sample size times the VAE scale factor."""
    size = int(pipeline.unet.config.sample_size) * int(pipeline.vae_scale_factor)
    return size, size


def check_inputs(params: SampleParams, seeds: Sequence[int]) -> None:
    if not seeds:
        raise ValueError("seeds: at least one image must be asked for")
    if params.width % 8 or params.height % 8:
        raise ValueError(
            f"width and height must be multiples of 8, got {params.width}x{params.height}"
        )
    if params.num_inference_steps < 1:
        raise ValueError("num_inference_steps must be at least 1")


def generate(
    pipeline: Any, *, params: SampleParams, seeds: Sequence[int], device: torch.device
) -> list[Image.Image]:
    """One image per seed, in one batched sampler call."""
    # 1. check inputs
    check_inputs(params, seeds)
    # 2. one generator per image: the image depends on its own seed only (for a fixed batch
    #    size, device and dtype)
    generators = [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]
    # 3. sample
    with torch.inference_mode():
        result = pipeline(
            prompt=[params.prompt] * len(seeds),
            negative_prompt=[params.negative_prompt] * len(seeds)
            if params.negative_prompt
            else None,
            num_inference_steps=params.num_inference_steps,
            guidance_scale=params.guidance_scale,
            width=params.width,
            height=params.height,
            generator=generators,
            output_type="pil",
        )
    images: list[Image.Image] = result.images
    return images
