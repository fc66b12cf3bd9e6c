"""Fine-tuning throughput (issue 22): a plain DreamBooth loop as the diffusers example runs it by
default (fp32; the text encoder and the VAE run on every step; no caching) against the
service's `models.finetune.train` (text embeddings once per caption, VAE latents cached per
augmented view, bf16 autocast and fused AdamW on CUDA), measured in one run; prints training
images/s for each and the ratio.

    python -m bench.finetune                                  # CPU: the tiny-random model
    python -m bench.finetune --device cuda --arch sd21        # a GPU: SD 2.1-base, 512 px, batch 4

On a GPU it builds the exact stable-diffusion-2-1-base architecture with random weights (the
same FLOPs as the real model), directly on the card: nothing is downloaded. Both arms train the
full UNet (the paper's DreamBooth) from the same weights on the same images, with the same
augmentation run on the device, so the ratio is the training path's alone.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from models.finetune import FinetuneConfig, StepReport, TrainingImage, train
from models.finetune_data import augment, draw_augment, prepare_source

CAPTIONS = tuple(
    f"An image of {condition}, a skin disease"
    for condition in ("psoriasis", "lichen planus", "basal cell carcinoma", "sarcoidosis")
)


def build_sd21_base(device: torch.device, seed: int = 0) -> Any:
    """A random-weight StableDiffusionPipeline with stable-diffusion-2-1-base's architecture
    (UNet 865M, VAE 84M, OpenCLIP-H text tower 340M), initialised on `device`."""
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from models.tiny_random import build_tokenizer

    torch.manual_seed(seed)
    with device:
        unet = UNet2DConditionModel(
            sample_size=64,  # 512 px / 8
            in_channels=4,
            out_channels=4,
            layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            attention_head_dim=(5, 10, 20, 20),
            cross_attention_dim=1024,
            use_linear_projection=True,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            layers_per_block=2,
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            sample_size=512,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=1024,
                intermediate_size=4096,
                num_hidden_layers=23,  # SD 2.x uses the penultimate of OpenCLIP-H's 24 layers
                num_attention_heads=16,
                max_position_embeddings=77,
                hidden_act="gelu",
                projection_dim=512,
            )
        )
    scheduler = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build(arch: str, device: torch.device) -> Any:
    if arch == "sd21":
        return build_sd21_base(device)
    from models.tiny_random import build_pipeline

    return build_pipeline(0)


def bench_images(count: int, *, resolution: int) -> list[TrainingImage]:
    """Random-pixel photos, a little larger than the resolution and not square (the crop
    works as on real photos; throughput does not depend on what the pixels show)."""
    generator = torch.Generator().manual_seed(0)
    width, height = resolution * 5 // 4, resolution * 9 // 8
    images = []
    for index in range(count):
        pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
        images.append(
            TrainingImage(
                image_id=f"bench-{index}",
                pixels=Image.fromarray(pixels.numpy()),
                caption=CAPTIONS[index % len(CAPTIONS)],
            )
        )
    return images


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def plain_loop(
    pipeline: Any,
    images: list[TrainingImage],
    *,
    steps: int,
    batch: int,
    resolution: int,
    device: torch.device,
) -> list[float]:
    """The diffusers DreamBooth example's default loop, written plainly: fp32, the captions
    through the text encoder and the batch through the VAE on every step, unfused AdamW.
    Returns the time at the end of each step."""
    from diffusers import DDPMScheduler

    pipeline.to(device)
    unet, vae, text_encoder, tokenizer = (
        pipeline.unet,
        pipeline.vae,
        pipeline.text_encoder,
        pipeline.tokenizer,
    )
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.train()
    noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    optimizer = torch.optim.AdamW(
        unet.parameters(), lr=5e-6, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8
    )
    sources = [prepare_source(image.pixels, resolution=resolution) for image in images]
    generator = torch.Generator().manual_seed(0)
    steps_per_epoch = math.ceil(len(images) / batch)
    ends, order = [], []
    for step in range(steps):
        position = step % steps_per_epoch
        if position == 0:  # a new epoch: a new order, as the example's shuffling DataLoader
            order = torch.randperm(len(images), generator=generator).tolist()
        indices = order[position * batch : (position + 1) * batch]
        draw = draw_augment(len(indices), generator=generator)
        pixels = augment([sources[i] for i in indices], draw, resolution=resolution, device=device)
        tokens = tokenizer(
            [images[i].caption for i in indices],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        with torch.no_grad():
            embeddings = text_encoder(tokens)[0]
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(
            0, noise_scheduler.config.num_train_timesteps, (len(indices),), device=device
        )
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, embeddings, return_dict=False)[0]
        loss = F.mse_loss(prediction.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # the example logs it every step
        ends.append(time.perf_counter())
    return ends


def service_path(
    pipeline: Any,
    images: list[TrainingImage],
    *,
    steps: int,
    batch: int,
    resolution: int,
    latent_views: int,
    device: torch.device,
) -> tuple[list[float], list[StepReport], float]:
    """models.finetune.train with its fast paths; the time at the end of each step, the
    reports, and the whole call's seconds (preparation and cache filling included)."""
    config = FinetuneConfig(
        resolution=resolution,
        train_batch_size=batch,
        max_train_steps=steps,
        cache_latents=True,
        latent_views=latent_views,
        mixed_precision="auto",
        validation_images=0,
        checkpoint_every_steps=10**9,
    )
    ends: list[float] = []
    reports: list[StepReport] = []

    def record(report: StepReport) -> None:
        ends.append(time.perf_counter())
        reports.append(report)

    started = time.perf_counter()
    train(pipeline, images, config, device=device, on_step=record)
    return ends, reports, time.perf_counter() - started


