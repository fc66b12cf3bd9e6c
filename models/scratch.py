"""Training the project's own generator from scratch (issue 24), in three stages that each resume
from checkpoint bytes:

1. `autoencoder`: an AutoencoderKL on the photos (L1 + L1 on image gradients + a small KL term),
   with the paper's augmentation; then the latent scaling factor (1 / std of the latents).
2. `text-to-image`: a UNet2DConditionModel and the CLIP text encoder together, through the
   fine-tuning loop (models/finetune.py) on cached latents, captions dropped to "" 10% of the
   time for classifier-free guidance.
3. `inpaint`: a 9-channel UNet initialised from stage 2's, through the same loop with the
   paper's random masks.

The product is two standard diffusers pipeline directories (StableDiffusionPipeline and
StableDiffusionInpaintPipeline). Pure training: no database, no web server, no app/.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models.finetune import train as train_unet
from models.finetune_checkpoint import _replace_dir, load_checkpoint, refuse_changed_settings
from models.finetune_config import (
    FinetuneConfig,
    StepReport,
    TrainingImage,
    ValidationImage,
    scheduled_rate,
)
from models.finetune_data import augment, center_view, draw_augment, epoch_order, prepare_source
from models.scratch_parts import (
    ScratchConfig,
    build_scheduler,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
    config_dict,
    inpaint_unet_from,
)

STAGES = ("autoencoder", "text-to-image", "inpaint")
# The settings only a stage reads (the networks' shapes are built at the start, so they belong
# to the first stage): a checkpoint of an earlier stage resumes under other values of these.
_OWN = {"text-to-image": (), "inpaint": ("inpaint_steps",)}
CHECKPOINT_FORMAT = 1
_AE_WARMUP_STEPS = 50
_SCALE_SAMPLE = 512  # images whose latents set the scaling factor
_PSNR_SAMPLE = 256  # images whose reconstructions give the reported PSNR

StageStep = Callable[[str, StepReport], None]


@dataclass
class ScratchResult:
    """The trained pipelines (None when stopped early) and what training measured."""

    text_to_image: Any
    inpaint: Any
    losses: dict[str, list[float]] = field(default_factory=dict)
    elapsed_s: dict[str, float] = field(default_factory=dict)
    reconstruction_psnr_db: float = float("nan")
    scaling_factor: float = float("nan")
    stopped: bool = False


def _pack(**state: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _unpack(data: bytes, config: ScratchConfig) -> dict[str, Any]:
    state = load_checkpoint(data, kind="scratch", version=CHECKPOINT_FORMAT)
    # a later stage's own settings may change: nothing done so far depended on them
    later = {name for stage in STAGES[STAGES.index(state["stage"]) + 1 :] for name in _OWN[stage]}
    refuse_changed_settings(
        state["config"], config_dict(config),
        may_change={"checkpoint_every_steps", "validation_every_steps", *later},
    )  # fmt: skip
    return state


def _gradient_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L1 between the horizontal and vertical differences of two image batches."""
    dx = (a[..., :, 1:] - a[..., :, :-1]) - (b[..., :, 1:] - b[..., :, :-1])
    dy = (a[..., 1:, :] - a[..., :-1, :]) - (b[..., 1:, :] - b[..., :-1, :])
    return dx.abs().mean() + dy.abs().mean()


def _train_autoencoder(
    vae: Any,
    sources: list[torch.Tensor],
    config: ScratchConfig,
    *,
    device: torch.device,
    inner: bytes | None,
    on_step: StageStep | None,
    on_checkpoint: Callable[[bytes], None],
    should_stop: Callable[[], bool] | None,
) -> tuple[list[float], float, bool]:
    """Stage 1; returns (losses, training seconds, stopped). `inner` resumes it."""
    vae.to(device).train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_learning_rate, weight_decay=0)
    generators = {
        "augment": torch.Generator().manual_seed(config.seed + 11),
        "noise": torch.Generator().manual_seed(config.seed + 12),
    }
    step, losses, elapsed = 0, [], 0.0
    if inner is not None:
        state = torch.load(io.BytesIO(inner), map_location="cpu", weights_only=True)
        vae.load_state_dict(state["vae"])
        optimizer.load_state_dict(state["optimizer"])
        for name, generator in generators.items():
            generator.set_state(state["generators"][name])
        step, losses, elapsed = state["step"], list(state["losses"]), state["elapsed_s"]
    total, batch = config.vae_steps, config.vae_batch_size
    steps_per_epoch = math.ceil(len(sources) / batch)
    order: list[int] = []
    order_epoch, session_images, session_s = -1, 0, 0.0
    while step < total:
        if should_stop is not None and should_stop():
            return losses, elapsed + session_s, True
        started = time.perf_counter()
        epoch, position = divmod(step, steps_per_epoch)
        if epoch != order_epoch:
            order, order_epoch = epoch_order(len(sources), seed=config.seed, epoch=epoch), epoch
        indices = order[position * batch : (position + 1) * batch]
        draw = draw_augment(len(indices), generator=generators["augment"])
        pixels = augment(
            [sources[i] for i in indices], draw, resolution=config.resolution, device=device
        )
        posterior = vae.encode(pixels).latent_dist
        eps = torch.randn(posterior.mean.shape, generator=generators["noise"]).to(device)
        decoded = vae.decode(posterior.mean + posterior.std * eps).sample
        loss = (
            (decoded - pixels).abs().mean()
            + config.vae_gradient_weight * _gradient_l1(decoded, pixels)
            + config.vae_kl_weight * posterior.kl().mean()
        )
        for group in optimizer.param_groups:
            group["lr"] = scheduled_rate(
                config.vae_learning_rate,
                scheduler="cosine",
                warmup_steps=_AE_WARMUP_STEPS,
                step=step,
                total_steps=total,
            )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        losses.append(float(loss.detach()))
        session_images += len(indices)
        session_s += time.perf_counter() - started
        if on_step is not None:
            on_step(
                "autoencoder",
                StepReport(
                    step=step,
                    total_steps=total,
                    epoch=epoch,
                    loss=losses[-1],
                    images_per_s=session_images / max(session_s, 1e-9),
                    elapsed_s=elapsed + session_s,
                ),
            )
        if step % config.checkpoint_every_steps == 0 and step < total:
            on_checkpoint(
                _pack(
                    vae=vae.state_dict(),
                    optimizer=optimizer.state_dict(),
                    generators={name: g.get_state() for name, g in generators.items()},
                    step=step,
                    losses=losses,
                    elapsed_s=elapsed + session_s,
                )
            )
    vae.eval().requires_grad_(False)
    return losses, elapsed + session_s, False


