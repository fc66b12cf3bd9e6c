"""The fine-tuning loop (issue 22) on the tiny random pipelines and real Fitzpatrick17k photos:
the loss falls, only the right weights move, a stopped run resumes bit-identically, the
augmentation and masks stay in the paper's ranges, bad input names its field, and the trained
product round-trips through diffusers (full pipeline; LoRA adapters switched on one base)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.finetune import (
    FinetuneConfig,
    TrainingImage,
    fixed_batch_loss,
    load_lora,
    save_trained,
    train,
    use_lora,
)
from models.finetune_data import (
    CROP_RATIO,
    CROP_SCALE,
    JITTER,
    AugmentDraw,
    augment,
    draw_augment,
    draw_masks,
    mask_at_latent_size,
    masked_images,
)
from models.tiny_random import build_inpaint_pipeline, build_pipeline

PHOTOS = Path(__file__).resolve().parents[3] / "shared" / "data" / "fitzpatrick17k_ajl21"
LABELS = ("acne", "eczema")
CPU = torch.device("cpu")
BUILD = {"text-to-image": build_pipeline, "inpaint": build_inpaint_pipeline}
FAST = {"validation_images": 0, "checkpoint_every_steps": 1000, "train_batch_size": 2}


@pytest.fixture(scope="module")
def photos() -> list[TrainingImage]:
    """Two real photos of each of two conditions, captioned with the service's template."""
    if not PHOTOS.is_dir():
        pytest.skip(f"{PHOTOS} is not here (the real photos live in ../shared/data)")
    images = []
    for label in LABELS:
        for path in sorted((PHOTOS / label).glob("*.jpg"))[:2]:
            pixels = Image.open(path).convert("RGB")
            pixels.thumbnail((160, 160))  # keeps the aspect: crops still see non-square photos
            caption = f"An image of {label.replace('-', ' ')}, a skin disease"
            images.append(TrainingImage(image_id=path.stem, pixels=pixels, caption=caption))
    if len(images) < 4:
        pytest.skip(f"fewer than 2 photos of {LABELS} under {PHOTOS}")
    return images


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def trainable(pipeline) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in pipeline.unet.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("variant", ["text-to-image", "inpaint"])
@pytest.mark.parametrize("method", ["dreambooth", "lora"])
def test_loss_falls_and_only_the_right_weights_move(photos, method, variant) -> None:
    pipeline = BUILD[variant](0)
    # LoRA's B starts at zero and moves only through its rank-4 update: a larger rate, and on
    # the tiny UNet it levels off near 0.9 of the start (the full UNet reaches ~0.4)
    rate, falls_to = (1e-3, 0.8) if method == "dreambooth" else (2e-2, 0.95)
    config = FinetuneConfig(
        method=method, variant=variant, learning_rate=rate, max_train_steps=8, **FAST
    )
    text_encoder, vae = weights(pipeline.text_encoder), weights(pipeline.vae)
    unet = weights(pipeline.unet)
    before = fixed_batch_loss(pipeline, photos, config, device=CPU, seed=7)
    steps = []
    result = train(pipeline, photos, config, device=CPU, on_step=steps.append)
    after = fixed_batch_loss(pipeline, photos, config, device=CPU, seed=7)

    assert after < falls_to * before, (before, after)
    assert (result.steps, len(result.losses), result.images_seen) == (8, 8, 16)
    assert not result.stopped and result.final_loss == result.losses[-1]
    assert [report.step for report in steps] == list(range(1, 9))
    assert all(report.total_steps == 8 and report.images_per_s > 0 for report in steps)
    assert [report.epoch for report in steps] == [0, 0, 1, 1, 2, 2, 3, 3]  # 4 images, batch 2
    for name, tensor in weights(pipeline.text_encoder).items():
        assert torch.equal(tensor, text_encoder[name]), name
    for name, tensor in weights(pipeline.vae).items():
        assert torch.equal(tensor, vae[name]), name
    now = weights(pipeline.unet)
    if method == "dreambooth":
        moved = [name for name in unet if not torch.equal(now[name], unet[name])]
        assert len(moved) > 0.9 * len(unet)
    else:
        lora = [name for name in now if "lora_" in name]
        assert lora and all(".finetune." in name for name in lora)
        assert any("lora_B" in name and now[name].abs().sum() > 0 for name in lora)
        base = {name.replace(".base_layer", ""): t for name, t in now.items() if name not in lora}
        assert base.keys() == unet.keys()
        for name, tensor in base.items():
            assert torch.equal(tensor, unet[name]), name
        # the adapter stays on the pipeline, active
        assert pipeline.unet.active_adapters() == ["finetune"]


