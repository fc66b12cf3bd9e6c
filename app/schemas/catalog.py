"""The contract of /models, /conditions and /readyz."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel


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
