"""An experiment's grid: the fields its runs share, the settings it expands to, and the key a
run's results are reused by.

Pure values: no database, no torch. A setting is named by its fields (Setting), never by
position, so adding or reordering a field cannot pair a setting with the wrong control.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from collections.abc import Mapping
from typing import Any

from app.errors import InvalidField
from app.schemas import ExperimentCreate

MAX_RUNS = 2000
# Fields of a request that every run of it shares (data and training options).
SHARED_FIELDS = (
    "dataset",
    "test_split",
    "test_dataset",
    "test_per_class",
    "validation_per_class",
    "conditions",
    "top_n_classes",
    "backbone",
    "max_epochs",
    "patience",
    "learning_rate",
    "weight_decay",
    "batch_size",
    "image_size",
    "cache_features",
)


@dataclasses.dataclass(frozen=True)
class Setting:
    """What makes runs of one setting (the seeds vary within it)."""

    n_real_per_class: int | None
    synthetic_per_real: int
    strategy: str | None
    synthetic_dataset: str | None
    augmentation: bool

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Setting:
        """The setting of a run's config (the seed and the shared fields are ignored)."""
        values: dict[str, Any] = {name: config.get(name) for name in SETTING_FIELDS}
        return cls(**values)

    def real_only(self) -> Setting:
        """The real-only control: the same n_real and augmentation, no synthetic images."""
        return dataclasses.replace(
            self, synthetic_per_real=0, strategy=None, synthetic_dataset=None
        )

    def as_dict(self) -> dict[str, Any]:
        """The fields by name, in SETTING_FIELDS order (a report's `setting`)."""
        return {name: getattr(self, name) for name in SETTING_FIELDS}

    def sort_key(self) -> tuple[tuple[bool, Any], ...]:
        """Numeric order field by field, null (all real images; any strategy) last."""
        return tuple((v is None, v if v is not None else 0) for v in self.as_dict().values())


# What makes runs of one setting, in order: Setting's fields.
SETTING_FIELDS = tuple(field.name for field in dataclasses.fields(Setting))


def expand_grid(params: ExperimentCreate) -> list[dict[str, Any]]:
    """The experiment's runs, one config each. Real-only runs (k = 0) do not depend on a
    strategy or a synthetic dataset, so they are made once per n_real, augmentation, seed."""
    ks = sorted(set(params.synthetic_per_real))
    if any(k > 0 for k in ks) and not params.synthetic_datasets:
        raise InvalidField(
            "synthetic_datasets: synthetic_per_real > 0 needs at least one synthetic dataset",
            field="synthetic_datasets",
        )
    configs: list[dict[str, Any]] = []
    for n_real, augmentation, k in itertools.product(
        list(dict.fromkeys(params.n_real_per_class)), list(dict.fromkeys(params.augmentation)), ks
    ):
        sources: list[tuple[str | None, str | None]] = [(None, None)]
        if k > 0:
            sources = [
                (dataset, strategy.value if strategy else None)
                for dataset, strategy in itertools.product(
                    list(dict.fromkeys(params.synthetic_datasets)),
                    list(dict.fromkeys(params.strategies)),
                )
            ]
        for (dataset, strategy), seed in itertools.product(
            sources, list(dict.fromkeys(params.seeds))
        ):
            configs.append(
                {
                    "n_real_per_class": n_real,
                    "synthetic_per_real": k,
                    "strategy": strategy,
                    "synthetic_dataset": dataset,
                    "augmentation": augmentation,
                    "seed": seed,
                }
            )
    if len(configs) > MAX_RUNS:
        raise InvalidField(
            f"seeds: the grid has {len(configs)} runs, more than {MAX_RUNS}; split it",
            field="seeds",
        )
    return configs


# Part of every run's config key. Bump it with any change to what a run computes (the
# sampling, the training, the metrics): a finished twin is reused only when made by code that
# computes the same thing. 2: sampling ordered by image bytes, not ids; 3: validation from
# the dataset's own validation split when it has one; 4: cached features stored and trained
# on as float16.
RESULTS_VERSION = 4


def config_key(*, shared: dict[str, Any], config: dict[str, Any], fingerprint: Any) -> str:
    """The key a run's results are reused by: its request, data and RESULTS_VERSION."""
    text = json.dumps([shared, config, fingerprint, RESULTS_VERSION], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()