@pytest.mark.parametrize(
    ("method", "variant", "cache_latents", "ema_decay"),
    [
        ("dreambooth", "text-to-image", False, 0.0),
        ("lora", "inpaint", False, 0.0),
        ("dreambooth", "inpaint", True, 0.0),
        ("dreambooth", "text-to-image", True, 0.9),  # the moving average resumes too
    ],
)
def test_a_stopped_run_resumes_bit_identically(
    photos, method, variant, cache_latents, ema_decay
) -> None:
    config = FinetuneConfig(
        method=method,
        variant=variant,
        cache_latents=cache_latents,
        ema_decay=ema_decay,
        latent_views=2,
        learning_rate=1e-3,
        max_train_steps=5,  # 2 steps per epoch: the resumed part crosses epochs
        train_batch_size=2,
        checkpoint_every_steps=2,
        validation_every_steps=1,
        validation_images=2,
        validation_inference_steps=2,
    )
    whole_pipeline = BUILD[variant](0)
    samples: list[tuple[int, list[tuple[str, int, tuple[int, int]]]]] = []
    whole = train(
        whole_pipeline,
        photos,
        config,
        device=CPU,
        # validation after every step: it must not move the training streams
        on_validation=lambda step, images: samples.append(
            (step, [(image.prompt, image.seed, image.image.size) for image in images])
        ),
    )
    # fixed prompts (the distinct captions by default) and seeds, at the training resolution
    captions = list(dict.fromkeys(photo.caption for photo in photos))
    fixed = [(captions[0], 0, (64, 64)), (captions[1], 1, (64, 64))]
    assert samples == [(step, fixed) for step in range(1, 6)]

    checkpoints: list[tuple[int, bytes]] = []
    first = train(
        BUILD[variant](0),
        photos,
        config,
        device=CPU,
        on_checkpoint=lambda step, data: checkpoints.append((step, data)),
        should_stop=lambda: bool(checkpoints),
    )
    assert first.stopped and first.steps == 2 and [step for step, _ in checkpoints] == [2]

    resumed_pipeline = BUILD[variant](0)
    more: list[int] = []
    resumed = train(
        resumed_pipeline,
        photos,
        config,
        device=CPU,
        resume=checkpoints[0][1],
        on_checkpoint=lambda step, _: more.append(step),
    )
    assert not resumed.stopped and resumed.steps == 5
    assert more == [4]  # every 2 steps, never at the final step
    assert resumed.losses == whole.losses and resumed.images_seen == whole.images_seen == 10
    expected, got = trainable(whole_pipeline), trainable(resumed_pipeline)
    assert expected.keys() == got.keys() and expected
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


def test_the_product_is_the_moving_average_of_the_weights(photos) -> None:
    """With ema_decay the trained pipeline holds the warmed-up moving average of the weights
    after each step (diffusers' EMAModel rule), not the last step's weights."""
    decay, steps = 0.6, 6
    pipeline = build_pipeline(0)
    average = trainable(pipeline)
    after_step: list[dict[str, torch.Tensor]] = []
    config = FinetuneConfig(learning_rate=1e-3, max_train_steps=steps, ema_decay=decay, **FAST)
    train(
        pipeline,
        photos,
        config,
        device=CPU,
        on_step=lambda _: after_step.append(trainable(pipeline)),
    )
    for step, live in enumerate(after_step, start=1):
        rate = min(decay, (1 + step) / (10 + step))  # 0.18, 0.25, ..., 0.6 from step 8 on
        average = {name: rate * average[name] + (1 - rate) * live[name] for name in average}
    got = trainable(pipeline)
    assert len(after_step) == steps and got.keys() == average.keys()
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, average[name], rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(got[name], after_step[-1][name]) for name in got)


