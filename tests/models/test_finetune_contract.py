"""The fine-tune request's hyperparameters (app/schemas/finetunes.py) against the training
loop's FinetuneConfig (models/finetune_config.py): app/ cannot import models/, so each keeps its
own copy of the paper's defaults and bounds; these tests tie them."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from annotated_types import Ge, Gt, Le, Lt

from app.schemas.finetunes import (
    LORA_TARGETS,
    FinetuneCreate,
    FinetuneHyperparameters,
    FinetuneMethod,
    FinetuneVariant,
)
from models import finetune_config
from models.finetune_config import FinetuneConfig

CONFIG = {f.name: f for f in dataclasses.fields(FinetuneConfig)}
# the request leaves the LoRA scale to the rank (null); the worker passes alpha = rank
TRANSLATED = {"lora_alpha"}
# set by the scratch method's stages (models/scratch.py), never by a request: their defaults
# leave a DreamBooth or LoRA fine-tune as the paper's
SCRATCH_ONLY = {"lr_scheduler": "constant", "lr_warmup_steps": 0, "train_text_encoder": False,
                "caption_dropout": 0.0}  # fmt: skip


def test_every_hyperparameter_is_a_config_field_with_the_same_default() -> None:
    for name, field in FinetuneHyperparameters.model_fields.items():
        assert name in CONFIG, f"{name} is no FinetuneConfig field"
        if name in TRANSLATED:
            continue
        default = field.get_default(call_default_factory=True)
        config_default = CONFIG[name].default
        if isinstance(config_default, tuple):
            default = tuple(default)
        assert default == config_default, name
    assert CONFIG["lora_alpha"].default == CONFIG["lora_rank"].default  # a scale of 1
    assert tuple(LORA_TARGETS) == CONFIG["lora_target_modules"].default
    # the request's own fields are the config's too (seed, method, variant)
    # scratch trains its own generator through models/scratch.py, not as a FinetuneConfig method
    assert {m.value for m in FinetuneMethod} - {"scratch"} == set(finetune_config.METHODS)
    assert {v.value for v in FinetuneVariant} == set(finetune_config.VARIANTS)
    assert set(CONFIG) - set(FinetuneHyperparameters.model_fields) - set(SCRATCH_ONLY) == {
        "method", "variant", "seed",
    }  # fmt: skip
    assert {name: CONFIG[name].default for name in SCRATCH_ONLY} == SCRATCH_ONLY
    assert "seed" in FinetuneCreate.model_fields


def _edges(name: str) -> list[Any]:
    """The extreme values the request accepts for a numeric field."""
    values = []
    for rule in FinetuneHyperparameters.model_fields[name].metadata:
        if isinstance(rule, Ge | Le):
            values.append(rule.ge if isinstance(rule, Ge) else rule.le)
        elif isinstance(rule, Gt):
            values.append(rule.gt + (1e-9 if isinstance(rule.gt, float) else 1))
        elif isinstance(rule, Lt):
            values.append(rule.lt - (1e-9 if isinstance(rule.lt, float) else 1))
    return values


@pytest.mark.parametrize(
    "name",
    [
        n
        for n, f in FinetuneHyperparameters.model_fields.items()
        if n not in TRANSLATED and f.annotation in (int, float, int | None, float | None)
    ],
)
def test_the_loop_accepts_whatever_the_request_accepts(name: str) -> None:
    """A request the API takes never fails later in the worker on a range check."""
    for value in _edges(name):
        if name == "resolution":
            value = value - value % 8
        FinetuneConfig(**{name: value})
    if name == "lora_rank":  # an unset alpha becomes the rank
        FinetuneConfig(lora_rank=256, lora_alpha=256.0)
    FinetuneConfig(lora_alpha=1024.0)  # the request's largest alpha
