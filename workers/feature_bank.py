"""The frozen backbone's features for classifier runs: the worker's memo of them, the cache in
the database, and the body where neither has them. Trains nothing (workers/train.py does) and
decides nothing about runs; the vectors it returns are exactly what the cache stores.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from app.config import Settings
from app.db.session import session_factory
from app.experiments import features as feature_cache
from app.experiments.mixtures import ImageRef
from app.storage import ObjectStore
from models.backbones import Backbone
from models.transforms import augmented_views, decode_image, eval_transform_id, resize_crop
from workers.chunk_task import object_store

DOWNLOAD_THREADS = 8
# Images per backbone pass when the setting is unset. On the CPU, Lite0's expanded activations
# at batch 32 spill the caches: batch 8 runs ~1.3x faster (bench/RESULTS.md, bench.backbone).
CPU_FEATURE_BATCH = 8
GPU_FEATURE_BATCH = 64


def feature_batch(settings: Settings, device: torch.device) -> int:
    """Images per backbone forward pass on `device`: the setting, or the device's default."""
    if settings.classifier_feature_batch is not None:
        return settings.classifier_feature_batch
    return GPU_FEATURE_BATCH if device.type == "cuda" else CPU_FEATURE_BATCH


def load_pixels(
    store: ObjectStore, images: Sequence[ImageRef], *, size: int, pool: ThreadPoolExecutor
) -> torch.Tensor:
    """(N, 3, size, size) float in [0, 1]: decoded, short side resized, centre cropped."""
    # as fastai's Resize in crop mode

    def one(image: ImageRef) -> torch.Tensor:
        return resize_crop(decode_image(store.get_bytes(image.storage_key)), size=size)

    if not images:
        return torch.zeros(0, 3, size, size)
    return torch.stack(list(pool.map(one, images)))


class FeatureMemo:
    """The vectors this worker process has read or computed, kept for its next runs: a grid's
    runs share most of their images, so later runs take them from memory instead of reading
    them from the database again (at the paper's sizes a run reads gigabytes). Up to a byte
    budget. When it is full, groups of other backbones go first (least recently used first);
    vectors of the backbone in use are then simply not added: every run of a grid reads the
    same groups in the same order, and evicting among them would make each run drop what the
    next one needs. The values are the database's: a (sha256, backbone, transform) vector
    never changes."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.used = 0
        self._groups: OrderedDict[tuple[str, str], dict[str, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    def held(self, backbone: str, transform: str) -> dict[str, np.ndarray]:
        """sha256 -> vector of that group (read it, do not change it)."""
        with self._lock:
            group = self._groups.get((backbone, transform))
            if group is None:
                return {}
            self._groups.move_to_end((backbone, transform))
            return group

    def add(self, backbone: str, transform: str, sha: str, vector: np.ndarray) -> None:
        """Keep `vector` if the budget allows (see the class docstring)."""
        if vector.nbytes > self.budget:  # never fits (a memo of budget 0: off)
            return
        key = (backbone, transform)
        with self._lock:
            group = self._groups.setdefault(key, {})
            self._groups.move_to_end(key)
            if sha in group:
                return
            if self.used + vector.nbytes > self.budget:
                for other in [k for k in self._groups if k[0] != backbone]:
                    self.used -= sum(v.nbytes for v in self._groups.pop(other).values())
                    if self.used + vector.nbytes <= self.budget:
                        break
            if self.used + vector.nbytes <= self.budget:
                group[sha] = vector
                self.used += vector.nbytes


_memo: FeatureMemo | None = None
_memo_lock = threading.Lock()


CGROUP_MEMORY_LIMITS = (
    Path("/sys/fs/cgroup/memory.max"),  # cgroup v2
    Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),  # cgroup v1
)


def usable_memory() -> int:
    """Bytes of memory this process may use: the machine's, or its container's limit if lower."""
    # a container sees the host's memory in sysconf
    usable = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in CGROUP_MEMORY_LIMITS:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            usable = min(usable, int(text))
    return usable


def feature_memo(settings: Settings) -> FeatureMemo:
    """This process's memo, sized by the setting (unset: a quarter of usable_memory())."""
    global _memo
    with _memo_lock:
        if _memo is None:
            megabytes = settings.classifier_feature_memory_mb
            if megabytes is None:
                megabytes = usable_memory() // 4 // 2**20
            _memo = FeatureMemo(megabytes * 2**20)
        return _memo


