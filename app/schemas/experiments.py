"""The contract of /experiments and /runs: classifier runs on real and synthetic mixtures
(PAPER.md sections 1 and 4)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.schemas.jobs import JobStatus, Progress, Strategy, Timings
from app.schemas.text import Name
from app.schemas.webhooks import WebhookSubscription

# --- classifier runs and experiments (PAPER.md sections 1 and 4) ---------------------------


# The backbones models/backbones.py can build (the API cannot import it: no torch here);
# tests/models/test_backbones.py checks that the two agree.
BACKBONE_NAMES = ("efficientnet-lite0", "efficientnet-v2-m")
TIMM_BACKBONE_PREFIX = "timm:"
# What `TrainingOptions._known_backbone` accepts, as the OpenAPI document says it (no control
# character in a timm model's name either, as for every Name)
BACKBONE_PATTERN = (
    f"^({'|'.join(BACKBONE_NAMES)}|{TIMM_BACKBONE_PREFIX}[^\\x00-\\x1f\\x7f-\\x9f]+)$"
)
# One value of a grid's axis, bounded as a run's own field is.
NRealPerClass = Annotated[int, Field(ge=1, le=1_000_000)]
SyntheticPerReal = Annotated[int, Field(ge=0, le=1000)]
Seed = Annotated[int, Field(ge=0, le=2**31 - 1)]


class TrainingOptions(BaseModel):
    """How every run trains: the paper's defaults (PAPER.md section 4)."""

    model_config = ConfigDict(extra="forbid")

    backbone: Name | None = Field(
        None,
        max_length=120,
        json_schema_extra={"pattern": BACKBONE_PATTERN},
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

    dataset: Name = Field(description="Real dataset: the training pool (and the test split).")
    test_split: Name = Field("test", max_length=16, description="Its images with this split.")
    test_dataset: Name | None = Field(
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
    conditions: list[Name] | None = Field(
        None, description="The classes (default: every condition of the training pool)."
    )
    top_n_classes: int | None = Field(
        None, ge=2, le=1000, description="Keep the N commonest classes (the paper used 9)."
    )
    allow_generator_leakage: bool = Field(
        False,
        description="Run even when the synthetic images come from a fine-tuned model that "
        "trained on this experiment's validation or test images (refused otherwise); the "
        "report says so (report.generator_leakage).",
    )
    exclude_copies: bool = Field(
        False,
        description="Never train on synthetic images that the latest evaluation of their "
        "dataset flagged as copies of real training images (POST /evaluations first; 422 "
        "without one); each run's split says how many were left out (copies_excluded).",
    )


class RunCreate(DataOptions, TrainingOptions, WebhookSubscription):
    """One classifier training and evaluation."""

    n_real_per_class: int | None = Field(
        None, ge=1, le=1_000_000, description="Real training images per class (null: all)."
    )
    synthetic_per_real: int = Field(
        0, ge=0, le=1000, description="k synthetic children of each selected real image."
    )
    synthetic_datasets: list[Name] = Field(
        default_factory=list, description="Synthetic datasets the children come from."
    )
    strategy: Strategy | None = Field(None, description="Only children of this strategy.")
    augmentation: bool = Field(False, description="fastai's aug_transforms() on the inputs.")
    seed: Seed = Field(111108, description="Validation and n_real sampling.")
    name: Name | None = Field(None, max_length=200)
    idempotency_key: Name | None = Field(None, min_length=1, max_length=200)


class ExperimentCreate(DataOptions, TrainingOptions, WebhookSubscription):
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
    synthetic_datasets: list[Name] = Field(default_factory=list)
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
    name: Name | None = Field(None, max_length=200)
    idempotency_key: Name | None = Field(None, min_length=1, max_length=200)


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
    webhook: str | None = Field(None, description="Where the experiment's events are delivered.")
    webhook_events: list[str] | None = None


class ExperimentList(BaseModel):
    items: list[ExperimentOut]
    next_cursor: str | None
