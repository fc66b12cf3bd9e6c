"""FeatureBank.get: the rows of each transform in the callers' order, from the cache where it
has them and from the body only where it does not, once per (image, transform)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from app import features as feature_cache
from app.config import Settings
from app.db.session import make_engine, session_factory
from app.db.tables import Base
from app.mixtures import ImageRef
from app.storage import LocalStore
from models.transforms import augmented_view_id, eval_transform_id
from tests.workers.test_ingest import png
from workers import train

SIZE = 32
EVAL = eval_transform_id(size=SIZE)
VIEW = augmented_view_id(0, size=SIZE)


class CountingBody:
    """A stand-in backbone: 4 numbers per image from its pixels; counts what it computes."""

    cache_key = "test-body"
    feature_dim = 2
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.images = 0

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        self.images += len(pixels)
        return torch.stack(
            [pixels.mean((1, 2, 3)), pixels.amax((1, 2, 3)), pixels[:, 0].mean((1, 2)),
             pixels[:, 2].mean((1, 2))], dim=1,
        )  # fmt: skip


@pytest.fixture
def bank_parts(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Settings, list[ImageRef]]:
    settings = Settings(
        data_dir=tmp_path, database_url=database_url, storage_backend="local",
        storage_dir=tmp_path / "store", classifier_feature_batch=2,
    )  # fmt: skip
    Base.metadata.create_all(make_engine(settings.database_url))
    store = LocalStore(tmp_path / "store", base_url="http://t", secret="s", expiry_s=60)
    monkeypatch.setattr(train, "object_store", lambda _settings: store)
    images = []
    for i in range(5):
        data = png(i)
        store.put_bytes(f"img/{i}.png", data, content_type="image/png")
        images.append(ImageRef(id=str(i), sha256=f"{i:064x}", condition="c",
                               storage_key=f"img/{i}.png"))  # fmt: skip
    return settings, images


def stored(settings: Settings, transform: str, images: list[ImageRef]) -> dict[str, bytes]:
    with session_factory(settings.database_url)() as session:
        return dict(
            feature_cache.iter_cached_features(
                session=session, backbone=CountingBody.cache_key, transform=transform,
                sha256s=[i.sha256 for i in images],
            )
        )  # fmt: skip


def test_rows_follow_the_callers_order_and_each_vector_is_computed_once(
    bank_parts: tuple[Settings, list[ImageRef]],
) -> None:
    settings, images = bank_parts
    body = CountingBody()
    bank = train.FeatureBank(settings, body, size=SIZE, check=lambda: None)  # type: ignore[arg-type]
    # a repeated image (the same bytes twice, e.g. a parent in two roles) and a shuffled order
    asked = [images[3], images[0], images[3], images[1]]
    first = bank.get(asked, [EVAL, VIEW])
    assert set(first) == {EVAL, VIEW}
    for tensor in first.values():
        assert tensor.shape == (4, 4) and tensor.dtype == torch.float32
        assert torch.equal(tensor[0], tensor[2])  # the repeated image, both rows
        assert not torch.equal(tensor[0], tensor[1])
    assert not torch.equal(first[EVAL], first[VIEW])  # the augmented view is another vector
    assert body.images == 3 * 2 and bank.computed == 6 and bank.reused == 0
    # what is stored is what was returned, bit for bit
    for transform in (EVAL, VIEW):
        cache = stored(settings, transform, asked)
        assert len(cache) == 3
        for row, image in enumerate(asked):
            vector = np.frombuffer(cache[image.sha256], dtype="<f4")
            assert np.array_equal(vector, first[transform][row].numpy())

    # partly warm: images 0, 1, 3 are cached, 2 and 4 are not; only those go through the body
    again = train.FeatureBank(settings, body, size=SIZE, check=lambda: None)  # type: ignore[arg-type]
    body.images = 0
    second = again.get([images[4], images[0], images[2], images[1], images[3]], [EVAL, VIEW])
    assert body.images == 2 * 2 and again.computed == 4 and again.reused == 6
    for transform in (EVAL, VIEW):
        assert torch.equal(second[transform][1], first[transform][1])  # image 0, from the cache
        assert torch.equal(second[transform][4], first[transform][0])  # image 3
    # warm: nothing computed, the same tensors
    body.images = 0
    third = train.FeatureBank(settings, body, size=SIZE, check=lambda: None)  # type: ignore[arg-type]
    assert torch.equal(third.get(asked, [EVAL])[EVAL], first[EVAL]) and body.images == 0


def test_no_images_give_empty_tensors(bank_parts: tuple[Settings, list[ImageRef]]) -> None:
    settings, _images = bank_parts
    bank: Any = train.FeatureBank(settings, CountingBody(), size=SIZE, check=lambda: None)  # type: ignore[arg-type]
    empty = bank.get([], [EVAL, VIEW])
    assert [tuple(t.shape) for t in empty.values()] == [(0, 4), (0, 4)]
