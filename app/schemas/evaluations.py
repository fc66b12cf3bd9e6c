"""The contract of /evaluations (issue 23): the quality and privacy report of a synthetic
dataset against real data. The result is JSON whose every number names its feature space
(`fd_lite0`); README "Quality and privacy of synthetic data" describes its fields."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.schemas.experiments import BACKBONE_PATTERN, TrainingOptions
from app.schemas.jobs import JobStatus, Timings
from app.schemas.text import Name
from app.schemas.webhooks import WebhookSubscription

# The figures every evaluation draws (PNG and SVG each), in report order; after them, one
# contact sheet per condition, named CONDITION_SHEET_PREFIX + the condition's slug (the result's
# `figures` lists them all).
EVALUATION_PLOTS = ("contact-sheet", "closest-pairs", "ita", "pca", "prdc")
CONDITION_SHEET_PREFIX = "contact-sheet-"


class PairsFormat(StrEnum):
    CSV = "csv"
    JSONL = "jsonl"


class EvaluationCreate(WebhookSubscription):
    """Evaluate the caller's `synthetic_dataset` against the caller's real `real_dataset`."""

    model_config = ConfigDict(extra="forbid")

    synthetic_dataset: Name = Field(max_length=36, description="A synthetic dataset of yours.")
    real_dataset: Name = Field(max_length=36, description="The real reference dataset.")
    real_split: Name | None = Field(
        None,
        max_length=16,
        description="The reference images (fidelity, memorisation, the real utility baseline). "
        "Null: the generator's own training images when every synthetic image comes from a "
        "fine-tuned model with known lineage, else the reference's `train` split.",
    )
    test_split: Name = Field(
        "test", max_length=16, description="The reference's split the utility score tests on."
    )
    conditions: list[Name] | None = Field(
        None, min_length=1, max_length=200, description="Null: every condition both datasets have."
    )
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Halves, subsets, bootstrap, heads.")
    backbone: Name | None = Field(
        None,
        max_length=120,
        json_schema_extra={"pattern": BACKBONE_PATTERN},
        description="The feature space (default: the classifier_backbone setting), from the "
        "classifiers' feature cache.",
    )
    idempotency_key: Name | None = Field(None, min_length=1, max_length=200)

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, value: str | None) -> str | None:
        return TrainingOptions._known_backbone(value)  # the experiments' rule


class EvaluationProgress(BaseModel):
    step: int = Field(description="Stages done.")
    steps: int
    stage: str | None = Field(description="The stage running now.")


class EvaluationOut(BaseModel):
    id: str
    status: JobStatus
    synthetic_dataset: str
    real_dataset: str
    real_split: str | None = Field(description="As asked (null: chosen by the worker).")
    test_split: str
    conditions: list[str]
    seed: int
    backbone: str
    progress: EvaluationProgress
    timings: Timings
    result: dict[str, Any] | None = Field(
        description="The report: fidelity, utility, skin_tone, memorisation (null until done)."
    )
    plots: list[str] = Field(description="The figures' names, once drawn (.png or .svg).")
    error: str | None
    idempotency_key: str | None
    webhook: str | None = None
    webhook_events: list[str] | None = None


class EvaluationList(BaseModel):
    items: list[EvaluationOut]
    next_cursor: str | None


class PairRow(BaseModel):
    """One synthetic image of the memorisation audit (a line of /pairs?format=jsonl)."""

    image_id: str
    condition: str
    skin_tone: int | None
    strategy: str | None
    nearest_image_id: str = Field(description="Its nearest real training image (cosine).")
    cosine: float
    ssim: float | None = Field(description="SSIM of the pair at 64 px, grey.")
    parent_image_id: str | None
    parent_cosine: float | None
    parent_ssim: float | None
    flagged: bool = Field(description="cosine >= the calibrated copy threshold.")
