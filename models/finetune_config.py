"""The fine-tuning settings (one place for the paper's defaults, PAPER.md section 3) and the
records the training loop hands back. No torch models here: the service validates a request
with `FinetuneConfig(...)` and maps the ValueError (field name first) to a 422."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from PIL import Image

METHODS = ("dreambooth", "lora")
VARIANTS = ("text-to-image", "inpaint")
MIXED_PRECISIONS = ("no", "fp16", "bf16", "auto")
LR_SCHEDULERS = ("constant", "cosine")
# The UNet's input channels per variant: latents, or latents + mask + masked-image latents.
UNET_IN_CHANNELS = {"text-to-image": 4, "inpaint": 9}
# The adapter name a LoRA fine-tune trains under (and saves from).
LORA_ADAPTER = "finetune"


@dataclass(frozen=True)
class FinetuneConfig:
    """What a fine-tune does; defaults are the paper's DreamBooth (PAPER.md section 3)."""

    method: str = "dreambooth"  # full UNet; "lora": peft LoRA on the UNet's attention projections
    variant: str = "text-to-image"  # or "inpaint": the 9-channel UNet
    resolution: int | None = None  # None: the base pipeline's size (512 for SD 2.1-base)
    train_batch_size: int = 4
    learning_rate: float = 5e-6  # constant, no warmup
    lr_scheduler: str = "constant"  # or "cosine": from learning_rate down to a tenth of it
    lr_warmup_steps: int = 0  # linear from 0 over these steps, then the scheduler
    num_train_epochs: int = 4
    max_train_steps: int | None = None  # overrides the epochs when set
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    # > 0: the product is an exponential moving average of the trained weights with this decay
    # (warmed up as min(decay, (1 + step) / (10 + step)), as diffusers' EMAModel); 0: the last
    ema_decay: float = 0.0
    lora_rank: int = 4
    lora_alpha: float = 4.0
    lora_target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    checkpoint_every_steps: int = 100
    validation_every_steps: int = 100
    validation_images: int = 8  # the paper: 8 images every 100 steps
    validation_inference_steps: int = 25
    validation_guidance_scale: float = 3.0  # the paper's generation guidance (section 2)
    mixed_precision: str = "auto"  # "auto": bf16 on CUDA where supported, else "no"
    gradient_checkpointing: bool = False
    cache_latents: bool = False  # VAE latents of latent_views augmented views per image, once
    latent_views: int = 4
    # set by the scratch method's stages (models/scratch.py), not by a request: the text
    # encoder trains with the UNet, and a caption is replaced by the empty one this often (so
    # classifier-free guidance has an unconditional model to push away from)
    train_text_encoder: bool = False
    caption_dropout: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for error in _errors(self):
            raise ValueError(error)


