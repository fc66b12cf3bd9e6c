"""The memorisation audit (issue 23): chunked nearest neighbours equal the one-at-a-time
baseline, SSIM behaves, the threshold separates what it should, and on real photos a planted
exact copy and a planted augmented copy are flagged while an unrelated photo is not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from models.backbones import load_backbone
from models.memorisation import (
    calibrate_threshold,
    copy_fraction,
    naive_nearest_neighbours,
    nearest_neighbours,
    pixel_similarity,
)
from models.transforms import resize_crop

PHOTOS = Path("/work/shared/data/fitzpatrick17k_ajl21")


@pytest.mark.parametrize("chunk", [1, 5, 37, 8192])
def test_chunked_nearest_neighbours_equal_the_naive_baseline(chunk: int) -> None:
    generator = np.random.default_rng(0)
    references = generator.standard_normal((23, 16)).astype(np.float16)
    queries = generator.standard_normal((37, 16)).astype(np.float16)
    queries[3] = references[7] * 4  # same direction: cosine 1
    queries[4] = 0  # a zero row: similarity 0, no NaN
    indices, similarities = nearest_neighbours(queries, references, chunk=chunk)
    naive_indices, naive_similarities = naive_nearest_neighbours(queries, references)
    assert (indices[np.arange(37) != 4] == naive_indices[np.arange(37) != 4]).all()
    assert similarities == pytest.approx(naive_similarities, abs=1e-5)
    assert indices[3] == 7 and similarities[3] == pytest.approx(1.0, abs=1e-6)
    assert similarities[4] == 0.0


def test_half_precision_finds_the_same_neighbours() -> None:
    generator = np.random.default_rng(1)
    references = generator.standard_normal((50, 32))
    queries = references[[4, 9, 30]] + 0.05 * generator.standard_normal((3, 32))
    indices, similarities = nearest_neighbours(queries, references, chunk=2, half=True)
    assert indices.tolist() == [4, 9, 30] and (similarities > 0.99).all()


def noisy(image: Image.Image, amount: float, seed: int = 0) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float64)
    noise = np.random.default_rng(seed).normal(0, amount * 255, pixels.shape)
    return Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))


def test_ssim_of_an_image_with_itself_is_one_and_falls_with_noise() -> None:
    gradient = np.linspace(0, 255, 80)[None, :, None] * np.ones((80, 1, 3))
    gradient[20:50, 30:60] = (180, 60, 40)
    image = Image.fromarray(gradient.astype(np.uint8))
    assert pixel_similarity(image, image) == pytest.approx(1.0, abs=1e-12)
    scores = [pixel_similarity(image, noisy(image, amount)) for amount in (0.02, 0.1, 0.3)]
    assert 1.0 > scores[0] > scores[1] > scores[2]
    assert pixel_similarity(image, ImageOps.mirror(image)) < scores[0]


def test_threshold_on_separable_and_overlapping_similarities() -> None:
    separable = calibrate_threshold(np.array([0.95, 0.9, 0.99]), np.array([0.3, 0.5, 0.6]))
    assert (separable.value, separable.copy_rate, separable.other_rate) == (0.9, 1.0, 0.0)
    assert (separable.n_copies, separable.n_others) == (3, 3)
    # 0.6: TPR 1, FPR 3/6; 0.8: 0.8, 2/6; 0.85: 0.6, 0 (balanced 0.8, the best); 0.9: 0.4, 0
    overlapping = calibrate_threshold(
        np.array([0.6, 0.8, 0.85, 0.9, 0.95]), np.array([0.3, 0.5, 0.7, 0.82, 0.83, 0.4])
    )
    assert (overlapping.value, overlapping.copy_rate, overlapping.other_rate) == (0.85, 0.6, 0.0)
    # every candidate ties at balanced accuracy 0.625: the highest wins
    tied = calibrate_threshold(np.array([0.5, 0.7, 0.8, 0.9]), np.array([0.2, 0.6, 0.75, 0.85]))
    assert (tied.value, tied.copy_rate, tied.other_rate) == (0.9, 0.25, 0.0)
    with pytest.raises(ValueError):
        calibrate_threshold(np.array([]), np.array([0.1]))


def test_copy_fraction_flags_at_or_above_the_threshold() -> None:
    fraction, (low, high), flagged = copy_fraction(np.array([0.2, 0.9, 0.5, 0.95, 0.9]), 0.9)
    assert fraction == 0.6 and flagged.tolist() == [1, 3, 4]
    assert low < 0.6 < high
    assert copy_fraction(np.array([]), 0.5)[:2] == (0.0, (0.0, 1.0))


def augmented(image: Image.Image, *, flip: bool) -> Image.Image:
    """A small crop (5% a side), brightness x1.1, and a mirror when `flip`."""
    width, height = image.size
    dx, dy = round(0.05 * width), round(0.05 * height)
    out = ImageEnhance.Brightness(image.crop((dx, dy, width - dx, height - dy))).enhance(1.1)
    return ImageOps.mirror(out) if flip else out


def test_planted_copies_are_flagged_and_an_unrelated_photo_is_not() -> None:
    if not PHOTOS.is_dir():
        pytest.skip(f"{PHOTOS} is not here (the real photos live in ../shared/data)")
    paths = sorted((PHOTOS / "acne-vulgaris").glob("*.jpg"))[:16]
    unrelated_path = sorted((PHOTOS / "kaposi-sarcoma").glob("*.jpg"))[0]
    reals = [Image.open(path).convert("RGB") for path in paths]
    unrelated = Image.open(unrelated_path).convert("RGB")
    backbone = load_backbone("efficientnet-lite0")

    def features(images: list[Image.Image]) -> np.ndarray:
        pixels = torch.stack([resize_crop(image) for image in images])
        return backbone.features(pixels).half().numpy()  # float16, as the cache stores them

    real_features = features(reals)
    # calibrate on the real set: each photo against its augmented copy, and against its
    # nearest other photo
    copies = features([augmented(image, flip=True) for image in reals])
    copy_similarities = np.array(
        [nearest_neighbours(copies[i : i + 1], real_features[i : i + 1])[1][0] for i in range(16)]
    )
    unit = real_features.astype(np.float64)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    between = unit @ unit.T
    np.fill_diagonal(between, -1)
    threshold = calibrate_threshold(copy_similarities, between.max(axis=1))
    assert threshold.copy_rate > 0.9

    # the synthetic set: an exact copy of photo 2, an augmented copy of photo 5 (another crop
    # and brightness than the calibration's, no mirror), and a photo of another condition
    planted = [reals[2], augmented(reals[5].rotate(3), flip=False), unrelated]
    indices, similarities = nearest_neighbours(features(planted), real_features)
    assert indices[:2].tolist() == [2, 5]
    assert similarities[0] == pytest.approx(1.0, abs=1e-3)
    fraction, _, flagged = copy_fraction(similarities, threshold.value)
    assert flagged.tolist() == [0, 1] and fraction == pytest.approx(2 / 3)
    # the pixels agree: the exact copy is SSIM 1, the crop well above the unrelated pair
    assert pixel_similarity(planted[0], reals[indices[0]]) == pytest.approx(1.0)
    near = pixel_similarity(planted[1], reals[5])
    assert near > pixel_similarity(planted[2], reals[indices[2]]) + 0.2
