"""Pydantic request and response models: the public contract of the REST API."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Strategy(StrEnum):
    TEXT_TO_IMAGE = "text-to-image"
    INPAINT = "inpaint"
    INPAINT_OUTPAINT = "inpaint-outpaint"
    IMAGE_TO_IMAGE = "image-to-image"


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


ACTIVE_JOB_STATUSES = (JobStatus.QUEUED, JobStatus.RUNNING)


class JobCreate(BaseModel):
    """A generation job: `count` images of `condition` on `skin_tone` skin."""

    model_config = ConfigDict(extra="forbid")

    condition: str = Field(min_length=1, max_length=120, examples=["psoriasis"])
    skin_tone: int | None = Field(None, ge=1, le=6, description="Fitzpatrick type 1..6 or null.")
    strategy: Strategy = Strategy.TEXT_TO_IMAGE
    count: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="Images to make. With source_dataset it may be left out: every matching "
        "parent times synthetic_per_real.",
    )
    model: str | None = Field(None, max_length=120, description="Generator id (GET /models).")
    source_dataset: str | None = Field(None, description="Real dataset of parent images.")
    dataset_id: str | None = Field(None, description="Append to this synthetic dataset.")
    dataset_name: str | None = Field(None, max_length=200)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    guidance_scale: float | None = Field(None, ge=0, le=50)
    num_inference_steps: int | None = Field(None, ge=1, le=1000)
    synthetic_per_real: int = Field(
        1, ge=1, le=1000, description="k: images per parent image (PAPER.md section 4)."
    )
    strength: float | None = Field(
        None, gt=0, le=1, description="Edit strength (inpaint 0.97, image-to-image 0.75)."
    )
    outpaint_strength: float | None = Field(
        None, gt=0, le=1, description="Strength of inpaint-outpaint's second pass (0.95)."
    )
    mask_fraction: float | None = Field(
        None, gt=0, lt=0.5, description="Border of the central mask, per side (0.25)."
    )
    frame_px: int | None = Field(
        None, ge=0, le=255, description="Frame kept by inpaint-outpaint, in pixels (16)."
    )
    width: int | None = Field(None, ge=8, le=2048, multiple_of=8)
    height: int | None = Field(None, ge=8, le=2048, multiple_of=8)
    negative_prompt: str | None = Field(None, max_length=2000)
    idempotency_key: str | None = Field(None, min_length=1, max_length=200)


class ChunkStep(BaseModel):
    chunk: int
    done: int = Field(description="Images of the chunk written so far.")
    step: int | None = Field(description="Sampler step of the batch in flight.")
    steps: int | None


class Progress(BaseModel):
    done: int
    total: int
    running: list[ChunkStep] = Field(
        default_factory=list, description="Chunks being sampled now (GET /jobs/{id} only)."
    )


class Timings(BaseModel):
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    canceled_at: datetime | None
    queued_s: float | None = Field(description="From creation to the first chunk's start.")
    running_s: float | None = Field(description="From the first chunk's start to the end.")


class JobOut(BaseModel):
    id: str
    kind: str = Field(description="generate, ingest (a dataset upload) or export.")
    status: JobStatus
    dataset_id: str | None
    condition: str | None
    skin_tone: int | None
    strategy: Strategy | None
    model: str | None
    count: int
    seed: int
    chunk_size: int
    chunks: int
    params: dict[str, Any]
    progress: Progress
    timings: Timings
    error: str | None
    result: dict[str, Any] | None = Field(
        None, description="What an ingest or export made: its report, its files."
    )
    idempotency_key: str | None


class JobList(BaseModel):
    items: list[JobOut]
    next_cursor: str | None


class CountRow(BaseModel):
    condition: str
    skin_tone: int | None
    strategy: str | None
    count: int


class SplitCountRow(BaseModel):
    condition: str
    split: str | None
    count: int


class DatasetOut(BaseModel):
    id: str
    name: str
    kind: str
    description: str
    created_at: datetime
    image_count: int
    counts: list[CountRow] | None = Field(
        None, description="Images by condition x skin tone x strategy (detail only)."
    )
    splits: list[SplitCountRow] | None = Field(
        None,
        description="Images by condition x split (detail only): what test_split, "
        "validation_per_class and n_real_per_class have to work with.",
    )


class DatasetList(BaseModel):
    items: list[DatasetOut]


class ManifestRow(BaseModel):
    """One manifest row (JSON lines, CSV and Parquet share these columns, in this order)."""

    image_id: str
    dataset_id: str
    url: str
    sha256: str
    size_bytes: int
    condition: str
    skin_tone: int | None
    source: str
    strategy: str | None
    model: str | None
    seed: int | None
    steps: int | None
    guidance_scale: float | None
    prompt: str | None
    negative_prompt: str | None
    parent_image_id: str | None
    width: int
    height: int
    job_id: str | None
    storage_key: str
    created_at: datetime
    split: str | None = Field(None, description="train, validation or test, when known.")
    skin_tone_group: str | None = Field(
        None, description="I-II, III-IV or V-VI: from skin_tone, else as the source gave it."
    )
    labels: dict[str, Any] | None = Field(
        None, description="The source's extra labels (a JSON string in CSV and Parquet)."
    )
    original_name: str | None = Field(None, description="File name in the uploaded archive.")


MANIFEST_COLUMNS = list(ManifestRow.model_fields)


class ModelOut(BaseModel):
    id: str
    pipeline_class: str
    description: str
    created_at: datetime


class ModelList(BaseModel):
    items: list[ModelOut]


class ConditionOut(BaseModel):
    slug: str
    name: str


class ConditionList(BaseModel):
    items: list[ConditionOut]


class CheckResult(BaseModel):
    ok: bool
    detail: str


class Readiness(BaseModel):
    ok: bool
    checks: dict[str, CheckResult]


# --- classifier runs and experiments (PAPER.md sections 1 and 4) ---------------------------


# The backbones models/backbones.py can build (the API cannot import it: no torch here);
# tests/models/test_backbones.py checks that the two agree.
BACKBONE_NAMES = ("efficientnet-lite0", "efficientnet-v2-m")
TIMM_BACKBONE_PREFIX = "timm:"
# One value of a grid's axis, bounded as a run's own field is.
NRealPerClass = Annotated[int, Field(ge=1, le=1_000_000)]
SyntheticPerReal = Annotated[int, Field(ge=0, le=1000)]
Seed = Annotated[int, Field(ge=0, le=2**31 - 1)]


class TrainingOptions(BaseModel):
    """How every run trains: the paper's defaults (PAPER.md section 4)."""

    model_config = ConfigDict(extra="forbid")

    backbone: str | None = Field(
        None,
        max_length=120,
        description="Frozen ImageNet backbone (default: the setting): efficientnet-lite0, "
        "efficientnet-v2-m (torchvision on the worker) or timm:<model name> (timm and its "
        "cached weights on the worker).",
    )
    max_epochs: int = Field(50, ge=1, le=500, description="Epochs at most (early stopping).")
    patience: int = Field(3, ge=1, le=500, description="Epochs without a lower val loss.")
    learning_rate: float = Field(1e-3, gt=0, le=1, description="Adam learning rate.")
    weight_decay: float = Field(0.01, ge=0, le=1, description="Decoupled weight decay.")
    batch_size: int | None = Field(
        None, ge=1, le=4096, description="Null: the paper's rule (training rows / 10)."
    )
    image_size: int = Field(224, ge=32, le=1024, description="Input pixels (short side, crop).")
    cache_features: bool = Field(
        True, description="Compute each image's backbone features once and train only heads."
    )

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, value: str | None) -> str | None:
        timm_name = value is not None and value.startswith(TIMM_BACKBONE_PREFIX)
        if value is None or value in BACKBONE_NAMES or (timm_name and value != "timm:"):
            return value
        raise ValueError(
            f"unknown backbone {value!r}; one of {', '.join(BACKBONE_NAMES)} or "
            f"{TIMM_BACKBONE_PREFIX}<model name>"
        )


