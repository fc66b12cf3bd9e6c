"""The contract of /jobs: a generation job's body, and the view of a job of any kind."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


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
