"""The pieces of one fine-tuning step (models/finetune.py runs them): the prepared inputs,
VAE and text encodings, a batch fresh or from the latent cache, and the diffusion loss. Pure
torch and diffusers; no database, no web server, no app/."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from models.finetune_config import UNET_IN_CHANNELS, FinetuneConfig, TrainingImage, autocast_dtype
from models.finetune_data import (
    augment,
    draw_augment,
    draw_masks,
    mask_at_latent_size,
    masked_images,
    prepare_source,
    view_generator,
)


@dataclass
class Context:
    """The pipeline's parts and the prepared inputs one fine-tune (or loss) works on."""

    pipeline: Any
    config: FinetuneConfig
    device: torch.device
    amp_dtype: torch.dtype | None
    resolution: int
    latent_size: int
    sources: list[torch.Tensor]  # per image (3, H, W) uint8, short side = resolution
    caption_index: list[int]  # per image: its row of `embeddings`
    captions: list[str]  # distinct captions, in order of first appearance
    embeddings: torch.Tensor  # (C, L, D): the text encoder's output per distinct caption
    token_ids: torch.Tensor  # (C, L): the distinct captions' tokens (for a training text encoder)
    noise_scheduler: Any
    # (image, view) -> (mean, std, conditioning or None): the latent cache (cache_latents)
    cache: dict[tuple[int, int], tuple[torch.Tensor, ...]] = field(default_factory=dict)

    @property
    def inpaint(self) -> bool:
        return self.config.variant == "inpaint"

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)


def check_inputs(pipeline: Any, images: Sequence[TrainingImage], config: FinetuneConfig) -> None:
    """Raise a ValueError naming the field when this pipeline cannot train on these images."""
    channels = pipeline.unet.config.in_channels
    if channels != UNET_IN_CHANNELS[config.variant]:
        kind = {4: "text-to-image", 9: "inpaint"}.get(channels, f"{channels}-channel")
        raise ValueError(
            f"variant: {config.variant!r} needs a UNet with {UNET_IN_CHANNELS[config.variant]} "
            f"input channels; this base model's has {channels} (a {kind} model)"
        )
    if not images:
        raise ValueError("images: no training images")
    if config.train_batch_size > len(images):
        raise ValueError(
            f"train_batch_size: {config.train_batch_size} is larger than the "
            f"{len(images)} training images"
        )


def prepare(
    pipeline: Any, images: Sequence[TrainingImage], config: FinetuneConfig, device: torch.device
) -> Context:
    """Move the pipeline to the device, decode the images once, encode each caption once."""
    check_inputs(pipeline, images, config)
    from diffusers import DDPMScheduler

    pipeline.to(device)
    # frozen and in eval mode before anything is encoded (dropout, if a model has any, off)
    pipeline.text_encoder.requires_grad_(False).eval()
    pipeline.vae.requires_grad_(False).eval()
    scale = pipeline.vae_scale_factor
    resolution = config.resolution or pipeline.unet.config.sample_size * scale
    if resolution % scale:
        raise ValueError(f"resolution: must be a multiple of the VAE's factor {scale}")
    captions = list(dict.fromkeys(image.caption for image in images))
    if config.caption_dropout > 0 and "" not in captions:
        captions.append("")  # what a dropped caption becomes
    context = Context(
        pipeline=pipeline,
        config=config,
        device=device,
        amp_dtype=autocast_dtype(config, device),
        resolution=resolution,
        latent_size=resolution // scale,
        sources=[prepare_source(image.pixels, resolution=resolution) for image in images],
        caption_index=[captions.index(image.caption) for image in images],
        captions=captions,
        embeddings=torch.empty(0),
        token_ids=torch.empty(0),
        # DDPM noise with the base model's betas and prediction type (PAPER.md section 3)
        noise_scheduler=DDPMScheduler.from_config(pipeline.scheduler.config),
    )
    tokenizer = pipeline.tokenizer
    context.token_ids = tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    context.embeddings = encode_captions(context)
    return context


@torch.no_grad()
def encode_captions(context: Context) -> torch.Tensor:
    """Distinct captions -> (C, L, D) text-encoder states: once per caption, not per step."""
    text_encoder = context.pipeline.text_encoder
    rows = []
    for start in range(0, len(context.token_ids), 64):
        with context.autocast():
            ids = context.token_ids[start : start + 64].to(context.device)
            rows.append(text_encoder(ids)[0].float())
    return torch.cat(rows)  # (C, L, D)