def test_should_stop_before_the_first_step_changes_nothing(photos) -> None:
    pipeline = build_pipeline(0)
    unet = weights(pipeline.unet)
    result = train(pipeline, photos, FinetuneConfig(**FAST), device=CPU, should_stop=lambda: True)
    assert result.stopped and result.steps == 0 and result.losses == []
    for name, tensor in weights(pipeline.unet).items():
        assert torch.equal(tensor, unet[name]), name


def test_gradient_checkpointing_trains_the_same_weights(photos) -> None:
    trained = []
    for checkpointing in (False, True):
        pipeline = build_pipeline(0)
        config = FinetuneConfig(
            learning_rate=1e-3, max_train_steps=2, gradient_checkpointing=checkpointing, **FAST
        )
        train(pipeline, photos, config, device=CPU)
        assert pipeline.unet.is_gradient_checkpointing == checkpointing
        trained.append(trainable(pipeline))
    for name, tensor in trained[0].items():
        torch.testing.assert_close(trained[1][name], tensor, rtol=0, atol=1e-6)


def test_out_of_memory_names_the_settings_that_help(photos, monkeypatch) -> None:
    import models.finetune

    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(models.finetune, "prepare", exhausted)
    with pytest.raises(RuntimeError, match="out of memory") as error:
        train(build_pipeline(0), photos, FinetuneConfig(**FAST), device=CPU)
    for setting in ("train_batch_size", "gradient_checkpointing", "mixed_precision", "resolution"):
        assert setting in str(error.value)
    assert "method='lora'" in str(error.value)
    assert isinstance(error.value.__cause__, torch.OutOfMemoryError)


def test_augmentation_stays_in_the_papers_ranges() -> None:
    draw = draw_augment(4096, generator=torch.Generator().manual_seed(0))
    for values, (low, high) in [
        (draw.scale, CROP_SCALE),
        (draw.ratio, CROP_RATIO),
        (draw.brightness, (1 - JITTER, 1 + JITTER)),
        (draw.contrast, (1 - JITTER, 1 + JITTER)),
        (draw.saturation, (1 - JITTER, 1 + JITTER)),
        (draw.hue, (-JITTER, JITTER)),
    ]:
        assert low <= float(values.min()) and float(values.max()) <= high
        assert float(values.min()) < low + 0.01 * (high - low)  # the whole range is used
        assert float(values.max()) > high - 0.01 * (high - low)
    assert 0.45 < float(draw.flip.float().mean()) < 0.55

    # A horizontal ramp: the neutral view is the image, a flip mirrors it, a crop of scale s and
    # ratio r spans sqrt(s * r) of the width.
    size = 64
    ramp = torch.linspace(0, 255, size).round().to(torch.uint8).expand(3, size, size)
    neutral = augment([ramp], AugmentDraw.neutral(1), resolution=size, device=CPU)
    assert torch.allclose(neutral, ramp[None].float() / 127.5 - 1, atol=1e-5)
    flipped = AugmentDraw.neutral(1).__class__(
        **{**AugmentDraw.neutral(1).__dict__, "flip": torch.tensor([True])}
    )
    mirrored = augment([ramp], flipped, resolution=size, device=CPU)
    assert torch.allclose(mirrored, neutral.flip(-1), atol=1e-5)
    for scale in (0.9, 0.95):
        zoomed = AugmentDraw(**{**AugmentDraw.neutral(1).__dict__, "scale": torch.tensor([scale])})
        view = augment([ramp], zoomed, resolution=size, device=CPU)
        span = float(view[0, 0, 0, -1] - view[0, 0, 0, 0]) / float(
            neutral[0, 0, 0, -1] - neutral[0, 0, 0, 0]
        )
        assert span == pytest.approx(math.sqrt(scale), abs=0.02)

    # Colour jitter moves a real-looking image only a little, and never out of [-1, 1].
    generator = torch.Generator().manual_seed(1)
    photo = torch.randint(0, 256, (3, size, size), generator=generator, dtype=torch.uint8)
    jitter_only = AugmentDraw(
        **{
            **AugmentDraw.neutral(8).__dict__,
            "brightness": draw.brightness[:8],
            "contrast": draw.contrast[:8],
            "saturation": draw.saturation[:8],
            "hue": draw.hue[:8],
        }
    )
    plain = augment([photo] * 8, AugmentDraw.neutral(8), resolution=size, device=CPU)
    jittered = augment([photo] * 8, jitter_only, resolution=size, device=CPU)
    change = (jittered - plain).abs().mean(dim=(1, 2, 3)) / 2  # in [0, 1] units
    assert float(change.max()) < 0.1 and float(change.min()) > 0
    assert float(jittered.min()) >= -1 and float(jittered.max()) <= 1
    # a full random draw on a non-square photo: right size, in range
    wide = torch.randint(0, 256, (3, size, 90), generator=generator, dtype=torch.uint8)
    views = augment([wide] * 4, draw_augment(4, generator=generator), resolution=32, device=CPU)
    assert views.shape == (4, 3, 32, 32) and float(views.abs().max()) <= 1


