"""workers.generate._sample_group alone (no services): every image of a fixed group is sampled
once, whatever out-of-memory does to the batch limit on the way."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from workers.generate import _sample_group
from workers.sampling import BatchLimit


class Writer:
    def __init__(self) -> None:
        self.images: dict[int, list[int]] = {}

    def submit(self, index: int, image: Image.Image, provenance: dict[str, Any]) -> None:
        assert index not in self.images, f"image {index} sampled twice"
        self.images[index] = provenance["batch"]

    def write(self, *, wait_all: bool) -> None:
        pass


def test_a_limit_that_shrinks_mid_group_skips_no_image() -> None:
    # the worker's limit is 2 from an earlier job; batches over 1 now run out of memory
    limit, writer, calls = BatchLimit(2), Writer(), []

    def sample(indices: list[int]) -> list[Image.Image]:
        calls.append(list(indices))
        if len(indices) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return [Image.new("RGB", (8, 8)) for _ in indices]

    _sample_group(
        [10, 11, 12, 13], sample=sample, limit=limit, done=set(), writer=writer,
        provenance=lambda index, batch: {"batch": batch},
    )  # fmt: skip
    assert sorted(writer.images) == [10, 11, 12, 13]
    assert limit.limit == 1
    assert all(writer.images[i] == [i] for i in writer.images)  # each recorded with its batch
    assert calls == [[10, 11], [10], [11], [12], [13]]


def test_images_already_stored_are_not_handed_on() -> None:
    writer = Writer()
    _sample_group(
        [0, 1, 2], sample=lambda ix: [Image.new("RGB", (8, 8)) for _ in ix],
        limit=BatchLimit(4), done={1}, writer=writer, provenance=lambda i, b: {"batch": b},
    )  # fmt: skip
    assert writer.images == {0: [0, 1, 2], 2: [0, 1, 2]}
