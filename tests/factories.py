"""Row factories for tests: real datasets of parent images, written to the store and database
directly (until real dataset upload lands). Uses real Fitzpatrick17k photos from
../shared/data when present, else synthetic skin-coloured images."""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from app.datasets import upsert_image
from app.db.tables import Dataset
from app.ids import new_id
from app.keys import authenticate
from app.storage import image_key

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "fitzpatrick17k_ajl21"


@dataclass(frozen=True)
class Parent:
    image_id: str
    condition: str
    skin_tone: int | None
    sha256: str


def real_photos(condition: str, n: int) -> list[tuple[bytes, int | None]]:
    """Up to n real photos of `condition` with their Fitzpatrick type, or synthetic ones."""
    metadata = SHARED_DATA / "metadata.csv"
    if metadata.is_file():
        with metadata.open() as handle:
            rows = [r for r in csv.DictReader(handle) if r["label"] == condition]
        picked = sorted(rows, key=lambda r: r["path"])[:n]
        if len(picked) == n:
            out = []
            for row in picked:
                tone = int(row["fitzpatrick_scale"])
                out.append(((SHARED_DATA / row["path"]).read_bytes(), tone if tone > 0 else None))
            return out
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        pixels = np.clip(rng.normal((190, 140, 120), 25, (96, 128, 3)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        out.append((buffer.getvalue(), 1 + i % 6))
    return out


def make_real_dataset(stack, raw_key: str, *, condition: str, n: int) -> tuple[str, list[Parent]]:
    """A real dataset of n photos of `condition`, owned by the key; returns (id, parents)."""
    parents: list[Parent] = []
    with stack.session() as session:
        owner = authenticate(session=session, raw_key=raw_key)
        assert owner is not None
        dataset = Dataset(id=new_id(), owner_id=owner.id, name=f"real-{condition}", kind="real")
        session.add(dataset)
        session.flush()
        for data, tone in real_photos(condition, n):
            image_id = new_id()
            key = image_key(dataset_id=dataset.id, condition=condition, image_id=image_id)
            stack.store.put_bytes(key, data, content_type="image/jpeg")
            width, height = Image.open(io.BytesIO(data)).size
            sha = hashlib.sha256(data).hexdigest()
            upsert_image(
                session=session,
                values={
                    "id": image_id,
                    "dataset_id": dataset.id,
                    "source": "real",
                    "condition": condition,
                    "skin_tone": tone,
                    "width": width,
                    "height": height,
                    "sha256": sha,
                    "size_bytes": len(data),
                    "storage_key": key,
                    "provenance": {},
                },
            )
            parents.append(Parent(image_id, condition, tone, sha))
        dataset_id = dataset.id
    return dataset_id, parents
