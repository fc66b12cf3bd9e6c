"""The contract of /datasets: datasets, their counts, the manifest's rows and query values,
uploads, combine and exports."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.fitzpatrick import UNKNOWN_GROUP
from app.schemas.jobs import Strategy
from app.schemas.text import FreeText, Name

# The paper's public release holds at most 5,000 samples per shard (PAPER.md section 5).
MAX_SHARD_SIZE = 5000


class ManifestFormat(StrEnum):
    JSONL = "jsonl"
    CSV = "csv"
    PARQUET = "parquet"


class Source(StrEnum):
    REAL = "real"
    SYNTHETIC = "synthetic"


class SkinToneGroup(StrEnum):
    I_II = "I-II"
    III_IV = "III-IV"
    V_VI = "V-VI"
    UNKNOWN = UNKNOWN_GROUP


class Split(StrEnum):
    TRAIN = "train"
    VALIDATION = "validation"
    TEST = "test"


class CsvFormat(StrEnum):
    AUTO = "auto"
    GENERIC = "generic"
    FITZPATRICK17K = "fitzpatrick17k"
    DDI = "ddi"


class OnError(StrEnum):
    FAIL = "fail"
    SKIP = "skip"


class DatasetStatus(StrEnum):
    """A dataset's state, from the jobs that write into it (ingest, generate)."""

    INGESTING = "ingesting"  # an upload's ingest job is queued or running: not complete yet
    GENERATING = "generating"  # a generation job into it is queued or running
    READY = "ready"  # nothing writes into it now
    FAILED = "failed"  # every job that wrote into it failed


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
    status: DatasetStatus = Field(
        DatasetStatus.READY,
        description="ingesting or generating while a job writes into it (image_count still "
        "grows), failed when every job that wrote into it failed, else ready.",
    )
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
    next_cursor: str | None = Field(
        None, description="The next page's cursor (pass it as `cursor`); null on the last page."
    )


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


class PartIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset_id: Name
    condition: Name | None = None
    skin_tone: int | None = Field(None, ge=1, le=6)
    strategy: Strategy | None = None
    source: Literal["real", "synthetic"] | None = None
    split: Literal["train", "validation", "test"] | None = None
    children_of: int | None = Field(
        None, ge=0, description="Keep only images whose parent an earlier part (by index) took."
    )


class CombineIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name = Field(min_length=1, max_length=200)
    description: FreeText = Field("", max_length=2000)
    parts: list[PartIn] = Field(min_length=1, max_length=50)


class ExportCreate(BaseModel):
    """An export of a dataset (or of the images the filters select) as WebDataset shards."""

    model_config = ConfigDict(extra="forbid")

    shard_size: int = Field(
        MAX_SHARD_SIZE,
        ge=1,
        le=MAX_SHARD_SIZE,
        description="Samples per shard (the paper's release: at most 5,000).",
    )
    shuffle: bool = Field(False, description="Shuffle the samples (else image-id order).")
    seed: int | None = Field(
        None, ge=0, le=2**63 - 1, description="Shuffle seed; drawn and recorded when unset."
    )
    condition: Name | None = Field(None, min_length=1, max_length=120)
    skin_tone: int | None = Field(None, ge=1, le=6, description="Fitzpatrick type 1..6.")
    strategy: Strategy | None = None
    source: Literal["real", "synthetic"] | None = None
