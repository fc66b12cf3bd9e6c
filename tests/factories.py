"""Row factories for tests: real datasets of parent images, written to the store and database
directly (faster than an upload and its ingest job, which tests/workers/test_ingest.py
covers). Uses real Fitzpatrick17k photos from ../shared/data when present, else synthetic
skin-coloured images."""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from app.datasets.repository import upsert_image
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


# --- classifier data --------------------------------------------------------------------------

# Three visually separable "conditions": a colour and a texture each.
SEPARABLE = {
    "acne": ((200, 60, 60), "spots"),
    "eczema": ((60, 160, 70), "stripes"),
    "psoriasis": ((70, 80, 200), "plain"),
}


def separable_png(condition: str, seed: int, size: int = 48) -> bytes:
    """A small image of one SEPARABLE class: its colour and texture, with per-image noise."""
    colour, texture = SEPARABLE[condition]
    rng = np.random.default_rng(seed)
    pixels = np.ones((size, size, 3)) * np.array(colour) + rng.normal(0, 20, (size, size, 3))
    if texture == "stripes":
        pixels[:, ::6] *= 0.4
    elif texture == "spots":
        for y, x in rng.integers(4, size - 4, (6, 2)):
            pixels[y - 3 : y + 3, x - 3 : x + 3] = (40, 20, 20)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _add_image(stack, session, *, dataset_id: str, condition: str, data: bytes,
               **values: object) -> str:  # fmt: skip
    image_id = new_id()
    key = image_key(dataset_id=dataset_id, condition=condition, image_id=image_id)
    stack.store.put_bytes(key, data, content_type="image/png")
    upsert_image(
        session=session,
        values={
            "id": image_id, "dataset_id": dataset_id, "condition": condition, "width": 48,
            "height": 48, "sha256": hashlib.sha256(data).hexdigest(), "size_bytes": len(data),
            "storage_key": key, "provenance": {}, **values,
        },
    )  # fmt: skip
    return image_id


def make_classification_data(
    stack, raw_key: str, *, pool_per_class: int, test_per_class: int, children_per_parent: int
) -> tuple[str, str]:
    """A real dataset of the SEPARABLE classes (pool images, and `test` split ones), skin
    types 1..6 and unknown in turn, and a synthetic dataset with children of every pool image
    (strategy inpaint); returns (real id, synthetic id)."""
    with stack.session() as session:
        owner = authenticate(session=session, raw_key=raw_key)
        assert owner is not None
        real = Dataset(id=new_id(), owner_id=owner.id, name="separable-real", kind="real")
        synthetic = Dataset(id=new_id(), owner_id=owner.id, name="separable-syn", kind="synthetic")
        session.add_all([real, synthetic])
        session.flush()
        seed = 0
        for condition in SEPARABLE:
            for i in range(pool_per_class + test_per_class):
                seed += 1
                split = "test" if i >= pool_per_class else "train"
                tone = None if seed % 7 == 0 else 1 + seed % 6
                parent = _add_image(
                    stack, session, dataset_id=real.id, condition=condition,
                    data=separable_png(condition, seed), source="real", split=split,
                    skin_tone=tone,
                )  # fmt: skip
                if split == "test":
                    continue
                for j in range(children_per_parent):
                    _add_image(
                        stack, session, dataset_id=synthetic.id, condition=condition,
                        data=separable_png(condition, 100_000 + seed * 100 + j),
                        source="synthetic", strategy="inpaint", parent_image_id=parent,
                    )  # fmt: skip
        return real.id, synthetic.id


def make_split_dataset(
    stack, raw_key: str, *, splits: dict[str, dict[str, int]], name: str = "real-splits"
) -> tuple[str, dict[str, dict[str, list[str]]]]:
    """One real dataset holding, per condition, n images of each split ({condition: {split:
    n}}: the condition's first photos in path order, split by split); returns (id,
    {condition: {split: [image ids]}})."""
    ids: dict[str, dict[str, list[str]]] = {}
    with stack.session() as session:
        owner = authenticate(session=session, raw_key=raw_key)
        assert owner is not None
        dataset = Dataset(id=new_id(), owner_id=owner.id, name=name, kind="real")
        session.add(dataset)
        session.flush()
        for condition, counts in splits.items():
            photos = iter(real_photos(condition, sum(counts.values())))
            ids[condition] = {}
            for split, n in counts.items():
                ids[condition][split] = []
                for _ in range(n):
                    data, tone = next(photos)
                    width, height = Image.open(io.BytesIO(data)).size
                    image_id = _add_image(stack, session, dataset_id=dataset.id,
                                          condition=condition, data=data, source="real",
                                          skin_tone=tone, split=split, width=width,
                                          height=height)  # fmt: skip
                    ids[condition][split].append(image_id)
        dataset_id = dataset.id
    return dataset_id, ids
