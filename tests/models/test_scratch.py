"""The from-scratch generator (issue 24) on a tiny config: its tokenizer, its three stages, a
resume from any checkpoint that ends with the same weights, and the saved directories loading
offline as standard diffusers pipelines that sample."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from PIL import Image

from models.finetune_config import TrainingImage
from models.scratch import STAGES, save_generator, train_generator
from models.scratch_parts import (
    ScratchConfig,
    build_tokenizer,
    build_unet,
    config_dict,
    config_from_dict,
    inpaint_unet_from,
    learn_merges,
)

CPU = torch.device("cpu")
TINY = ScratchConfig(
    resolution=32,
    vae_channels=(8, 16),
    vae_steps=4,
    vae_batch_size=4,
    text_width=32,
    text_layers=1,
    unet_channels=(16, 32),
    unet_layers_per_block=1,
    unet_steps=4,
    unet_batch_size=4,
    inpaint_steps=3,
    latent_views=2,
    checkpoint_every_steps=2,
    validation_every_steps=2,
)
PROMPTS = [
    "An image of acne vulgaris, a skin disease, Fitzpatrick skin type 2",
    "An image of squamous cell carcinoma, a skin disease, Fitzpatrick skin type 5",
    "An image of eczema, a skin disease",
]


def _images(count: int = 6) -> list[TrainingImage]:
    """Photos with structure: a coloured gradient and a dark disc whose place varies."""
    images = []
    for k in range(count):
        yy, xx = np.mgrid[0:40, 0:48]
        rgb = np.stack([xx * 4 + 20 * k, yy * 5, 200 - xx * 3], axis=-1).clip(0, 255)
        rgb[(yy - 20) ** 2 + (xx - 10 - 5 * k) ** 2 < 60] = (70, 30, 25)
        images.append(
            TrainingImage(
                image_id=f"photo-{k}",
                pixels=Image.fromarray(rgb.astype(np.uint8)),
                caption=PROMPTS[k % len(PROMPTS)],
            )
        )
    return images


def _weights_digest(pipeline: Any) -> str:
    digest = hashlib.sha256()
    for name in ("vae", "text_encoder", "unet"):
        for key, value in sorted(getattr(pipeline, name).state_dict().items()):
            digest.update(key.encode() + value.detach().float().numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def trained() -> dict[str, Any]:
    """One uninterrupted run, with every checkpoint it handed out."""
    checkpoints: list[tuple[str, bytes]] = []
    steps: list[tuple[str, int]] = []
    validations: list[tuple[str, int, int]] = []
    result = train_generator(
        _images(),
        TINY,
        device=CPU,
        prompts=PROMPTS,
        on_step=lambda stage, report: steps.append((stage, report.step)),
        on_checkpoint=lambda stage, data: checkpoints.append((stage, data)),
        on_validation=lambda stage, step, images: validations.append((stage, step, len(images))),
    )
    return {"result": result, "checkpoints": checkpoints, "steps": steps, "valid": validations}


def test_every_prompt_word_is_one_token() -> None:
    tokenizer = build_tokenizer(PROMPTS, max_tokens=32)
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(PROMPTS[1]).input_ids)
    assert tokens == [
        "<|startoftext|>", "an</w>", "image</w>", "of</w>", "squamous</w>", "cell</w>",
        "carcinoma</w>", ",</w>", "a</w>", "skin</w>", "disease</w>", ",</w>",
        "fitzpatrick</w>", "skin</w>", "type</w>", "5</w>", "<|endoftext|>",
    ]  # fmt: skip
    # a word it never saw still tokenizes (byte-level pieces), nothing is unknown
    unseen = tokenizer.convert_ids_to_tokens(tokenizer("psoriasis").input_ids)
    assert "".join(unseen[1:-1]) == "psoriasis</w>" and len(unseen) > 3
    # the merges are a function of the word set, not of its order
    assert learn_merges(["b", "ab", "abc"]) == learn_merges(["abc", "b", "ab"])


def test_settings_are_checked_by_name() -> None:
    with pytest.raises(ValueError, match=r"^vae_steps: must be a positive integer"):
        ScratchConfig(vae_steps=0)
    with pytest.raises(ValueError, match="unet_channels: at least two widths"):
        ScratchConfig(unet_channels=(12,))
    with pytest.raises(ValueError, match=r"^bogus: not a scratch setting"):
        config_from_dict({"bogus": 1})
    assert config_from_dict(json.loads(json.dumps(config_dict(TINY)))) == TINY


def test_the_inpainting_unet_starts_as_the_text_to_image_one() -> None:
    torch.manual_seed(0)
    unet = build_unet(TINY)
    inpaint = inpaint_unet_from(unet)
    assert inpaint.config.in_channels == 9
    latents = torch.randn(2, 4, TINY.latent_size, TINY.latent_size)
    extra = torch.randn(2, 5, TINY.latent_size, TINY.latent_size)
    states = torch.randn(2, 7, TINY.text_width)
    with torch.no_grad():
        plain = unet(latents, 10, encoder_hidden_states=states).sample
        wide = inpaint(torch.cat([latents, extra], 1), 10, encoder_hidden_states=states).sample
    torch.testing.assert_close(plain, wide)


def test_three_stages_train_and_report(trained: dict[str, Any]) -> None:
    result = trained["result"]
    assert not result.stopped
    assert [len(result.losses[stage]) for stage in STAGES] == [4, 4, 3]
    assert all(np.isfinite(result.losses[stage]).all() for stage in STAGES)
    assert [stage for stage, _ in trained["steps"]] == ["autoencoder"] * 4 + [
        "text-to-image"
    ] * 4 + ["inpaint"] * 3
    # a checkpoint every 2 steps within a stage, and one at each stage's end
    assert [stage for stage, _ in trained["checkpoints"]] == [
        "autoencoder", "text-to-image", "text-to-image", "inpaint", "inpaint",
    ]  # fmt: skip
    assert trained["valid"] == [
        ("text-to-image", 2, 8), ("text-to-image", 4, 8), ("inpaint", 2, 8),
    ]  # fmt: skip
    assert 0 < result.scaling_factor < 100 and 0 < result.reconstruction_psnr_db < 60
    assert type(result.text_to_image) is StableDiffusionPipeline
    assert type(result.inpaint) is StableDiffusionInpaintPipeline
    assert result.inpaint.unet.config.in_channels == 9
    assert result.text_to_image.vae.config.scaling_factor == pytest.approx(result.scaling_factor)
    # the two pipelines share the autoencoder and the trained text encoder
    assert result.inpaint.vae is result.text_to_image.vae
    assert result.inpaint.text_encoder is result.text_to_image.text_encoder


@pytest.mark.parametrize("checkpoint", [0, 1, 3])
def test_a_resumed_run_ends_with_the_same_weights(trained: dict[str, Any], checkpoint: int) -> None:
    """From a checkpoint inside the autoencoder stage, at the end of the autoencoder, and in
    the inpainting stage: the same losses and bit-identical weights as the run that went on."""
    _stage, data = trained["checkpoints"][checkpoint]
    resumed = train_generator(_images(), TINY, device=CPU, prompts=PROMPTS, resume=data)
    first = trained["result"]
    assert resumed.losses == first.losses
    assert _weights_digest(resumed.text_to_image) == _weights_digest(first.text_to_image)
    assert _weights_digest(resumed.inpaint) == _weights_digest(first.inpaint)


def test_a_checkpoint_of_other_settings_is_refused(trained: dict[str, Any]) -> None:
    _, data = trained["checkpoints"][0]
    other = ScratchConfig(**{**TINY.__dict__, "unet_steps": 5})
    with pytest.raises(ValueError, match="resume: the checkpoint was made with other settings"):
        train_generator(_images(), other, device=CPU, resume=data)


def test_stopping_returns_no_pipelines() -> None:
    calls = iter(range(100))
    result = train_generator(_images(), TINY, device=CPU, should_stop=lambda: next(calls) >= 2)
    assert result.stopped and result.text_to_image is None
    assert len(result.losses["autoencoder"]) == 2


def test_saved_directories_load_offline_and_sample(trained: dict[str, Any], tmp_path: Path) -> None:
    written = save_generator(trained["result"], tmp_path / "out", dtype=torch.float16)
    assert set(written) == {"text-to-image", "inpaint"}
    for name, expected in (
        ("text-to-image", StableDiffusionPipeline),
        ("inpaint", StableDiffusionInpaintPipeline),
    ):
        folder = written[name]
        assert sorted(p.name for p in folder.iterdir()) == [
            "model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae",
        ]  # fmt: skip
        assert list(folder.glob("unet/*.safetensors"))
        pipeline = DiffusionPipeline.from_pretrained(
            folder, local_files_only=True, dtype=torch.float32
        )
        assert type(pipeline) is expected
        assert pipeline.unet.dtype == torch.float32  # stored fp16, loaded as asked
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True)
        assert unet.config.in_channels == (9 if name == "inpaint" else 4)
    pipeline = DiffusionPipeline.from_pretrained(
        written["text-to-image"], local_files_only=True, dtype=torch.float32
    )
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(
        PROMPTS[:2], num_inference_steps=2, generator=torch.Generator().manual_seed(0)
    ).images
    assert [image.size for image in images] == [(32, 32), (32, 32)]
    # the trained weights went out in fp16 and the in-memory pipeline stayed fp32
    assert trained["result"].text_to_image.unet.dtype == torch.float32


def test_a_later_stages_own_settings_may_change(trained: dict[str, Any]) -> None:
    """A checkpoint taken before the inpainting stage resumes with another inpaint_steps (it
    has not used it yet) and ends as a run that had that setting from the start."""
    _stage, data = trained["checkpoints"][2]  # inside the text-to-image stage
    longer = ScratchConfig(**{**TINY.__dict__, "inpaint_steps": 4})
    resumed = train_generator(_images(), longer, device=CPU, prompts=PROMPTS, resume=data)
    fresh = train_generator(_images(), longer, device=CPU, prompts=PROMPTS)
    assert len(resumed.losses["inpaint"]) == 4
    assert resumed.losses == fresh.losses
    assert _weights_digest(resumed.inpaint) == _weights_digest(fresh.inpaint)
