"""The contract of /jobs: a generation job's body, the options it stores, and the view of a job
of any kind.

Torch-free, like all of app/. The sampler's knobs are declared once here: `SamplerOptions`
(with the paper's defaults beside it) is what a job stores in `Job.params` and what the worker
reads back. models/strategies.py keeps its own copy of the defaults (models/ never imports
app/); tests/models/test_strategy_contract.py ties the two.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from app.schemas.text import FreeText, Name
from app.schemas.webhooks import WebhookSubscription


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
    # shown, never stored: a canceled job whose running chunks still finish their current
    # batch (their images still count); it reads `canceled`, with the final count, once they stop
    CANCELING = "canceling"


ACTIVE_JOB_STATUSES = (JobStatus.QUEUED, JobStatus.RUNNING)

# The sampler's defaults (PAPER.md section 2): guidance and steps are the deployment's to change
# (Settings.default_guidance_scale, default_num_inference_steps); the rest are the paper's
# (section 2b; image-to-image is beyond the paper). An unset size is the pipeline's own.
DEFAULT_GUIDANCE_SCALE = 3.0
DEFAULT_NUM_INFERENCE_STEPS = 50
DEFAULT_STRENGTH = {
    Strategy.INPAINT: 0.97,
    Strategy.INPAINT_OUTPAINT: 0.97,
    Strategy.IMAGE_TO_IMAGE: 0.75,
}
DEFAULT_OUTPAINT_STRENGTH = 0.95
DEFAULT_MASK_FRACTION = 0.25
DEFAULT_FRAME_PX = 16

# Each knob's type and bounds, shared by the request body and the stored options.
GuidanceScale = Annotated[float | None, Field(ge=0, le=50)]
InferenceSteps = Annotated[int | None, Field(ge=1, le=1000)]
Strength = Annotated[
    float | None,
    Field(
        gt=0,
        le=1,
        description=f"Edit strength (inpaint {DEFAULT_STRENGTH[Strategy.INPAINT]}, "
        f"image-to-image {DEFAULT_STRENGTH[Strategy.IMAGE_TO_IMAGE]}).",
    ),
]
OutpaintStrength = Annotated[
    float | None,
    Field(
        gt=0,
        le=1,
        description=f"Strength of inpaint-outpaint's second pass ({DEFAULT_OUTPAINT_STRENGTH}).",
    ),
]
MaskFraction = Annotated[
    float | None,
    Field(
        gt=0,
        lt=0.5,
        description=f"Border of the central mask, per side ({DEFAULT_MASK_FRACTION}).",
    ),
]
FramePx = Annotated[
    int | None,
    Field(
        ge=0,
        le=255,
        description=f"Frame kept by inpaint-outpaint, in pixels ({DEFAULT_FRAME_PX}).",
    ),
]
ImageSide = Annotated[int | None, Field(ge=8, le=2048, multiple_of=8)]
Fraction = Annotated[float, Field(ge=0, le=1)]


def _start_below_end(interval: tuple[float, float] | None) -> tuple[float, float] | None:
    if interval is not None and not interval[0] < interval[1]:
        raise ValueError(f"the start {interval[0]} must be below the end {interval[1]}")
    return interval


GuidanceInterval = Annotated[
    tuple[Fraction, Fraction] | None,
    AfterValidator(_start_below_end),
    Field(
        description="[start, end): guidance applies only to the steps in this part of the "
        "num_inference_steps schedule (0: pure noise, 1: the image), the others take the "
        "conditional prediction (guidance 1). Unset: every step (the paper's).",
        examples=[[0.4, 1.0]],
    ),
]
NegativePrompt = Annotated[FreeText | None, Field(max_length=2000)]


class SamplerOptions(BaseModel):
    """The sampler's knobs a job may set; None is the default (`filled` says which)."""

    guidance_scale: GuidanceScale = None
    guidance_interval: GuidanceInterval = None
    num_inference_steps: InferenceSteps = None
    strength: Strength = None
    width: ImageSide = None
    height: ImageSide = None
    mask_fraction: MaskFraction = None
    outpaint_strength: OutpaintStrength = None
    frame_px: FramePx = None
    negative_prompt: NegativePrompt = None

    def filled(
        self, *, guidance_scale: float, num_inference_steps: int, width: int, height: int
    ) -> SamplerOptions:
        """These options with each unset knob but strength set: the given ones, else the paper's."""
        # An unset strength stays unset: the sampler takes its strategy's DEFAULT_STRENGTH.
        defaults: dict[str, Any] = {
            "guidance_scale": guidance_scale,
            "num_inference_steps": num_inference_steps,
            "width": width,
            "height": height,
            "mask_fraction": DEFAULT_MASK_FRACTION,
            "outpaint_strength": DEFAULT_OUTPAINT_STRENGTH,
            "frame_px": DEFAULT_FRAME_PX,
        }
        values = {name: getattr(self, name) for name in SamplerOptions.model_fields}
        values.update({k: v for k, v in defaults.items() if values[k] is None})
        # not validated again: the settings' and the pipeline's values are taken as they are
        return SamplerOptions.model_construct(**values)

    def over(self, defaults: SamplerOptions | None) -> SamplerOptions:
        """These options with each unset knob taken from `defaults` (a model's own)."""
        if defaults is None:
            return self
        own = defaults.model_dump(exclude_none=True)
        return self.model_copy(update={k: v for k, v in own.items() if getattr(self, k) is None})


