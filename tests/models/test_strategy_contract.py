"""The service's strategy vocabulary and sampler defaults against models/strategies.py's.

app/ cannot import models/ (no torch there), so each side keeps its own copy; these tests tie
them, as tests/models/test_backbones.py ties the backbone names.
"""

from __future__ import annotations

import dataclasses

from app.generation.service import EDIT_STRATEGIES, INPAINT_STRATEGIES
from app.schemas import JobCreate, Strategy
from app.schemas import jobs as contract
from models import strategies


def test_the_api_knows_the_strategies_the_sampler_runs() -> None:
    assert [s.value for s in Strategy] == list(strategies.STRATEGIES)
    assert {s.value for s in EDIT_STRATEGIES} == strategies.EDITS_PARENT
    assert {s.value for s in INPAINT_STRATEGIES} == strategies.NEEDS_INPAINT_PIPELINE


def test_the_api_documents_the_defaults_the_sampler_applies() -> None:
    assert {s.value: v for s, v in contract.DEFAULT_STRENGTH.items()} == strategies.DEFAULT_STRENGTH
    assert contract.DEFAULT_OUTPAINT_STRENGTH == strategies.DEFAULT_OUTPAINT_STRENGTH
    assert contract.DEFAULT_MASK_FRACTION == strategies.DEFAULT_MASK_FRACTION
    assert contract.DEFAULT_FRAME_PX == strategies.DEFAULT_FRAME_PX
    defaults = {f.name: f.default for f in dataclasses.fields(strategies.SampleParams)}
    assert defaults["outpaint_strength"] == contract.DEFAULT_OUTPAINT_STRENGTH
    assert defaults["mask_fraction"] == contract.DEFAULT_MASK_FRACTION
    assert defaults["frame_px"] == contract.DEFAULT_FRAME_PX
    # the request's descriptions quote them
    fields = JobCreate.model_fields
    assert "inpaint 0.97, image-to-image 0.75" in str(fields["strength"].description)
    assert "(0.95)" in str(fields["outpaint_strength"].description)
    assert "(0.25)" in str(fields["mask_fraction"].description)
    assert "(16)" in str(fields["frame_px"].description)


def test_sampler_options_are_sample_params_and_request_fields() -> None:
    """The worker builds SampleParams from filled SamplerOptions, which a job takes from its
    request body: every knob is a SampleParams field and a JobCreate field of the same kind."""
    knobs = set(contract.SamplerOptions.model_fields)
    assert knobs <= {f.name for f in dataclasses.fields(strategies.SampleParams)}
    for name in knobs:
        ours, theirs = contract.SamplerOptions.model_fields[name], JobCreate.model_fields[name]
        assert ours.annotation == theirs.annotation and ours.metadata == theirs.metadata, name
    filled = contract.SamplerOptions().filled(
        guidance_scale=3.0, num_inference_steps=50, width=64, height=64
    )
    params = strategies.SampleParams(
        strategy=strategies.INPAINT_OUTPAINT, prompt="p", **filled.model_dump()
    )
    assert params == strategies.SampleParams(
        strategy=strategies.INPAINT_OUTPAINT,
        prompt="p",
        negative_prompt=None,
        num_inference_steps=50,
        guidance_scale=3.0,
        width=64,
        height=64,
    )
    assert params.effective_strength == contract.DEFAULT_STRENGTH[Strategy.INPAINT_OUTPAINT]


def test_a_jobs_stored_params_read_back_as_they_were_given() -> None:
    body = JobCreate(
        condition="c", strategy=Strategy.INPAINT_OUTPAINT, source_dataset="d", strength=0.5,
        frame_px=0, negative_prompt="blurry", synthetic_per_real=3, guidance_scale=0,
    )  # fmt: skip
    stored = body.generation_params().stored()
    assert list(stored) == [
        "guidance_scale", "strength", "frame_px", "source_dataset", "negative_prompt",
        "synthetic_per_real",
    ]  # fmt: skip
    again = contract.GenerationParams.model_validate(stored)
    assert again == body.generation_params()
    assert (again.guidance_scale, again.frame_px, again.synthetic_per_real) == (0.0, 0, 3)
    # an empty negative prompt is none, and is not stored
    assert JobCreate(condition="c", negative_prompt="").generation_params().stored() == {
        "synthetic_per_real": 1
    }
