"""Deterministic identifiers and seeds: a retried chunk reproduces the same ids, keys, seeds.

Every uuid5 namespace is here. Their values are part of stored ids: never change one.
"""

from __future__ import annotations

import hashlib
import uuid

_SYNTHETIC_IMAGE_NAMESPACE = uuid.UUID("5f0c2d0e-6b7e-4b8e-9a47-6d2b8f4f1c11")
_REAL_IMAGE_NAMESPACE = uuid.UUID("8b1f2c55-0e55-4a8a-8f57-0a86a3c5c0de")
_COPY_NAMESPACE = uuid.UUID("2f4e9d7a-3c1b-4d5e-8f6a-7b8c9d0e1f2a")


def new_id() -> str:
    return str(uuid.uuid4())


def synthetic_image_id(job_id: str, index: int) -> str:
    """The id of image `index` of a job: the same on every run of its chunk."""
    return str(uuid.uuid5(_SYNTHETIC_IMAGE_NAMESPACE, f"{job_id}:{index}"))


def real_image_id(job_id: str, csv_row: int) -> str:
    """The id of the image an ingest job reads from CSV row `csv_row`: the same on a rerun."""
    return str(uuid.uuid5(_REAL_IMAGE_NAMESPACE, f"{job_id}:{csv_row}"))


def copy_id(dataset_id: str, original_id: str) -> str:
    """The id of an image's copy in a combined dataset."""
    return str(uuid.uuid5(_COPY_NAMESPACE, f"{dataset_id}:{original_id}"))


def image_seed(job_seed: int, index: int) -> int:
    """Seed of image `index`: independent streams per image, fits a torch.Generator (< 2**63)."""
    digest = hashlib.sha256(f"{job_seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)
