"""The contract of /finetunes: a fine-tune's body (the paper's DreamBooth, its inpainting
variant, LoRA, and the project's own generator trained from scratch), and the view of a
fine-tune and of its models.

The hyperparameters' defaults are the paper's (PAPER.md section 3), declared once here for the
API; models/finetune_config.py keeps its own copy (models/ never imports app/) and
tests/models/test_finetune_contract.py ties the two. The scratch settings mirror
models/scratch_parts.py's ScratchConfig the same way (tests/models/test_scratch_contract.py).
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from app.schemas.jobs import JobStatus, Timings
from app.schemas.text import Name
from app.schemas.webhooks import WebhookSubscription


class FinetuneMethod(StrEnum):
    DREAMBOOTH = "dreambooth"  # the paper's: the whole UNet trains
    LORA = "lora"  # beyond the paper: low-rank adapters on the UNet's attention projections
    # issue 24: the whole generator (autoencoder, text encoder, UNet, inpainting UNet) trained
    # on the dataset alone, no base model
    SCRATCH = "scratch"


class FinetuneVariant(StrEnum):
    TEXT_TO_IMAGE = "text-to-image"
    INPAINT = "inpaint"  # the 9-channel inpainting UNet, on random rectangle or ellipse masks


# the attention projections of diffusers' UNet2DConditionModel a LoRA may adapt
LoraTarget = Literal["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2"]
LORA_TARGETS: tuple[LoraTarget, ...] = ("to_q", "to_k", "to_v", "to_out.0")


class FinetuneHyperparameters(BaseModel):
    """How a model trains: the paper's DreamBooth settings unless set (PAPER.md section 3)."""

    resolution: int | None = Field(
        None, ge=64, le=2048, multiple_of=8, description="Pixels; null: the base model's size."
    )
    train_batch_size: int = Field(4, ge=1, le=256)
    learning_rate: float = Field(5e-6, gt=0, le=1, description="Constant, no warm-up.")
    num_train_epochs: int = Field(4, ge=1, le=10_000)
    max_train_steps: int | None = Field(
        None, ge=1, le=10_000_000, description="Overrides num_train_epochs when set."
    )
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_weight_decay: float = Field(1e-2, ge=0, le=1)
    adam_epsilon: float = Field(1e-8, gt=0, le=1)
    max_grad_norm: float = Field(1.0, gt=0, le=1e6, description="Gradient clipping.")
    ema_decay: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Above 0: the model is the moving average of the trained weights with this "
        "decay (warmed up: min(decay, (1 + step) / (10 + step))); 0: the last step's weights.",
    )
    lora_rank: int = Field(4, ge=1, le=256, description="LoRA only.")
    lora_alpha: float | None = Field(
        None, gt=0, le=1024, description="LoRA only; null: the rank (a scale of 1)."
    )
    lora_target_modules: list[LoraTarget] = Field(
        default_factory=lambda: list(LORA_TARGETS),
        min_length=1,
        description="LoRA only: the UNet's attention projections that get adapters.",
    )
    checkpoint_every_steps: int = Field(100, ge=1, le=10_000_000)
    validation_every_steps: int = Field(100, ge=1, le=10_000_000)
    validation_images: int = Field(
        8, ge=0, le=64, description="Validation images each time (fixed prompts and seeds)."
    )
    validation_inference_steps: int = Field(25, ge=1, le=200)
    validation_guidance_scale: float = Field(3.0, ge=0, le=50)
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        "auto", description="auto: bf16 on a CUDA card that has it, else full precision."
    )
    gradient_checkpointing: bool = False
    cache_latents: bool = Field(
        False,
        description="Encode latent_views augmented views of each image once, instead of "
        "running the VAE on every step.",
    )
    latent_views: int = Field(4, ge=1, le=64)


Width = Annotated[int, Field(ge=8, le=2048, multiple_of=8)]
Widths = Annotated[list[Width], Field(min_length=2, max_length=6)]
SCRATCH_STAGES = ("autoencoder", "text-to-image", "inpaint")