class DataOptions(BaseModel):
    """Which real images are test, validation and training (PAPER.md section 1)."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(description="Real dataset: the training pool (and the test split).")
    test_split: str = Field("test", max_length=16, description="Its images with this split.")
    test_dataset: str | None = Field(
        None, description="A held-out real dataset as the test set instead of test_split."
    )
    test_per_class: int | None = Field(
        None,
        ge=1,
        le=10_000,
        description="Hold out this many images per class of the dataset as the test set "
        "instead of test_split (one fixed draw: every run and seed scores the same images), "
        "as the paper's 40-per-class held-out set; for a dataset without a split.",
    )
    validation_per_class: int = Field(40, ge=1, le=10_000, description="Sampled with the seed.")
    conditions: list[str] | None = Field(
        None, description="The classes (default: every condition of the training pool)."
    )
    top_n_classes: int | None = Field(
        None, ge=2, le=1000, description="Keep the N commonest classes (the paper used 9)."
    )


class RunCreate(DataOptions, TrainingOptions):
    """One classifier training and evaluation."""

    n_real_per_class: int | None = Field(
        None, ge=1, le=1_000_000, description="Real training images per class (null: all)."
    )
    synthetic_per_real: int = Field(
        0, ge=0, le=1000, description="k synthetic children of each selected real image."
    )
    synthetic_datasets: list[str] = Field(
        default_factory=list, description="Synthetic datasets the children come from."
    )
    strategy: Strategy | None = Field(None, description="Only children of this strategy.")
    augmentation: bool = Field(False, description="fastai's aug_transforms() on the inputs.")
    seed: Seed = Field(111108, description="Validation and n_real sampling.")
    name: str | None = Field(None, max_length=200)
    idempotency_key: str | None = Field(None, min_length=1, max_length=200)


class ExperimentCreate(DataOptions, TrainingOptions):
    """A grid of runs: n_real_per_class x k x strategy x synthetic dataset x augmentation x
    seeds. Real-only runs (k = 0) are made once per n_real, augmentation and seed."""

    n_real_per_class: list[NRealPerClass | None] = Field(
        default_factory=lambda: list[int | None]([None]),
        min_length=1,
        description="null: all real images.",
    )
    synthetic_per_real: list[SyntheticPerReal] = Field(
        default_factory=lambda: [0], min_length=1, description="k values; 0 is real-only."
    )
    synthetic_datasets: list[str] = Field(default_factory=list)
    strategies: list[Strategy | None] = Field(
        default_factory=lambda: list[Strategy | None]([None]),
        min_length=1,
        description="null: any strategy.",
    )
    augmentation: list[bool] = Field(default_factory=lambda: [False], min_length=1)
    seeds: list[Seed] = Field(
        default_factory=lambda: [111108, 111109, 111110],
        min_length=1,
        max_length=100,
        description="Every setting runs once per seed.",
    )
    name: str | None = Field(None, max_length=200)
    idempotency_key: str | None = Field(None, min_length=1, max_length=200)


class RunProgress(BaseModel):
    epoch: int
    max_epochs: int


class RunOut(BaseModel):
    id: str
    experiment_id: str
    index: int
    status: JobStatus
    config: dict[str, Any]
    split: dict[str, Any] | None = Field(description="Images per class in each part.")
    progress: RunProgress
    history: list[dict[str, Any]] = Field(description="Per epoch: losses, val accuracy.")
    best_epoch: int | None
    metrics: dict[str, Any] | None = Field(
        description="Test metrics, overall and per Fitzpatrick group."
    )
    reused_from: str | None = Field(description="The finished run whose results were reused.")
    timings: dict[str, Any] | None
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class RunList(BaseModel):
    items: list[RunOut]
    next_cursor: str | None


class ExperimentOut(BaseModel):
    id: str
    name: str
    status: JobStatus
    params: dict[str, Any]
    progress: Progress
    timings: Timings
    error: str | None
    report: dict[str, Any] | None = Field(
        None, description="Per setting: mean, sd over seeds; differences from real-only."
    )
    plots: list[str] = Field(default_factory=list, description="GET .../plots/{name}.png|svg")
    runs: list[RunOut] | None = None


class ExperimentList(BaseModel):
    items: list[ExperimentOut]
    next_cursor: str | None