@torch.no_grad()
def _latent_scale_and_psnr(
    vae: Any, sources: list[torch.Tensor], config: ScratchConfig, device: torch.device
) -> tuple[float, float]:
    """(1 / std of the latents over centre views, PSNR in dB of their reconstructions)."""
    means, squared_errors = [], []
    for start in range(0, min(len(sources), _SCALE_SAMPLE), 64):
        pixels = torch.cat(
            [
                center_view(s, resolution=config.resolution, device=device)
                for s in sources[start : min(start + 64, _SCALE_SAMPLE)]
            ]
        )
        mean = vae.encode(pixels).latent_dist.mean
        means.append(mean)
        if start < _PSNR_SAMPLE:
            decoded = vae.decode(mean).sample.clamp(-1, 1)
            squared_errors.append(((decoded - pixels) / 2).pow(2).mean(dim=(1, 2, 3)))
    scale = 1.0 / float(torch.cat(means).std())
    psnr = float((-10 * torch.log10(torch.cat(squared_errors).clamp_min(1e-10))).mean())
    return scale, psnr


def _unet_config(config: ScratchConfig, stage: str) -> FinetuneConfig:
    """The fine-tuning loop's settings for stage 2 (text-to-image) or 3 (inpaint)."""
    inpaint = stage == "inpaint"
    return FinetuneConfig(
        method="dreambooth",
        variant="inpaint" if inpaint else "text-to-image",
        resolution=config.resolution,
        train_batch_size=config.unet_batch_size,
        learning_rate=config.unet_learning_rate,
        ema_decay=config.unet_ema_decay,
        lr_scheduler="cosine",
        lr_warmup_steps=min(100, config.inpaint_steps if inpaint else config.unet_steps),
        max_train_steps=config.inpaint_steps if inpaint else config.unet_steps,
        checkpoint_every_steps=config.checkpoint_every_steps,
        validation_every_steps=config.validation_every_steps,
        validation_images=8,
        cache_latents=True,
        latent_views=config.latent_views,
        train_text_encoder=not inpaint,  # the inpainter reads the trained encoder's states
        caption_dropout=config.caption_dropout,
        seed=config.seed + (2 if inpaint else 1),
    )


def _pipelines(parts: dict[str, Any], inpaint_unet: Any | None) -> tuple[Any, Any]:
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline

    shared = {
        "vae": parts["vae"],
        "text_encoder": parts["text_encoder"],
        "tokenizer": parts["tokenizer"],
        "scheduler": build_scheduler(),
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }
    text_to_image = StableDiffusionPipeline(unet=parts["unet"], **shared)
    inpaint = (
        None
        if inpaint_unet is None
        else StableDiffusionInpaintPipeline(unet=inpaint_unet, **shared)
    )
    return text_to_image, inpaint