def _is_none(value: object) -> bool:
    return value is None


class ModelSampling(SamplerOptions):
    """A generator's own sampler defaults, the `sampling` object of its folder's synthderm.json
    (GET /models shows them): a job on the model takes them for the knobs it leaves unset,
    before the deployment's defaults (Settings.default_guidance_scale, ...) and the paper's."""

    model_config = ConfigDict(extra="forbid")


# GET /models shows only the knobs a model sets (an unset one is the deployment's)
for _field in ModelSampling.model_fields.values():
    _field.exclude_if = _is_none
ModelSampling.model_rebuild(force=True)


class GenerationParams(SamplerOptions):
    """`Job.params` of a generation job (JobOut.params shows it): its sampler options, the real
    dataset its parents come from, and k, its images per parent."""

    source_dataset: str | None = None
    synthetic_per_real: int = 1

    def stored(self) -> dict[str, Any]:
        """The JSON stored: the values set, in the key order jobs have always had."""
        out = self.model_dump(exclude_none=True, exclude={"negative_prompt", "synthetic_per_real"})
        if self.negative_prompt:  # an empty negative prompt is none
            out["negative_prompt"] = self.negative_prompt
        out["synthetic_per_real"] = self.synthetic_per_real
        return out


class JobCreate(WebhookSubscription):
    """A generation job: `count` images of `condition` on `skin_tone` skin."""

    model_config = ConfigDict(extra="forbid")

    condition: Name = Field(min_length=1, max_length=120, examples=["psoriasis"])
    skin_tone: int | None = Field(None, ge=1, le=6, description="Fitzpatrick type 1..6 or null.")
    strategy: Strategy = Strategy.TEXT_TO_IMAGE
    count: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="Images to make. With source_dataset it may be left out: every matching "
        "parent times synthetic_per_real.",
    )
    model: Name | None = Field(None, max_length=120, description="Generator id (GET /models).")
    source_dataset: Name | None = Field(None, description="Real dataset of parent images.")
    dataset_id: Name | None = Field(None, description="Append to this synthetic dataset.")
    dataset_name: Name | None = Field(None, max_length=200)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    guidance_scale: GuidanceScale = None
    guidance_interval: GuidanceInterval = None
    num_inference_steps: InferenceSteps = None
    synthetic_per_real: int = Field(
        1, ge=1, le=1000, description="k: images per parent image (PAPER.md section 4)."
    )
    strength: Strength = None
    outpaint_strength: OutpaintStrength = None
    mask_fraction: MaskFraction = None
    frame_px: FramePx = None
    width: ImageSide = None
    height: ImageSide = None
    negative_prompt: NegativePrompt = None
    idempotency_key: Name | None = Field(None, min_length=1, max_length=200)

    def generation_params(self) -> GenerationParams:
        """What the job stores of this body (its sampler options, source and k)."""
        return GenerationParams.model_validate(
            self.model_dump(include=set(GenerationParams.model_fields))
        )


class ChunkStep(BaseModel):
    chunk: int
    done: int = Field(description="Images of the chunk written so far.")
    step: int | None = Field(description="Sampler step of the batch in flight.")
    steps: int | None
    heartbeat_age_s: float | None = Field(
        None, description="Seconds since the chunk's worker last reported (its heartbeat)."
    )
    stalled: bool = Field(
        False,
        description="No heartbeat for three heartbeat intervals: its worker is likely gone, "
        "and recovery re-queues the chunk once the heartbeat is stale_after_s old.",
    )


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
    webhook: str | None = Field(None, description="Where the job's events are delivered.")
    webhook_events: list[str] | None = None


class JobList(BaseModel):
    items: list[JobOut]
    next_cursor: str | None