def _errors(config: FinetuneConfig) -> list[str]:
    """Every problem with the settings, each message starting with its field's name."""
    errors = []

    def check(ok: bool, field: str, message: str) -> None:
        if not ok:
            errors.append(f"{field}: {message}, got {getattr(config, field)!r}")

    check(config.method in METHODS, "method", f"must be one of {', '.join(METHODS)}")
    check(config.variant in VARIANTS, "variant", f"must be one of {', '.join(VARIANTS)}")
    check(
        # multiples of 8 so the latents have whole pixels; the tiny models are 64 px, the
        # scratch method's test configs 32
        config.resolution is None
        or (16 <= config.resolution <= 2048 and config.resolution % 8 == 0),
        "resolution",
        "must be a multiple of 8 in 16..2048",
    )
    check(1 <= config.train_batch_size <= 256, "train_batch_size", "must be 1..256")
    check(0 < config.learning_rate <= 1, "learning_rate", "must be in (0, 1]")
    check(
        config.lr_scheduler in LR_SCHEDULERS,
        "lr_scheduler",
        f"must be one of {', '.join(LR_SCHEDULERS)}",
    )
    check(0 <= config.lr_warmup_steps <= 1_000_000, "lr_warmup_steps", "must be 0..1000000")
    check(1 <= config.num_train_epochs <= 10_000, "num_train_epochs", "must be 1..10000")
    check(
        config.max_train_steps is None or 1 <= config.max_train_steps <= 10_000_000,
        "max_train_steps",
        "must be 1..10000000 or unset",
    )
    check(0 <= config.adam_beta1 < 1, "adam_beta1", "must be in [0, 1)")
    check(0 <= config.adam_beta2 < 1, "adam_beta2", "must be in [0, 1)")
    check(0 <= config.adam_weight_decay <= 1, "adam_weight_decay", "must be in [0, 1]")
    check(0 < config.adam_epsilon <= 1, "adam_epsilon", "must be in (0, 1]")
    check(config.max_grad_norm > 0, "max_grad_norm", "must be positive")
    check(0 <= config.ema_decay < 1, "ema_decay", "must be in [0, 1)")
    check(1 <= config.lora_rank <= 256, "lora_rank", "must be 1..256")
    check(0 < config.lora_alpha <= 1024, "lora_alpha", "must be in (0, 1024]")
    check(
        len(config.lora_target_modules) > 0
        and all(isinstance(name, str) and name for name in config.lora_target_modules),
        "lora_target_modules",
        "must name at least one module",
    )
    check(config.checkpoint_every_steps >= 1, "checkpoint_every_steps", "must be at least 1")
    check(config.validation_every_steps >= 1, "validation_every_steps", "must be at least 1")
    check(0 <= config.validation_images <= 64, "validation_images", "must be 0..64")
    check(
        1 <= config.validation_inference_steps <= 200,
        "validation_inference_steps",
        "must be 1..200",
    )
    check(
        0 <= config.validation_guidance_scale <= 50,
        "validation_guidance_scale",
        "must be in [0, 50]",
    )
    check(
        config.mixed_precision in MIXED_PRECISIONS,
        "mixed_precision",
        f"must be one of {', '.join(MIXED_PRECISIONS)}",
    )
    check(1 <= config.latent_views <= 64, "latent_views", "must be 1..64")
    check(0 <= config.caption_dropout < 1, "caption_dropout", "must be in [0, 1)")
    check(0 <= config.seed < 2**63, "seed", "must be in [0, 2**63)")
    return errors


def ema_decay_at(decay: float, step: int) -> float:
    """The moving average's decay after optimizer step `step` (1-based): warmed up, so the
    average forgets the random initial weights early."""
    return min(decay, (1 + step) / (10 + step))


def config_dict(config: FinetuneConfig) -> dict[str, object]:
    """The settings as plain values (what a checkpoint and a model's provenance record)."""
    return {field.name: getattr(config, field.name) for field in fields(config)}


def scheduled_rate(
    rate: float, *, scheduler: str, warmup_steps: int, step: int, total_steps: int
) -> float:
    """The learning rate of 0-based step `step`: a linear warmup, then constant or a cosine from
    `rate` down to a tenth of it at the last step (a pure function of the step, so a resumed
    run follows the same curve)."""
    if step < warmup_steps:
        return rate * (step + 1) / warmup_steps
    if scheduler == "constant":
        return rate
    span = max(total_steps - warmup_steps - 1, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return rate * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def learning_rate_at(config: FinetuneConfig, step: int, total_steps: int) -> float:
    return scheduled_rate(
        config.learning_rate,
        scheduler=config.lr_scheduler,
        warmup_steps=config.lr_warmup_steps,
        step=step,
        total_steps=total_steps,
    )


def autocast_dtype(config: FinetuneConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the forward passes, or None for fp32 (always None on the CPU)."""
    if device.type != "cuda" or config.mixed_precision == "no":
        return None
    if config.mixed_precision == "fp16":
        return torch.float16
    if config.mixed_precision == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None  # "auto" on a card without bf16: fp32 (fp16 needs loss scaling; ask for it)


@dataclass(frozen=True)
class TrainingImage:
    """One real image and the caption it trains under."""

    image_id: str
    pixels: Image.Image  # RGB, any size
    caption: str


@dataclass(frozen=True)
class StepReport:
    step: int  # 1-based: the number of optimizer steps done
    total_steps: int
    epoch: int  # 0-based
    loss: float
    images_per_s: float  # training images per second of training time (callbacks excluded)
    elapsed_s: float


@dataclass(frozen=True)
class ValidationImage:
    prompt: str
    seed: int
    image: Image.Image


@dataclass(frozen=True)
class TrainResult:
    steps: int
    final_loss: float
    losses: list[float]  # one per step, from step 1 (a resumed run includes the earlier ones)
    stopped: bool  # should_stop() ended it early
    images_seen: int
    elapsed_s: float  # training time, earlier sessions of a resumed run included
