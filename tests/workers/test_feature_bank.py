"""FeatureBank.get: the rows of each transform in the callers' order, from the cache where it
has them and from the body only where it does not, once per (image, transform); and the
worker's memo of them, which spares later runs the database."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from app.config import Settings
from app.db.session import make_engine, session_factory
from app.db.tables import Base, FeatureCache
from app.experiments import features as feature_cache
from app.experiments.mixtures import ImageRef
from app.storage import LocalStore
from models.transforms import augmented_view_id, eval_transform_id
from tests.helpers import png
from workers import feature_bank

SIZE = 32
NO_MEMO = feature_bank.FeatureMemo(0)  # every read goes to the database
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
    monkeypatch.setattr(feature_bank, "object_store", lambda _settings: store)
    images = []
    for i in range(5):
        data = png(i)
        store.put_bytes(f"img/{i}.png", data, content_type="image/png")
        images.append(ImageRef(id=str(i), sha256=f"{i:064x}", condition="c",
                               storage_key=f"img/{i}.png"))  # fmt: skip
    return settings, images


def make_bank(
    settings: Settings, body: Any, memo: feature_bank.FeatureMemo = NO_MEMO
) -> feature_bank.FeatureBank:
    return feature_bank.FeatureBank(settings, body, size=SIZE, check=lambda: None, memo=memo)


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
    bank = make_bank(settings, body)
    # a repeated image (the same bytes twice, e.g. a parent in two roles) and a shuffled order
    asked = [images[3], images[0], images[3], images[1]]
    first = bank.get(asked, [EVAL, VIEW])
    assert set(first) == {EVAL, VIEW}
    for tensor in first.values():
        assert tensor.shape == (4, 4) and tensor.dtype == torch.float16  # as stored
        assert torch.equal(tensor[0], tensor[2])  # the repeated image, both rows
        assert not torch.equal(tensor[0], tensor[1])
    assert not torch.equal(first[EVAL], first[VIEW])  # the augmented view is another vector
    assert body.images == 3 * 2 and bank.computed == 6 and bank.reused == 0
    # the body's float32 rounded to float16, nothing else
    pixels = feature_bank.load_pixels(
        feature_bank.object_store(settings), [images[3]], size=SIZE, pool=ThreadPoolExecutor(1)
    )
    assert torch.equal(first[EVAL][0], body.features(pixels)[0].half())
    # what is stored is what was returned, bit for bit: 2 bytes a value
    for transform in (EVAL, VIEW):
        cache = stored(settings, transform, asked)
        assert len(cache) == 3
        for row, image in enumerate(asked):
            assert len(cache[image.sha256]) == 4 * 2
            vector = np.frombuffer(cache[image.sha256], dtype="<f2")
            assert np.array_equal(vector, first[transform][row].numpy())

    # partly warm: images 0, 1, 3 are cached, 2 and 4 are not; only those go through the body
    again = make_bank(settings, body)
    body.images = 0
    second = again.get([images[4], images[0], images[2], images[1], images[3]], [EVAL, VIEW])
    assert body.images == 2 * 2 and again.computed == 4 and again.reused == 6
    for transform in (EVAL, VIEW):
        assert torch.equal(second[transform][1], first[transform][1])  # image 0, from the cache
        assert torch.equal(second[transform][4], first[transform][0])  # image 3
    # warm: nothing computed, the same tensors
    body.images = 0
    third = make_bank(settings, body)
    assert torch.equal(third.get(asked, [EVAL])[EVAL], first[EVAL]) and body.images == 0


def test_float32_rows_of_earlier_versions_read_as_if_stored_now(
    bank_parts: tuple[Settings, list[ImageRef]],
) -> None:
    """A cache filled before vectors were stored as float16 stays usable, and gives each run
    the values a fresh computation would: its float32 rounded to float16."""
    settings, images = bank_parts
    body = CountingBody()
    fresh = make_bank(settings, body).get(images[:2], [EVAL])[EVAL]
    with session_factory(settings.database_url)() as session:  # as an earlier version stored
        session.execute(FeatureCache.__table__.delete())
        session.commit()
        pixels = feature_bank.load_pixels(
            feature_bank.object_store(settings), images[:2], size=SIZE, pool=ThreadPoolExecutor(1)
        )
        full = body.features(pixels).numpy()
        feature_cache.store_features(
            session=session, backbone=CountingBody.cache_key, transform=EVAL, dim=4,
            vectors=[(i.sha256, full[j].astype("<f4").tobytes()) for j, i in enumerate(images[:2])],
        )  # fmt: skip
    body.images = 0
    bank = make_bank(settings, body)
    read = bank.get(images[:2], [EVAL])[EVAL]
    assert body.images == 0 and bank.reused == 2
    assert read.dtype == torch.float16 and torch.equal(read, fresh)
    assert not np.array_equal(full.astype(np.float16).astype(np.float32), full)  # it did round
    with pytest.raises(ValueError, match="6 bytes is not 4 values"):
        feature_cache.decode_vector(b"\0" * 6, dim=4)


def test_no_images_give_empty_tensors(bank_parts: tuple[Settings, list[ImageRef]]) -> None:
    settings, _images = bank_parts
    empty = make_bank(settings, CountingBody()).get([], [EVAL, VIEW])
    assert [tuple(t.shape) for t in empty.values()] == [(0, 4), (0, 4)]


def test_a_workers_memo_serves_the_next_run_without_the_database(
    bank_parts: tuple[Settings, list[ImageRef]],
) -> None:
    settings, images = bank_parts
    memo = feature_bank.FeatureMemo(2**20)
    body = CountingBody()
    first = make_bank(settings, body, memo)
    computed = first.get(images[:3], [EVAL, VIEW])
    assert first.computed == 6 and memo.used == 6 * 4 * 2  # six vectors of 4 float16
    with session_factory(settings.database_url)() as session:  # the database forgets them
        session.execute(FeatureCache.__table__.delete())
        session.commit()
    body.images = 0
    later = make_bank(settings, body, memo)
    again = later.get([images[2], images[0], images[1]], [EVAL, VIEW])
    assert body.images == 0 and later.remembered == later.reused == 6 and later.computed == 0
    for transform in (EVAL, VIEW):
        assert torch.equal(again[transform], computed[transform][[2, 0, 1]])
    # what a memo lacks still comes from the database, and joins the memo
    fresh = feature_bank.FeatureMemo(2**20)
    third = make_bank(settings, body, fresh)
    third.get(images[3:], [EVAL])  # computed and stored
    fourth = make_bank(settings, body, feature_bank.FeatureMemo(2**20))
    fourth.get(images[3:], [EVAL])
    assert fourth.reused == 2 and fourth.remembered == 0 and fourth.computed == 0
    assert len(fresh.held(CountingBody.cache_key, EVAL)) == 2


def test_the_memo_keeps_to_its_budget_and_drops_other_backbones_first() -> None:
    vector = np.zeros(8, dtype=np.float16)  # 16 bytes
    memo = feature_bank.FeatureMemo(3 * 16)
    memo.add("old", "eval", "a", vector)
    memo.add("old", "view", "a", vector)
    memo.add("new", "eval", "a", vector)
    memo.held("old", "view")  # read: now more recent than old/eval
    memo.add("new", "eval", "b", vector)  # full: the other backbone's least recent group goes
    assert memo.held("old", "eval") == {} and set(memo.held("old", "view")) == {"a"}
    memo.add("new", "view", "a", vector)  # full again: old/view goes too
    assert memo.held("old", "view") == {} and memo.used == 48
    # full of the backbone in use: what is held stays, the rest is not added (a grid's runs
    # read the same groups in the same order; evicting among them would drop what the next
    # run needs first)
    memo.add("new", "view", "b", vector)
    assert set(memo.held("new", "eval")) == {"a", "b"} and set(memo.held("new", "view")) == {"a"}
    assert memo.used == 48
    # budget 0: nothing is kept
    none = feature_bank.FeatureMemo(0)
    none.add("body", "eval", "a", vector)
    assert none.held("body", "eval") == {} and none.used == 0


def test_the_process_memo_follows_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(feature_bank, "_memo", None)
    memo = feature_bank.feature_memo(Settings(classifier_feature_memory_mb=3))
    assert (
        memo.budget == 3 * 2**20 and feature_bank.feature_memo(Settings()) is memo
    )  # one a process
    monkeypatch.setattr(feature_bank, "_memo", None)
    assert (
        feature_bank.feature_memo(Settings()).budget
        == feature_bank.usable_memory() // 4 // 2**20 * 2**20
    )


def test_usable_memory_is_a_containers_limit_when_lower(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    machine = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit, unlimited = tmp_path / "memory.max", tmp_path / "v1-limit"
    limit.write_text(f"{2**30}\n")
    unlimited.write_text("max\n")  # cgroup v2's "no limit"
    monkeypatch.setattr(
        feature_bank, "CGROUP_MEMORY_LIMITS", (unlimited, tmp_path / "absent", limit)
    )
    assert feature_bank.usable_memory() == min(machine, 2**30)
    monkeypatch.setattr(feature_bank, "CGROUP_MEMORY_LIMITS", (unlimited,))
    assert feature_bank.usable_memory() == machine > 0
