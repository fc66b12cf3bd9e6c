"""The contract of /datasets: datasets, their counts and the manifest's rows."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field


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
