"""The contract of /models, /conditions and /readyz."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from app.schemas.finetunes import ModelTraining
from app.schemas.jobs import ModelSampling

# The formats every figure the API serves comes in (experiments, fine-tunes, evaluations).
FIGURE_FORMATS = {"png": "image/png", "svg": "image/svg+xml"}


class ModelOut(BaseModel):
    id: str
    pipeline_class: str
    description: str
    created_at: datetime
    base_model: str | None = Field(None, description="A fine-tuned model's base model.")
    condition: str | None = Field(
        None, description="A per-condition fine-tuned model's condition (null when joint)."
    )
    weights_sha256: str | None = None
    sampling_defaults: ModelSampling | None = Field(
        None,
        description="The sampler settings a job on this model takes when it leaves them unset "
        "(from the model folder's synthderm.json); null: the deployment's defaults.",
    )
    training: ModelTraining | None = Field(
        None, description="How a fine-tuned model was trained (null for a base model)."
    )


class ModelList(BaseModel):
    items: list[ModelOut]


class ConditionOut(BaseModel):
    slug: str
    name: str  # the words of the prompt (for an uploaded label, the caller's own)
    shared: bool = Field(
        description="True for the seeded vocabulary every key sees; false for a label this "
        "key uploaded (no other key sees it)."
    )


class ConditionList(BaseModel):
    items: list[ConditionOut]


class CheckResult(BaseModel):
    ok: bool
    detail: str


class Readiness(BaseModel):
    ok: bool
    checks: dict[str, CheckResult]