def rate(ends: list[float], *, first: int, batch: int) -> float:
    """Training images/s over the steps after step `first` (1-based, warm-up excluded)."""
    if len(ends) <= first:
        return float("nan")
    return (len(ends) - first) * batch / (ends[-1] - ends[first - 1])


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({torch.get_num_threads()} threads)"
    return platform.processor() or "CPU"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--device", default="auto", help="auto: cuda when present, else cpu")
    parser.add_argument(
        "--arch", choices=["tiny", "sd21"], default=None, help="default: sd21 on CUDA, tiny on CPU"
    )
    parser.add_argument(
        "--resolution", type=int, default=None, help="default: 512 for sd21, 64 for tiny"
    )
    parser.add_argument("--images", type=int, default=16, help="training images")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=8, help="steps = epochs * images / batch")
    parser.add_argument("--latent-views", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of each rate")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    arch = args.arch or ("sd21" if device.type == "cuda" else "tiny")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the example's default: plain fp32
    steps_per_epoch = math.ceil(args.images / args.batch)
    steps = args.epochs * steps_per_epoch
    resolution = args.resolution or (512 if arch == "sd21" else 64)
    images = bench_images(args.images, resolution=resolution)
    card = device_name(device)
    print(
        f"device: {card}; arch {arch} at {resolution} px; {args.images} images, batch "
        f"{args.batch}, {steps} steps ({args.epochs} epochs); torch {torch.__version__}",
        flush=True,
    )

    pipeline = build(arch, device)
    plain_ends = plain_loop(
        pipeline, images, steps=steps, batch=args.batch, resolution=resolution, device=device
    )
    plain = rate(plain_ends, first=args.warmup, batch=args.batch)
    print(f"plain loop (fp32, text encoder + VAE every step): {plain:.2f} images/s", flush=True)
    del pipeline
    if device.type == "cuda":
        torch.cuda.empty_cache()

    pipeline = build(arch, device)
    ends, reports, call_s = service_path(
        pipeline,
        images,
        steps=steps,
        batch=args.batch,
        resolution=resolution,
        latent_views=args.latent_views,
        device=device,
    )
    service = rate(ends, first=args.warmup, batch=args.batch)
    # steps whose views were all cached already (epochs >= latent_views)
    warm_first = args.latent_views * steps_per_epoch
    warm = rate(ends, first=max(warm_first, args.warmup), batch=args.batch)
    warm_text = f"{warm:.2f}" if warm == warm else "n/a (no epoch past latent_views)"
    whole = steps * args.batch / call_s
    print(
        f"service path (train(): cached text + latents, autocast "
        f"{'bf16/fp16' if device.type == 'cuda' else 'off on CPU'}): {service:.2f} images/s "
        f"over all steps; {warm_text} once the cache is full; {whole:.2f} for the whole call "
        f"(preparation included, {call_s:.1f} s)",
        flush=True,
    )
    cache_ratio = f"{warm / plain:.2f}x" if warm == warm else "n/a"
    print(f"ratio service/plain: {service / plain:.2f}x (cache full: {cache_ratio})")
    warm_json = warm if warm == warm else None  # NaN: JSON has none
    if args.json:
        record = {
            "device": card,
            "arch": arch,
            "resolution": resolution,
            "images": args.images,
            "batch": args.batch,
            "steps": steps,
            "latent_views": args.latent_views,
            "plain_images_s": plain,
            "service_images_s": service,
            "service_cache_full_images_s": warm_json,
            "service_whole_call_images_s": whole,
            "ratio": service / plain,
            "ratio_cache_full": None if warm_json is None else warm_json / plain,
            "final_loss": reports[-1].loss if reports else None,
        }
        args.json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