def test_masks_are_rectangles_and_ellipses_of_any_size() -> None:
    size = 64
    drawn = draw_masks(512, resolution=size, generator=torch.Generator().manual_seed(0))
    masks = drawn.masks
    assert masks.shape == (512, 1, size, size)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    assert 0.4 < float(drawn.ellipse.float().mean()) < 0.6
    assert float(drawn.size.min()) < 0.05 and float(drawn.size.max()) > 0.95
    areas = masks.mean(dim=(1, 2, 3))
    assert float(areas.min()) < 0.01 and float(areas.max()) > 0.7
    # shapes wholly inside the image: an ellipse fills pi/4 of its box, a rectangle all of it
    rng = torch.Generator().manual_seed(1)
    inside = draw_masks(2048, resolution=size, generator=rng)
    # recompute each box from the mask itself and compare its fill
    fills = {True: [], False: []}
    for mask, is_ellipse in zip(inside.masks, inside.ellipse.tolist(), strict=True):
        rows = mask[0].any(dim=1).nonzero()
        cols = mask[0].any(dim=0).nonzero()
        if len(rows) < 20 or len(cols) < 20:
            continue
        box = mask[0, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        touches_edge = rows.min() == 0 or cols.min() == 0 or rows.max() == size - 1
        if touches_edge or cols.max() == size - 1:
            continue
        fills[is_ellipse].append(float(box.mean()))
    assert fills[True] and fills[False]
    assert np.mean(fills[True]) == pytest.approx(math.pi / 4, abs=0.03)
    assert np.mean(fills[False]) == pytest.approx(1.0, abs=1e-6)

    pixels = torch.rand(512, 3, size, size) * 2 - 1
    masked = masked_images(pixels, masks)
    assert torch.all(masked[(masks >= 0.5).expand_as(pixels)] == 0)
    keep = (masks < 0.5).expand_as(pixels)
    assert torch.equal(masked[keep], pixels[keep])
    assert mask_at_latent_size(masks, 32).shape == (512, 1, 32, 32)


def test_bad_input_names_the_field(photos) -> None:
    for fields, name in [
        ({"lora_rank": 0}, "lora_rank"),
        ({"lora_rank": 257}, "lora_rank"),
        ({"method": "hypernetwork"}, "method"),
        ({"variant": "outpaint"}, "variant"),
        ({"train_batch_size": 0}, "train_batch_size"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"resolution": 100}, "resolution"),
        ({"mixed_precision": "fp8"}, "mixed_precision"),
        ({"max_train_steps": 0}, "max_train_steps"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"ema_decay": -0.1}, "ema_decay"),
    ]:
        with pytest.raises(ValueError, match=rf"^{name}: "):
            FinetuneConfig(**fields)
    with pytest.raises(ValueError, match=r"^train_batch_size: 5 is larger than the 4"):
        train(build_pipeline(0), photos, FinetuneConfig(train_batch_size=5), device=CPU)
    with pytest.raises(ValueError, match=r"^variant: 'inpaint' needs a UNet with 9"):
        train(build_pipeline(0), photos, FinetuneConfig(variant="inpaint", **FAST), device=CPU)
    with pytest.raises(ValueError, match=r"^variant: 'text-to-image' needs a UNet with 4"):
        train(build_inpaint_pipeline(0), photos, FinetuneConfig(**FAST), device=CPU)
    config = FinetuneConfig(max_train_steps=3, **{**FAST, "checkpoint_every_steps": 1})
    saved: list[bytes] = []
    train(build_pipeline(0), photos, config, device=CPU, on_checkpoint=lambda _, b: saved.append(b))
    other = FinetuneConfig(max_train_steps=3, seed=1, **FAST)
    with pytest.raises(ValueError, match=r"^resume: .*seed=0 \(now 1\)"):
        train(build_pipeline(0), photos, other, device=CPU, resume=saved[0])


