"""The scratch method's settings in the request (app/schemas/finetunes.py, ScratchSettings)
against the trainer's ScratchConfig (models/scratch_parts.py): app/ cannot import models/, so
each keeps its own copy of the fields, defaults and bounds; these tests tie them."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from annotated_types import Ge, Gt, Le, Lt, MultipleOf
from pydantic import ValidationError

from app.schemas.finetunes import SCRATCH_STAGES, ScratchSettings
from models.scratch import STAGES, _unet_config
from models.scratch_parts import ScratchConfig, config_dict, config_from_dict

CONFIG = {f.name: f for f in dataclasses.fields(ScratchConfig)}
# the fine-tune's own seed (plus the member's index) seeds the trainer
FROM_THE_FINETUNE = {"seed"}
WIDTHS = ("vae_channels", "unet_channels")
NUMBERS = [
    name for name, field in ScratchSettings.model_fields.items() if field.annotation in (int, float)
]


def test_every_setting_is_a_config_field_with_the_same_default() -> None:
    assert set(ScratchSettings.model_fields) == set(CONFIG) - FROM_THE_FINETUNE
    defaults = config_dict(ScratchConfig())
    assert ScratchSettings().model_dump(mode="json") == {
        name: value for name, value in defaults.items() if name not in FROM_THE_FINETUNE
    }
    assert SCRATCH_STAGES == STAGES


def _rules(name: str) -> list[Any]:
    return list(ScratchSettings.model_fields[name].metadata)


def _edges(name: str) -> list[Any]:
    """The extreme values the request accepts for a numeric field."""
    values = []
    for rule in _rules(name):
        if isinstance(rule, Ge | Le):
            values.append(rule.ge if isinstance(rule, Ge) else rule.le)
        elif isinstance(rule, Gt):
            values.append(rule.gt + (1e-9 if isinstance(rule.gt, float) else 1))
        elif isinstance(rule, Lt):
            values.append(rule.lt - (1e-9 if isinstance(rule.lt, float) else 1))
    return values


@pytest.mark.parametrize("name", NUMBERS)
def test_the_trainer_accepts_whatever_the_request_accepts(name: str) -> None:
    """A request the API takes never fails later in the worker on a range check."""
    edges = _edges(name)
    assert len(edges) == 2, f"{name}: the request bounds it on both sides"
    for value in edges:
        ScratchSettings(**{name: value})  # the request's own cross-field rules pass too
        config = ScratchConfig(**{name: value})
        for stage in ("text-to-image", "inpaint"):  # the UNet stages' FinetuneConfig
            _unet_config(config, stage)


@pytest.mark.parametrize("name", NUMBERS)
def test_the_request_refuses_whatever_the_trainer_refuses_near_its_bounds(name: str) -> None:
    """Just past each of the request's bounds the request refuses (naming the field); where
    the trainer has that bound too, it refuses with the same field first."""
    low, high = sorted(_edges(name))
    step = 1 if isinstance(low, int) else 1e-6
    for value in (low - step, high + step):
        with pytest.raises(ValidationError) as refused:
            ScratchSettings(**{name: value})
        assert refused.value.errors()[0]["loc"] == (name,)
        try:
            ScratchConfig(**{name: value})
        except ZeroDivisionError:  # text_heads=0: ScratchConfig checks text_width % text_heads
            assert name == "text_heads"
        except ValueError as error:
            assert name in str(error), error
    multiple = [r.multiple_of for r in _rules(name) if isinstance(r, MultipleOf)]
    if multiple:  # resolution: 8s for the UNet stages (ScratchConfig alone takes 4s)
        with pytest.raises(ValidationError):
            ScratchSettings(**{name: low + 4})
        with pytest.raises(ValueError, match=f"^{name}:"):
            _unet_config(ScratchConfig(**{name: low + 4}), "text-to-image")


@pytest.mark.parametrize("name", WIDTHS)
def test_widths_follow_the_trainer(name: str) -> None:
    for widths in ([8, 8], [32, 64, 128, 256, 512, 2048]):
        ScratchSettings(**{name: widths})
        config_from_dict({name: widths})
    for widths in ([32], [32, 60], [4, 8]):  # one level; not a multiple of 8; under 8
        with pytest.raises(ValidationError):
            ScratchSettings(**{name: widths})
        with pytest.raises(ValueError, match=f"^{name}:"):
            config_from_dict({name: widths})


def test_the_request_refuses_what_would_fail_inside_the_trainer() -> None:
    """Rules that need two fields at once: the request and ScratchConfig both refuse each (a
    setting that would fail once the trainer builds the networks)."""
    # text_heads must divide text_width (both check it)
    with pytest.raises(ValidationError) as refused:
        ScratchSettings(text_width=100, text_heads=8)
    assert refused.value.errors()[0]["loc"] == ("text_heads",)
    with pytest.raises(ValueError, match="text_heads"):
        ScratchConfig(text_width=100, text_heads=8)
    # GroupNorm's groups are min(32, first width): 48 channels do not split into 32 groups
    with pytest.raises(ValidationError) as refused:
        ScratchSettings(unet_channels=[32, 48])
    assert refused.value.errors()[0]["loc"] == ("unet_channels",)
    with pytest.raises(ValueError, match="unet_channels: every width must be a multiple of 32"):
        ScratchConfig(unet_channels=(32, 48))
    # five autoencoder levels downsample 16x: 72 pixels would decode to 64
    with pytest.raises(ValidationError) as refused:
        ScratchSettings(resolution=72, vae_channels=[8, 16, 32, 64, 64])
    assert refused.value.errors()[0]["loc"] == ("vae_channels",)
    with pytest.raises(ValueError, match="resolution: 5 autoencoder levels downsample 16x"):
        ScratchConfig(resolution=72, vae_channels=(8, 16, 32, 64, 64))
    ScratchConfig(resolution=80, vae_channels=(8, 16, 32, 64, 64))
    ScratchSettings(resolution=80, vae_channels=[8, 16, 32, 64, 64])


def test_stored_settings_build_the_trainer_config() -> None:
    """What the API stores (the request's settings, defaults filled) is what the worker
    passes to config_from_dict with the fine-tune's seed."""
    stored = ScratchSettings(vae_channels=[8, 16], vae_steps=3).model_dump(mode="json")
    config = config_from_dict({**stored, "seed": 12})
    assert config.vae_channels == (8, 16) and config.vae_steps == 3 and config.seed == 12
