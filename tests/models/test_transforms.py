"""Preprocessing: eval resize-crop (shapes, centring, EXIF) and the seeded fastai-style augmentation
(determinism, ranges, and each geometric and lighting step against a hand-computed result).
"""

from __future__ import annotations

import hashlib
import io

import pytest
import torch
from PIL import Image

from models.transforms import (
    EVAL_TRANSFORM_ID,
    AugmentParams,
    apply_augment,
    augment,
    augmented_view,
    augmented_view_id,
    decode_image,
    draw_augment_params,
    eval_transform_id,
    resize_crop,
)

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
SHA = hashlib.sha256(b"an image").hexdigest()


def _bands(*, width: int, height: int, vertical: bool) -> Image.Image:
    """Three equal bands red | green | blue, left to right (or top to bottom when vertical)."""
    image = Image.new("RGB", (width, height))
    long_side = height if vertical else width
    third = long_side // 3
    for index, color in enumerate((RED, GREEN, BLUE)):
        start, stop = index * third, (index + 1) * third
        box = (0, start, width, stop) if vertical else (start, 0, stop, height)
        image.paste(color, box)
    return image


def _textured_batch(batch_size: int = 4, size: int = 32) -> torch.Tensor:
    """A smooth, asymmetric test batch in [0, 1] (flips and rotations all change it)."""
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    channels = [xs, ys * 0.8 + 0.1, (xs * ys).sqrt() * 0.5 + 0.25 * torch.sin(6 * xs) ** 2]
    image = torch.stack(channels)  # (3, S, S)
    return torch.stack([image.roll(shifts=i * 3, dims=-1) for i in range(batch_size)])


@pytest.mark.parametrize(
    ("width", "height"),
    [(640, 480), (300, 800), (60, 40), (224, 224), (1, 1)],
    ids=["landscape", "portrait", "tiny-upsampled", "exact", "single-pixel"],
)
def test_resize_crop_gives_a_square_float_tensor_in_unit_range(width: int, height: int) -> None:
    image = Image.effect_noise((width, height), 60).convert("RGB")

    pixels = resize_crop(image)

    assert pixels.shape == (3, 224, 224)
    assert pixels.dtype == torch.float32
    assert float(pixels.min()) >= 0.0 and float(pixels.max()) <= 1.0
    assert resize_crop(image, size=96).shape == (3, 96, 96)


@pytest.mark.parametrize("vertical", [False, True], ids=["landscape", "portrait"])
def test_resize_crop_keeps_the_centre_square_only(vertical: bool) -> None:
    # The centre third is green and exactly square: the crop must see nothing else, even at the
    # border (pixels outside the square must not bleed in through the resampling filter).
    width, height = (100, 300) if vertical else (300, 100)
    pixels = resize_crop(_bands(width=width, height=height, vertical=vertical))

    green = torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1).expand(3, 224, 224)
    assert torch.equal(pixels, green)


def test_resize_crop_converts_other_modes_to_rgb() -> None:
    gray = Image.new("L", (50, 50), 128)

    pixels = resize_crop(gray)

    assert pixels.shape == (3, 224, 224)
    assert torch.allclose(pixels, torch.full_like(pixels, 128 / 255))


