"""Deterministic identifiers and seeds: a retried chunk reproduces the same ids, keys, seeds."""

from __future__ import annotations

import hashlib
import uuid

_IMAGE_NAMESPACE = uuid.UUID("5f0c2d0e-6b7e-4b8e-9a47-6d2b8f4f1c11")


def new_id() -> str:
    return str(uuid.uuid4())


def synthetic_image_id(job_id: str, index: int) -> str:
    """The id of image `index` of a job: the same on every run of its chunk."""
    return str(uuid.uuid5(_IMAGE_NAMESPACE, f"{job_id}:{index}"))


def image_seed(job_seed: int, index: int) -> int:
    """Seed of image `index`: independent streams per image, fits a torch.Generator (< 2**63)."""
    digest = hashlib.sha256(f"{job_seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)