def caption_states(context: Context, rows: list[int]) -> torch.Tensor:
    """(B, L, D) text states of the batch's captions (rows of `captions`): the cached ones, or,
    while the text encoder trains, computed now with gradients, once per distinct caption."""
    if not context.config.train_text_encoder:
        return context.embeddings[rows]
    distinct = sorted(set(rows))
    with context.autocast():
        states = context.pipeline.text_encoder(context.token_ids[distinct].to(context.device))[0]
    position = {row: i for i, row in enumerate(distinct)}
    return states.float()[[position[row] for row in rows]]


@torch.no_grad()
def encode_pixels(context: Context, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, R, R) in [-1, 1] -> the VAE posterior's mean and std, scaled for the UNet."""
    vae = context.pipeline.vae
    with context.autocast():
        posterior = vae.encode(pixels.to(vae.dtype)).latent_dist
    factor = vae.config.scaling_factor
    return posterior.mean.float() * factor, posterior.std.float() * factor  # (B, 4, r, r)


def inpaint_conditioning(
    context: Context, pixels: torch.Tensor, masks: torch.Tensor
) -> torch.Tensor:
    """The inpainting UNet's extra channels: (B, 1 + 4, r, r) = mask at latent size, masked
    image latents (the posterior mean: a fixed condition, the target latents are sampled)."""
    masks = masks.to(context.device)
    masked_mean, _ = encode_pixels(context, masked_images(pixels, masks))
    return torch.cat([mask_at_latent_size(masks, context.latent_size), masked_mean], dim=1)


def fresh_batch(
    context: Context, indices: list[int], generators: dict[str, torch.Generator]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Augment, mask and encode the batch now: (latent mean, latent std, conditioning)."""
    draw = draw_augment(len(indices), generator=generators["augment"])
    sources = [context.sources[index] for index in indices]
    pixels = augment(sources, draw, resolution=context.resolution, device=context.device)
    conditioning = None
    if context.inpaint:
        masks = draw_masks(
            len(indices), resolution=context.resolution, generator=generators["mask"]
        ).masks
        conditioning = inpaint_conditioning(context, pixels, masks)
    mean, std = encode_pixels(context, pixels)
    return mean, std, conditioning


def cached_batch(
    context: Context, indices: list[int], view: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The same from the latent cache: view `view` of each image, encoded the first time it is
    used, with its augmentation (and inpaint mask) drawn from its own (seed, image, view)
    generator, so the cache is identical however a run was interrupted."""
    missing = [index for index in indices if (index, view) not in context.cache]
    if missing:
        draws, masks = [], []
        for index in missing:
            generator = view_generator(context.config.seed, index, view)
            draws.append(draw_augment(1, generator=generator))
            if context.inpaint:
                drawn = draw_masks(1, resolution=context.resolution, generator=generator)
                masks.append(drawn.masks)
        pixels = torch.cat(
            [
                augment(
                    [context.sources[index]],
                    draw,
                    resolution=context.resolution,
                    device=context.device,
                )
                for index, draw in zip(missing, draws, strict=True)
            ]
        )
        mean, std = encode_pixels(context, pixels)
        conditioning = (
            inpaint_conditioning(context, pixels, torch.cat(masks)) if context.inpaint else None
        )
        for row, index in enumerate(missing):
            extra = () if conditioning is None else (conditioning[row],)
            context.cache[(index, view)] = (mean[row], std[row], *extra)
    entries = [context.cache[(index, view)] for index in indices]
    mean = torch.stack([entry[0] for entry in entries])
    std = torch.stack([entry[1] for entry in entries])
    conditioning = torch.stack([entry[2] for entry in entries]) if context.inpaint else None
    return mean, std, conditioning


def diffusion_loss(
    context: Context,
    latents: torch.Tensor,
    conditioning: torch.Tensor | None,
    embeddings: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """Noise the latents at uniform timesteps and score the UNet's prediction (MSE against the
    scheduler's prediction type)."""
    scheduler = context.noise_scheduler
    noise = torch.randn(latents.shape, generator=generator).to(context.device)
    timesteps = torch.randint(
        0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator
    ).to(context.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    model_input = noisy if conditioning is None else torch.cat([noisy, conditioning], dim=1)
    with context.autocast():
        prediction = context.pipeline.unet(
            model_input, timesteps, encoder_hidden_states=embeddings, return_dict=False
        )[0]
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"scheduler: prediction type {prediction_type!r} is not supported")
    return F.mse_loss(prediction.float(), target.float())


def to_pil(view: torch.Tensor) -> Image.Image:
    """(1, 3, R, R) in [-1, 1] -> RGB image."""
    array = ((view[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0)
    return Image.fromarray(array.cpu().numpy())