def test_dreambooth_saves_a_loadable_pipeline(photos, tmp_path) -> None:
    from diffusers import DiffusionPipeline

    pipeline = build_pipeline(0)
    config = FinetuneConfig(learning_rate=1e-3, max_train_steps=2, **FAST)
    train(pipeline, photos, config, device=CPU)
    out = tmp_path / "model"
    paths = save_trained(pipeline, config, out)
    assert out / "model_index.json" in paths
    assert any(path.suffix == ".safetensors" and "unet" in path.parts for path in paths)
    assert [path.name for path in tmp_path.iterdir()] == ["model"]  # no staging left behind
    loaded = DiffusionPipeline.from_pretrained(out)
    expected = weights(pipeline.unet)
    for name, tensor in weights(loaded.unet).items():
        assert torch.equal(tensor, expected[name]), name


def sample(pipeline) -> np.ndarray:
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(
        "An image of acne, a skin disease",
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(3),
        output_type="np",
    ).images


# peft warns that a second adapter makes the model hold several: that is the point here
@pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")
def test_lora_adapters_switch_on_one_base(photos, tmp_path) -> None:
    produced = {}
    for name, seed in [("one", 0), ("two", 1)]:
        pipeline = build_pipeline(0)
        # alpha != rank: the scale must travel with the weights
        config = FinetuneConfig(
            method="lora", lora_alpha=8.0, learning_rate=2e-2, max_train_steps=2, seed=seed, **FAST
        )
        train(pipeline, photos, config, device=CPU)
        paths = save_trained(pipeline, config, tmp_path / name)
        assert [path.name for path in paths] == ["pytorch_lora_weights.safetensors"]
        produced[name] = sample(pipeline)

    base = build_pipeline(0)
    before = sample(base)
    load_lora(base, tmp_path / "one", "one")
    load_lora(base, tmp_path / "two", "two")
    images = {}
    for name in ("one", "two", None, "one"):
        use_lora(base, name)
        images.setdefault(name, []).append(sample(base))
    assert np.abs(images["one"][0] - before).max() > 1e-3
    assert np.abs(images["two"][0] - before).max() > 1e-3
    assert np.abs(images["one"][0] - images["two"][0]).max() > 1e-3
    assert np.array_equal(images[None][0], before)  # the base again, exactly
    assert np.array_equal(images["one"][1], images["one"][0])
    # what was loaded is what was trained
    np.testing.assert_allclose(images["one"][0], produced["one"], atol=1e-5)
    np.testing.assert_allclose(images["two"][0], produced["two"], atol=1e-5)
    with pytest.raises(ValueError, match=r"^adapter_name: no adapter 'three'"):
        use_lora(base, "three")
