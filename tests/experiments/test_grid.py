"""The grid: a setting is named by its fields, so its real-only control is found whatever
their order; run configs and their keys stay what earlier versions stored. No database."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest

from app.errors import InvalidField
from app.experiments import grid as grid_module
from app.experiments.grid import (
    MAX_RUNS,
    RESULTS_VERSION,
    SETTING_FIELDS,
    Setting,
    config_key,
    expand_grid,
)
from app.schemas import ExperimentCreate

SYNTHETIC = "11111111-aaaa-4aaa-8aaa-aaaaaaaaaaaa"


def grid(**fields) -> list[dict]:
    return expand_grid(ExperimentCreate(dataset="real", **fields))


def test_setting_fields_are_the_dataclass_fields_in_order():
    assert SETTING_FIELDS == (
        "n_real_per_class", "synthetic_per_real", "strategy", "synthetic_dataset", "augmentation",
    )  # fmt: skip
    assert tuple(f.name for f in dataclasses.fields(Setting)) == SETTING_FIELDS


def test_real_only_of_a_synthetic_setting_is_the_setting_of_the_real_only_run():
    configs = grid(
        n_real_per_class=[16, None], synthetic_per_real=[0, 10], synthetic_datasets=[SYNTHETIC],
        strategies=["inpaint", "text-to-image"], augmentation=[False, True], seeds=[1, 2],
    )  # fmt: skip
    settings = {Setting.from_config(c) for c in configs}
    real_only = {s for s in settings if not s.synthetic_per_real}
    synthetic = settings - real_only
    assert len(real_only) == 4 and len(synthetic) == 8
    for setting in synthetic:
        control = setting.real_only()
        assert control in real_only
        assert (control.n_real_per_class, control.augmentation) == (
            setting.n_real_per_class, setting.augmentation,
        )  # fmt: skip
    assert {s.real_only() for s in real_only} == real_only  # a control is its own


def test_a_setting_is_built_by_name_not_position():
    config = {
        "seed": 3, "augmentation": True, "synthetic_dataset": SYNTHETIC, "strategy": "inpaint",
        "synthetic_per_real": 10, "n_real_per_class": 32, "backbone": "efficientnet",
    }  # fmt: skip
    setting = Setting.from_config(config)
    assert setting == Setting(
        augmentation=True, synthetic_dataset=SYNTHETIC, strategy="inpaint",
        synthetic_per_real=10, n_real_per_class=32,
    )  # fmt: skip
    assert setting.as_dict() == {name: config[name] for name in SETTING_FIELDS}
    assert list(setting.as_dict()) == list(SETTING_FIELDS)
    assert setting.real_only() == Setting.from_config(
        {**config, "synthetic_per_real": 0, "strategy": None, "synthetic_dataset": None}
    )
    assert Setting.from_config(setting.as_dict()) == setting
    with pytest.raises(dataclasses.FrozenInstanceError):
        setting.augmentation = False  # type: ignore[misc]


def test_settings_sort_numerically_with_null_last():
    settings = [
        Setting(n_real_per_class=n, synthetic_per_real=k, strategy=None, synthetic_dataset=None,
                augmentation=False)
        for n, k in ((None, 0), (64, 10), (8, 10), (64, 0), (8, 0))
    ]  # fmt: skip
    ordered = [
        (s.n_real_per_class, s.synthetic_per_real) for s in sorted(settings, key=Setting.sort_key)
    ]
    assert ordered == [(8, 0), (8, 10), (64, 0), (64, 10), (None, 0)]


def test_real_only_runs_are_made_once_per_n_real_augmentation_and_seed():
    configs = grid(
        synthetic_per_real=[0, 5], synthetic_datasets=[SYNTHETIC, "other"],
        strategies=["inpaint", None], seeds=[1, 2],
    )  # fmt: skip
    assert sum(1 for c in configs if c["synthetic_per_real"] == 0) == 2
    assert sum(1 for c in configs if c["synthetic_per_real"] == 5) == 2 * 2 * 2
    assert list(configs[0]) == [*SETTING_FIELDS, "seed"]


def test_synthetic_k_needs_a_synthetic_dataset_and_the_grid_has_a_limit():
    with pytest.raises(InvalidField, match="synthetic_datasets"):
        grid(synthetic_per_real=[10])
    with pytest.raises(InvalidField, match=str(MAX_RUNS)):
        grid(n_real_per_class=list(range(1, 22)), seeds=list(range(100)))


def test_config_key_is_the_key_earlier_versions_stored(monkeypatch: pytest.MonkeyPatch):
    shared, config, fingerprint = {"dataset": "real"}, {"seed": 1}, ["abc", 3]
    text = json.dumps([shared, config, fingerprint, RESULTS_VERSION], sort_keys=True)
    key = config_key(shared=shared, config=config, fingerprint=fingerprint)
    assert key == hashlib.sha256(text.encode()).hexdigest()
    monkeypatch.setattr(grid_module, "RESULTS_VERSION", RESULTS_VERSION + 1)
    assert config_key(shared=shared, config=config, fingerprint=fingerprint) != key