class ScratchSettings(BaseModel):
    """How the scratch method builds and trains its generator (ScratchConfig's fields and
    defaults: the committed default model's, sized for 90 minutes on two CPU cores). The seed is
    the fine-tune's."""

    model_config = ConfigDict(extra="forbid")

    # ScratchConfig takes 16..512 in steps of 4, its UNet stages' FinetuneConfig 64..2048 in
    # steps of 8: both hold here
    resolution: int = Field(64, ge=64, le=512, multiple_of=8, description="Pixels.")
    vae_channels: Widths = Field(
        default_factory=lambda: [32, 64, 128],
        description="The autoencoder's widths; each level after the first halves the size.",
    )
    vae_layers_per_block: int = Field(1, ge=1, le=8)
    vae_steps: int = Field(2000, ge=1, le=10_000_000)
    vae_batch_size: int = Field(16, ge=1, le=1024)
    vae_learning_rate: float = Field(1e-3, gt=0, le=1)
    vae_kl_weight: float = Field(1e-6, ge=0, le=1000)
    vae_gradient_weight: float = Field(
        0.5, ge=0, le=1000, description="L1 on image gradients (edges, against the blur)."
    )
    text_width: int = Field(128, ge=8, le=4096)
    text_layers: int = Field(2, ge=1, le=48)
    text_heads: int = Field(4, ge=1, le=64, description="Must divide text_width.")
    text_max_tokens: int = Field(32, ge=8, le=512)
    unet_channels: Widths = Field(default_factory=lambda: [32, 64, 128])
    unet_layers_per_block: int = Field(2, ge=1, le=8)
    unet_heads: int = Field(4, ge=1, le=64)
    unet_steps: int = Field(4000, ge=1, le=10_000_000)
    unet_batch_size: int = Field(64, ge=1, le=256)
    unet_learning_rate: float = Field(4e-4, gt=0, le=1)
    unet_ema_decay: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Above 0: both UNet stages save their weights' moving "
        "average with this decay (ema_decay).",
    )
    inpaint_steps: int = Field(800, ge=1, le=10_000_000)
    caption_dropout: float = Field(
        0.1, ge=0, lt=1, description="How often a caption is replaced by the empty one."
    )
    latent_views: int = Field(8, ge=1, le=64)
    checkpoint_every_steps: int = Field(100, ge=1, le=10_000_000)
    validation_every_steps: int = Field(400, ge=1, le=10_000_000)

    @field_validator("vae_channels", "unet_channels")
    @classmethod
    def _norm_groups(cls, widths: list[int], info: ValidationInfo) -> list[int]:
        # GroupNorm's groups are min(32, first width): every width must split into them
        groups = min(32, widths[0])
        if any(width % groups for width in widths):
            raise ValueError(f"every width must be a multiple of {groups} (min(32, the first))")
        resolution = info.data.get("resolution")
        factor = 2 ** (len(widths) - 1)
        if info.field_name == "vae_channels" and resolution and resolution % factor:
            raise ValueError(
                f"{len(widths)} levels downsample {factor}x; resolution {resolution} is not a "
                f"multiple of {factor}"
            )
        return widths

    @field_validator("text_heads")
    @classmethod
    def _heads_divide_width(cls, heads: int, info: ValidationInfo) -> int:
        width = info.data.get("text_width")
        if width and width % heads:
            raise ValueError(f"must divide text_width ({width})")
        return heads


class FinetuneCreate(FinetuneHyperparameters, WebhookSubscription):
    """Fine-tune `base_model` on the caller's real `dataset`: one model per condition (the
    paper's ten), or one over them all (`joint`, the paper's "all" model); or, with `method:
    scratch`, train a generator of its own (no base model) over all the conditions."""

    model_config = ConfigDict(extra="forbid")

    dataset: Name = Field(max_length=36, description="A real dataset of the caller.")
    base_model: Name | None = Field(
        None,
        max_length=120,
        description="A registered model (GET /models) of the variant's kind; required by "
        "dreambooth and lora, refused by scratch.",
    )
    method: FinetuneMethod = FinetuneMethod.DREAMBOOTH
    variant: FinetuneVariant = FinetuneVariant.TEXT_TO_IMAGE
    conditions: list[Name] | None = Field(
        None, min_length=1, max_length=200, description="null: every condition of the images."
    )
    joint: bool = Field(
        False, description="One model over all the conditions (always so with scratch)."
    )
    caption_skin_tone: bool | None = Field(
        None,
        description="Append each image's Fitzpatrick type to its caption, as generation jobs "
        "with a skin_tone do (beyond the paper); null: true with scratch, else false.",
    )
    scratch: ScratchSettings | None = Field(
        None, description="method scratch only: the generator's settings (defaults if null)."
    )
    train_split: Name = Field(
        "train",
        max_length=16,
        description="The split that trains; a dataset without splits trains on all of it.",
    )
    exclude_datasets: list[Name] = Field(
        default_factory=list,
        max_length=50,
        description="Images whose bytes are in any of these datasets never train (e.g. a "
        "classifier's test set).",
    )
    name: Name | None = Field(None, max_length=60)
    seed: int | None = Field(None, ge=0, lt=2**62)
    idempotency_key: Name | None = Field(None, min_length=1, max_length=200)

    def hyperparameters(self) -> dict[str, Any]:
        """The training settings a fine-tune stores (every field, defaults filled): the
        scratch settings for scratch, else the DreamBooth/LoRA hyperparameters."""
        if self.method is FinetuneMethod.SCRATCH:
            return (self.scratch or ScratchSettings()).model_dump(mode="json")
        return self.model_dump(mode="json", include=set(FinetuneHyperparameters.model_fields))