def test_decode_image_applies_exif_orientation() -> None:
    # Stored landscape, left red and right blue, tagged "rotate 90 degrees clockwise to view"
    # (Orientation 6, as phones write): upright, it is portrait with red on top.
    stored = Image.new("RGB", (40, 20), BLUE)
    stored.paste(RED, (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", quality=95, exif=exif.tobytes())

    image = decode_image(buffer.getvalue())

    assert image.mode == "RGB"
    assert image.size == (20, 40)
    top, bottom = image.getpixel((10, 5)), image.getpixel((10, 34))
    assert isinstance(top, tuple) and isinstance(bottom, tuple)
    assert top[0] > 200 and top[2] < 60  # red
    assert bottom[2] > 200 and bottom[0] < 60  # blue


def test_decode_image_converts_rgba_png_and_rejects_garbage() -> None:
    buffer = io.BytesIO()
    Image.new("RGBA", (8, 6), (10, 20, 30, 0)).save(buffer, format="PNG")

    image = decode_image(buffer.getvalue())

    assert image.mode == "RGB" and image.size == (8, 6)
    with pytest.raises(ValueError, match="cannot decode image"):
        decode_image(b"not an image at all")


def test_transform_ids_name_the_size_and_view() -> None:
    assert EVAL_TRANSFORM_ID == "resize-crop-224" == eval_transform_id()
    assert eval_transform_id(size=384) == "resize-crop-384"
    assert augmented_view_id(3) == "fastai-aug-224-v3"
    assert augmented_view_id(0, size=128) == "fastai-aug-128-v0"
    with pytest.raises(ValueError):
        augmented_view_id(-1)


def test_augment_is_deterministic_given_the_seed_and_differs_across_seeds() -> None:
    batch = _textured_batch(batch_size=8)

    first = augment(batch, generator=torch.Generator().manual_seed(7))
    again = augment(batch, generator=torch.Generator().manual_seed(7))
    other = augment(batch, generator=torch.Generator().manual_seed(8))

    assert first.shape == batch.shape and first.dtype == torch.float32
    assert torch.equal(first, again)
    assert not torch.allclose(first, other, atol=1e-3)
    assert float(first.min()) >= 0.0 and float(first.max()) <= 1.0
    assert torch.equal(batch, _textured_batch(batch_size=8))  # the input is left untouched


def test_augment_draws_parameters_per_image() -> None:
    # Eight copies of one image: independent draws per image make the copies differ.
    batch = _textured_batch(batch_size=1).expand(8, -1, -1, -1).contiguous()

    out = augment(batch, generator=torch.Generator().manual_seed(0))

    distinct = {tuple(image.flatten()[::97].tolist()) for image in out}
    assert len(distinct) == 8


def test_first_images_parameters_do_not_depend_on_the_batch_size() -> None:
    batch = _textured_batch(batch_size=6)

    small = draw_augment_params(2, generator=torch.Generator().manual_seed(11))
    large = draw_augment_params(6, generator=torch.Generator().manual_seed(11))
    small_out = augment(batch[:2], generator=torch.Generator().manual_seed(11))
    large_out = augment(batch, generator=torch.Generator().manual_seed(11))

    assert torch.equal(small.rotate_degrees, large.rotate_degrees[:2])
    assert torch.equal(small.warp, large.warp[:2])
    # Same parameters; batched kernels may round differently in the last bit.
    assert torch.allclose(small_out, large_out[:2], atol=1e-5)


def test_drawn_parameters_follow_fastai_aug_transforms_defaults() -> None:
    params = draw_augment_params(20_000, generator=torch.Generator().manual_seed(0))

    def applied(values: torch.Tensor, neutral: float) -> float:
        return float((values != neutral).float().mean())

    assert abs(float(params.flip.float().mean()) - 0.5) < 0.02
    assert abs(applied(params.rotate_degrees, 0.0) - 0.75) < 0.02
    assert abs(applied(params.zoom, 1.0) - 0.75) < 0.02
    assert abs(applied(params.warp[:, 0], 0.0) - 0.75) < 0.02
    assert abs(applied(params.brightness, 0.5) - 0.75) < 0.02
    assert abs(applied(params.contrast, 1.0) - 0.75) < 0.02
    assert float(params.rotate_degrees.abs().max()) <= 10.0
    assert float(params.zoom.min()) >= 1.0 and float(params.zoom.max()) <= 1.1
    assert float(params.warp.abs().max()) <= 0.2
    assert float(params.brightness.min()) >= 0.4 and float(params.brightness.max()) <= 0.6
    assert float(params.contrast.min()) >= 0.8 - 1e-6 and float(params.contrast.max()) <= 1.25


def test_neutral_parameters_leave_the_batch_unchanged() -> None:
    batch = _textured_batch()

    assert torch.equal(apply_augment(batch, AugmentParams.neutral(4)), batch)


def test_flip_alone_equals_torch_flip() -> None:
    batch = _textured_batch()
    params = AugmentParams.neutral(4)
    params.flip[0] = True

    out = apply_augment(batch, params)

    assert torch.allclose(out[0], batch[0].flip(-1), atol=1e-6)
    assert not torch.allclose(out[0], batch[0], atol=1e-2)
    assert torch.equal(out[1:], batch[1:])  # untouched images are not resampled at all


def test_quarter_turn_equals_rot90() -> None:
    # Outside the default +-10 degrees, but a quarter turn is an exact pixel permutation, which
    # pins down the sampling grid's orientation and the align_corners convention. fastai's rotation
    # matrix turns positive angles clockwise on screen (rows grow downwards).
    batch = _textured_batch(batch_size=1)
    params = AugmentParams.neutral(1)
    params.rotate_degrees[0] = 90.0

    out = apply_augment(batch, params)

    assert torch.allclose(out, torch.rot90(batch, k=-1, dims=(-2, -1)), atol=1e-5)


def test_zoom_window_sits_where_the_centre_says() -> None:
    # zoom 2 anchored top-left shows the top-left quarter: output corners are input pixel (0, 0)
    # and the input's centre pixel (odd size, so the centre is a pixel).
    size = 33
    batch = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    params = AugmentParams.neutral(1)
    params.zoom[0] = 2.0
    params.zoom_center[0] = torch.tensor([0.0, 0.0])

    out = apply_augment(batch, params)

    assert torch.allclose(out[0, :, 0, 0], batch[0, :, 0, 0], atol=1e-6)
    assert torch.allclose(out[0, :, -1, -1], batch[0, :, 16, 16], atol=1e-6)


def test_warp_alone_moves_pixels_but_stays_in_range() -> None:
    batch = _textured_batch(batch_size=1)
    params = AugmentParams.neutral(1)
    params.warp[0] = torch.tensor([0.2, -0.2])

    out = apply_augment(batch, params)

    assert float((out - batch).abs().max()) > 0.05
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_brightness_and_contrast_act_in_logit_space() -> None:
    gray = torch.full((2, 3, 8, 8), 0.5)
    params = AugmentParams.neutral(2)
    params.brightness[0] = 0.6  # sigmoid(logit(0.5) + logit(0.6)) = 0.6
    params.contrast[1] = 1.25  # logit(0.5) = 0: contrast alone leaves mid-gray where it is
    x = torch.tensor([[0.2, 0.8]]).view(1, 1, 1, 2).expand(1, 3, 1, 2)
    contrast_only = AugmentParams.neutral(1)
    contrast_only.contrast[0] = 1.25

    out = apply_augment(gray, params)
    stretched = apply_augment(x, contrast_only)

    assert torch.allclose(out[0], torch.full_like(out[0], 0.6), atol=1e-6)
    assert torch.allclose(out[1], gray[1], atol=1e-6)
    expected = torch.sigmoid(torch.logit(x) * 1.25)
    assert torch.allclose(stretched, expected, atol=1e-6)
    assert float(stretched[0, 0, 0, 1] - stretched[0, 0, 0, 0]) > 0.6 + 0.05  # more contrast


def test_augmented_view_is_a_pure_function_of_image_and_view() -> None:
    pixels = _textured_batch(batch_size=1, size=64)[0]

    first = augmented_view(pixels, image_sha256=SHA, view=3)
    again = augmented_view(pixels.clone(), image_sha256=SHA, view=3)
    other_view = augmented_view(pixels, image_sha256=SHA, view=4)
    other_image = augmented_view(pixels, image_sha256=hashlib.sha256(b"x").hexdigest(), view=3)

    assert first.shape == (3, 64, 64)
    assert torch.equal(first, again)
    assert not torch.equal(first, other_view)
    assert not torch.equal(first, other_image)
    assert float(first.min()) >= 0.0 and float(first.max()) <= 1.0


def test_augmented_view_rejects_bad_keys() -> None:
    pixels = torch.zeros(3, 8, 8)
    with pytest.raises(ValueError, match="64 hex digits"):
        augmented_view(pixels, image_sha256="abc", view=0)
    with pytest.raises(ValueError, match="view"):
        augmented_view(pixels, image_sha256=SHA, view=-1)
    with pytest.raises(ValueError, match=r"\(3, S, S\)"):
        augmented_view(pixels[None], image_sha256=SHA, view=0)


def test_batched_views_match_single_views() -> None:
    from models.transforms import augmented_view, augmented_views

    generator = torch.Generator().manual_seed(3)
    pixels = torch.rand(3, 3, 32, 32, generator=generator)
    shas = [hashlib.sha256(bytes([i])).hexdigest() for i in range(3)]
    batched = augmented_views(pixels, image_sha256s=shas, view=2)
    for i, sha in enumerate(shas):
        single = augmented_view(pixels[i], image_sha256=sha, view=2)
        assert torch.allclose(batched[i], single, atol=1e-5)
    assert not torch.allclose(batched, augmented_views(pixels, image_sha256s=shas, view=3))