class FeatureBank:
    """Backbone features by (image, transform): from this worker's memory, else the cache in
    the database, else computed once and stored in both."""

    def __init__(
        self,
        settings: Settings,
        backbone: Backbone,
        *,
        size: int,
        check: Callable[[], None],
        memo: FeatureMemo | None = None,
    ) -> None:
        self.settings = settings
        self.backbone = backbone
        self.size = size
        self.check = check
        self.key = backbone.cache_key
        self.memo = memo if memo is not None else feature_memo(settings)
        self.computed = 0
        self.reused = 0  # from the database or this worker's memory
        self.remembered = 0  # of those, from memory

    def transformed(
        self, pixels: torch.Tensor, images: list[ImageRef], transform: str
    ) -> torch.Tensor:
        """(B, 3, S, S) -> the batch under `transform` (one of eval, or an augmented view)."""
        if transform == eval_transform_id(size=self.size):
            return pixels
        view = int(transform.rsplit("-v", 1)[1])
        return augmented_views(pixels, image_sha256s=[i.sha256 for i in images], view=view)

    def get(self, images: Sequence[ImageRef], transforms: list[str]) -> dict[str, torch.Tensor]:
        """transform -> (len(images), dim) float16 (as stored), rows in the order of `images`."""
        # Each vector goes straight into its rows, from the memo, the cache or the body: besides
        # what the memo keeps, memory holds the result and one batch, not the result again as
        # bytes.
        rows = _Rows(images, transforms, dim=2 * self.backbone.feature_dim)
        # 1. what this worker holds, then what the database cache has
        self._read_memo(rows)
        self.remembered += rows.filled()
        self._read_cache(rows)
        self.reused += rows.filled()
        # 2. the rest: each image decoded once, run through the body once per transform
        missing = rows.missing()
        store = object_store(self.settings)
        batch = feature_batch(self.settings, self.backbone.device)
        with ThreadPoolExecutor(DOWNLOAD_THREADS) as pool:
            for start in range(0, len(missing), batch):
                self.check()
                part = missing[start : start + batch]
                pixels = load_pixels(store, part, size=self.size, pool=pool)
                for transform in transforms:
                    self._compute(rows, part, pixels, transform)
        return rows.tensors()

    def _read_memo(self, rows: _Rows) -> None:
        """Place what this worker's memo holds."""
        for transform in rows.transforms:
            held = self.memo.held(self.key, transform)
            for sha in rows.unique:
                if sha in held:
                    rows.place(transform, sha, held[sha])

    def _read_cache(self, rows: _Rows) -> None:
        """Place what the database cache has of the rest, and remember it."""
        with session_factory(self.settings.database_url)() as session:
            for transform in rows.transforms:
                wanted = [sha for sha in rows.unique if sha not in rows.have[transform]]
                for sha, vector in feature_cache.iter_cached_features(
                    session=session, backbone=self.key, transform=transform, sha256s=wanted
                ):
                    array = feature_cache.decode_vector(vector, dim=rows.dim)
                    rows.place(transform, sha, array)
                    self.memo.add(self.key, transform, sha, array)

    def _compute(
        self, rows: _Rows, part: list[ImageRef], pixels: torch.Tensor, transform: str
    ) -> None:
        """Run `part`'s images lacking `transform` through the body; place, remember, store."""
        done = rows.have[transform]
        todo = [i for i, image in enumerate(part) if image.sha256 not in done]
        if not todo:
            return
        inputs = self.transformed(pixels[todo], [part[i] for i in todo], transform)
        # rounded as stored: a vector is the same whether computed or read back
        vectors = (
            self.backbone.features(inputs).float().cpu().numpy().astype(feature_cache.STORED_DTYPE)
        )
        new = []
        for j, i in enumerate(todo):
            rows.place(transform, part[i].sha256, vectors[j])
            self.memo.add(self.key, transform, part[i].sha256, vectors[j].copy())
            new.append((part[i].sha256, feature_cache.encode_vector(vectors[j])))
        self.computed += len(new)
        with session_factory(self.settings.database_url)() as session:
            feature_cache.store_features(
                session=session, backbone=self.key, transform=transform, dim=rows.dim,
                vectors=new,
            )  # fmt: skip


class _Rows:
    """The result of one FeatureBank.get being filled: per transform, a (len(images), dim)
    float16 array, and the sha256s placed in it so far."""

    def __init__(self, images: Sequence[ImageRef], transforms: list[str], *, dim: int) -> None:
        self.transforms = transforms
        self.dim = dim
        self.rows_of: dict[str, list[int]] = {}
        for row, image in enumerate(images):
            self.rows_of.setdefault(image.sha256, []).append(row)
        self.unique = {image.sha256: image for image in images}
        self.out = {
            t: np.empty((len(images), dim), dtype=feature_cache.STORED_DTYPE) for t in transforms
        }
        self.have: dict[str, set[str]] = {t: set() for t in transforms}

    def place(self, transform: str, sha: str, vector: np.ndarray) -> None:
        """Copy `vector` into every row of image `sha`."""
        rows = self.rows_of[sha]
        if len(rows) == 1:  # a plain row index copies ~5x faster than a list of one
            self.out[transform][rows[0]] = vector
        else:
            self.out[transform][rows] = vector
        self.have[transform].add(sha)

    def filled(self) -> int:
        """(image, transform) vectors placed so far."""
        return sum(len(h) for h in self.have.values())

    def missing(self) -> list[ImageRef]:
        """The images that lack a vector of some transform."""
        return [
            image
            for sha, image in self.unique.items()
            if any(sha not in self.have[t] for t in self.transforms)
        ]

    def tensors(self) -> dict[str, torch.Tensor]:
        """transform -> the filled rows, as a tensor (no copy)."""
        return {t: torch.from_numpy(self.out[t]) for t in self.transforms}