class TrainingData(BaseModel):
    dataset: str
    split: str | None = Field(description="The split that trained; null: the whole dataset.")
    note: str | None = None
    images: int = Field(description="Images that train (over every model).")
    excluded: int = Field(description="Images left out because exclude_datasets hold them.")


class FinetuneMemberOut(BaseModel):
    index: int
    model_id: str = Field(description="The id the model is registered under when it finishes.")
    conditions: list[str]
    status: JobStatus
    train_images: int
    step: int
    steps: int | None
    loss: float | None = Field(description="The last step's training loss.")
    images_per_s: float | None
    elapsed_s: float | None
    eta_s: float | None = Field(description="Estimated seconds left.")
    checkpoint_step: int | None
    final_loss: float | None
    weights_sha256: str | None
    registered: bool
    error: str | None
    stage: str | None = Field(
        None,
        description="scratch: the stage training now or next (autoencoder, text-to-image, "
        "inpaint; step and steps count over all three); null when done or for other methods.",
    )


class FinetuneProgress(BaseModel):
    step: int = Field(description="Steps done, summed over the models.")
    steps: int | None = Field(description="Steps in all; null until every model has started.")
    models_done: int
    models: int


class FinetuneOut(BaseModel):
    id: str
    name: str | None
    status: JobStatus
    family_id: str = Field(
        description="What POST /jobs names as `model`: a per-condition fine-tune's member is "
        "picked by the job's condition, a scratch fine-tune's model by the job's strategy "
        "(inpaint and inpaint-outpaint: `{family_id}-inpaint`)."
    )
    dataset: str
    base_model: str | None = Field(description="null for scratch.")
    method: FinetuneMethod
    variant: FinetuneVariant
    joint: bool
    conditions: list[str]
    caption_skin_tone: bool
    seed: int
    hyperparameters: dict[str, Any]
    training_data: TrainingData
    progress: FinetuneProgress
    members: list[FinetuneMemberOut]
    timings: Timings
    error: str | None
    idempotency_key: str | None
    webhook: str | None = None
    webhook_events: list[str] | None = None


class FinetuneList(BaseModel):
    items: list[FinetuneOut]
    next_cursor: str | None


class FinetuneSample(BaseModel):
    model_id: str
    step: int
    prompt: str
    seed: int
    url: str = Field(description="Where to download the PNG (GET, with the API key).")
    stage: str | None = Field(None, description="scratch: the stage that sampled it.")


class FinetuneSampleList(BaseModel):
    items: list[FinetuneSample]


class ScratchStage(BaseModel):
    stage: str
    steps: int
    final_loss: float | None = Field(description="The last step's loss.")
    seconds: float | None


class ModelTraining(BaseModel):
    finetune_id: str
    family_id: str
    method: FinetuneMethod
    variant: FinetuneVariant
    conditions: list[str]
    hyperparameters: dict[str, Any]
    train_images: int
    steps: int
    final_loss: float | None
    created_at: datetime
    stages: list[ScratchStage] | None = Field(
        None, description="scratch: the steps, final loss and time of each stage."
    )
    reconstruction_psnr_db: float | None = Field(
        None, description="scratch: the autoencoder's reconstruction PSNR on training images."
    )