def train_generator(
    images: Sequence[TrainingImage],
    config: ScratchConfig,
    *,
    device: torch.device,
    prompts: Sequence[str] = (),
    resume: bytes | None = None,
    on_step: StageStep | None = None,
    on_checkpoint: Callable[[str, bytes], None] | None = None,
    on_validation: Callable[[str, int, list[ValidationImage]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> ScratchResult:
    """Train the three stages on `images` (captions are the service's prompts; `prompts` adds
    the ones sampling will use, so every word of them is a token). `resume` continues from
    checkpoint bytes that `on_checkpoint(stage, bytes)` handed out."""
    state = _unpack(resume, config) if resume is not None else None
    torch.manual_seed(config.seed)
    tokenizer = build_tokenizer(
        [image.caption for image in images] + list(prompts), max_tokens=config.text_max_tokens
    )
    parts: dict[str, Any] = {
        "tokenizer": tokenizer,
        "vae": build_vae(config),
        "text_encoder": build_text_encoder(config, tokenizer),
        "unet": build_unet(config),
    }
    stage, inner = "autoencoder", None
    done: dict[str, Any] = {}
    result = ScratchResult(text_to_image=None, inpaint=None)
    if state is not None:
        stage, inner, done = state["stage"], state["inner"], state["done"]
        result.losses, result.elapsed_s = dict(state["losses"]), dict(state["elapsed_s"])
        result.reconstruction_psnr_db = state["psnr"]
        result.scaling_factor = state["scaling_factor"]
        for name in ("vae", "text_encoder", "unet"):
            if name in done:
                parts[name].load_state_dict(done[name])
        if "scaling_factor" in done:
            parts["vae"].register_to_config(scaling_factor=done["scaling_factor"])

    def checkpoint(current: str, inner_bytes: bytes | None) -> None:
        if on_checkpoint is not None:
            on_checkpoint(
                current,
                _pack(
                    format=CHECKPOINT_FORMAT,
                    config=config_dict(config),
                    stage=current,
                    inner=inner_bytes,
                    done=done,
                    losses=result.losses,
                    elapsed_s=result.elapsed_s,
                    psnr=result.reconstruction_psnr_db,
                    scaling_factor=result.scaling_factor,
                ),
            )

    sources = [prepare_source(image.pixels, resolution=config.resolution) for image in images]
    if stage == "autoencoder":
        losses, elapsed, stopped = _train_autoencoder(
            parts["vae"],
            sources,
            config,
            device=device,
            inner=inner,
            on_step=on_step,
            on_checkpoint=lambda data: checkpoint("autoencoder", data),
            should_stop=should_stop,
        )
        result.losses["autoencoder"], result.elapsed_s["autoencoder"] = losses, elapsed
        if stopped:
            result.stopped = True
            return result
        scale, psnr = _latent_scale_and_psnr(parts["vae"], sources, config, device)
        parts["vae"].register_to_config(scaling_factor=scale)
        result.scaling_factor, result.reconstruction_psnr_db = scale, psnr
        done.update(vae=parts["vae"].state_dict(), scaling_factor=scale)
        stage, inner = "text-to-image", None
        checkpoint(stage, None)
    parts["vae"].to(device).eval().requires_grad_(False)

    for unet_stage in ("text-to-image", "inpaint"):
        if stage != unet_stage:
            continue
        text_to_image, _ = _pipelines(parts, None)
        unet = parts["unet"] if unet_stage == "text-to-image" else inpaint_unet_from(parts["unet"])
        if unet_stage == "inpaint":
            from diffusers import StableDiffusionInpaintPipeline

            pipeline = StableDiffusionInpaintPipeline(**{**text_to_image.components, "unet": unet})
        else:
            pipeline = text_to_image
        trained = train_unet(
            pipeline,
            images,
            _unet_config(config, unet_stage),
            device=device,
            resume=inner,
            on_step=None if on_step is None else (lambda r, s=unet_stage: on_step(s, r)),
            on_checkpoint=lambda _step, data, s=unet_stage: checkpoint(s, data),
            on_validation=(
                None
                if on_validation is None
                else (lambda step, v, s=unet_stage: on_validation(s, step, v))
            ),
            should_stop=should_stop,
            validation_prompts=prompts,
        )
        result.losses[unet_stage], result.elapsed_s[unet_stage] = trained.losses, trained.elapsed_s
        if trained.stopped:
            result.stopped = True
            return result
        if unet_stage == "text-to-image":
            done.update(
                text_encoder=parts["text_encoder"].state_dict(), unet=parts["unet"].state_dict()
            )
            stage, inner = "inpaint", None
            checkpoint(stage, None)
        else:
            parts["inpaint_unet"] = unet
    result.text_to_image, result.inpaint = _pipelines(parts, parts["inpaint_unet"])
    return result


def save_generator(result: ScratchResult, out_dir: Path, *, dtype: torch.dtype) -> dict[str, Path]:
    """Write the two pipelines as `out_dir/text-to-image` and `out_dir/inpaint` (weights in
    `dtype`, safetensors), each staged beside it and renamed into place."""
    import tempfile

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, pipeline in (("text-to-image", result.text_to_image), ("inpaint", result.inpaint)):
        if pipeline is None:
            raise ValueError(f"{name}: the generator was not trained to the end")
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=f".{name}-") as tmp:
            staging = Path(tmp) / "new"
            pipeline.to(dtype=dtype)
            pipeline.save_pretrained(staging, safe_serialization=True)
            pipeline.to(dtype=torch.float32)
            _replace_dir(staging, out_dir / name)
        written[name] = out_dir / name
    return written
