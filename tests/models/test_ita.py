"""Skin-tone fidelity (issue 23): sRGB -> L*a*b* against published values and an independent
scalar computation, ITA against math.atan by hand, the skin pixel rule, Groh et al.'s bands at
their boundaries, and Spearman with ties; on real photos, ITA falls as the labelled type rises."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.ita import (
    ITA_BANDS,
    fitzpatrick_from_ita,
    image_ita,
    ita_degrees,
    skin_mask,
    spearman,
    srgb_to_lab,
)

PHOTOS = Path("/work/shared/data/fitzpatrick17k_ajl21")
SKIN = (224, 172, 140)  # a light-medium skin tone
GROUPS = ((1, 2), (3, 4), (5, 6))


def lab_by_hand(rgb: tuple[int, int, int]) -> tuple[float, float, float]:
    """sRGB -> XYZ (D65) -> L*a*b*, one scalar at a time from the published formulas."""

    def linear(v: int) -> float:
        c = v / 255
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(v) for v in rgb)
    x = 0.4124 * r + 0.3576 * g + 0.1805 * b
    y = 0.2126 * r + 0.7152 * g + 0.0722 * b
    z = 0.0193 * r + 0.1192 * g + 0.9505 * b

    def f(t: float) -> float:
        return t ** (1 / 3) if t > 216 / 24389 else (24389 / 27 * t + 16) / 116

    fx, fy, fz = f(x / 0.9505), f(y / 1.0), f(z / 1.0890)
    return 116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)


def test_srgb_to_lab_matches_published_values_and_the_formulas() -> None:
    assert srgb_to_lab(np.array([255, 255, 255])) == pytest.approx([100, 0, 0], abs=1e-9)
    assert srgb_to_lab(np.array([0, 0, 0])) == pytest.approx([0, 0, 0], abs=1e-9)
    # published (Lindbloom's calculator, sRGB D65): red 53.24, 80.09, 67.20
    assert srgb_to_lab(np.array([255, 0, 0])) == pytest.approx([53.24, 80.09, 67.20], abs=0.05)
    # mid grey 119: L* 50.0, neutral
    assert srgb_to_lab(np.array([119, 119, 119])) == pytest.approx([50.0, 0, 0], abs=0.05)
    pixels = np.array([[SKIN, (90, 60, 45)], [(10, 10, 10), (200, 120, 60)]], dtype=np.uint8)
    lab = srgb_to_lab(pixels)
    assert lab.shape == (2, 2, 3)
    for row in range(2):
        for col in range(2):
            assert lab[row, col] == pytest.approx(lab_by_hand(tuple(pixels[row, col])), abs=0.01)


def test_ita_of_known_lab_pixels() -> None:
    lab = np.array([[70.0, 10.0, 20.0], [30.0, 12.0, 10.0], [62.0, 5.0, 15.0]])
    expected = [
        math.degrees(math.atan((70 - 50) / 20)),  # 45
        math.degrees(math.atan((30 - 50) / 10)),  # -63.43
        math.degrees(math.atan((62 - 50) / 15)),  # 38.66
    ]
    assert ita_degrees(lab) == pytest.approx(expected, abs=1e-9)
    # b* = 0: the limit as b* -> 0+, and no angle at all when L* is 50 too
    edge = ita_degrees(np.array([[60.0, 3.0, 0.0], [40.0, 3.0, 0.0], [50.0, 3.0, 0.0]]))
    assert edge[:2].tolist() == [90.0, -90.0] and math.isnan(edge[2])
    # the skin tone, through L*a*b* by hand
    lightness, _, b_star = lab_by_hand(SKIN)
    assert ita_degrees(srgb_to_lab(np.array(SKIN))) == pytest.approx(
        math.degrees(math.atan((lightness - 50) / b_star)), abs=1e-6
    )


@pytest.mark.parametrize(
    ("ita", "skin_type"),
    [
        (90.0, 1), (40.001, 1), (40.0, 2), (23.001, 2), (23.0, 3), (12.001, 3), (12.0, 4),
        (0.001, 4), (0.0, 5), (-24.999, 5), (-25.0, 6), (-90.0, 6),
    ],
)  # fmt: skip
def test_groh_bands_at_their_boundaries(ita: float, skin_type: int) -> None:
    assert fitzpatrick_from_ita(ita) == skin_type


def test_bands_cover_six_types_and_nan_has_none() -> None:
    assert [skin_type for skin_type, _ in ITA_BANDS] == [1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match="NaN"):
        fitzpatrick_from_ita(float("nan"))


def test_spearman_with_ties_matches_the_hand_computation() -> None:
    # ranks x: 1, 2.5, 2.5, 4; y: 1, 2, 3.5, 3.5 -> centred products 3.75 / sqrt(4.5 * 4.5)
    assert spearman(np.array([1, 2, 2, 3]), np.array([10, 20, 30, 30])) == pytest.approx(5 / 6)
    assert spearman(np.arange(5), -(np.arange(5) ** 3)) == pytest.approx(-1.0)
    assert math.isnan(spearman(np.array([1, 1, 1]), np.array([1, 2, 3])))


def test_skin_mask_keeps_skin_coloured_border_pixels_only() -> None:
    pixels = np.empty((50, 50, 3), dtype=np.uint8)
    pixels[:] = SKIN
    pixels[15:35, 15:35] = SKIN  # skin in the centre: not counted (the lesion's place)
    pixels[0:5, 20:30] = (40, 60, 200)  # a blue patch in the border: not skin
    pixels[45:50, 0:10] = (250, 250, 250)  # white background: not skin
    mask = skin_mask(pixels)
    assert mask[0:10, 0:10].all() and mask[40:45, 40:50].all()
    assert not mask[10:40, 10:40].any()
    assert not mask[0:5, 20:30].any() and not mask[45:50, 0:10].any()


def test_image_ita_is_the_skin_pixels_median_or_none() -> None:
    image = Image.new("RGB", (200, 160), SKIN)
    image.paste((120, 40, 50), (60, 50, 140, 110))  # a dark red lesion in the centre
    lightness, _, b_star = lab_by_hand(SKIN)
    assert image_ita(image) == pytest.approx(
        math.degrees(math.atan((lightness - 50) / b_star)), abs=0.5
    )
    assert image_ita(Image.new("RGB", (200, 160), (128, 128, 128))) is None  # no skin


def test_ita_falls_as_the_labelled_fitzpatrick_type_rises_on_real_photos() -> None:
    if not PHOTOS.is_dir():
        pytest.skip(f"{PHOTOS} is not here (the real photos live in ../shared/data)")
    with (PHOTOS / "metadata.csv").open() as file:
        rows = [row for row in csv.DictReader(file) if row["fitzpatrick_scale"] in "123456"]
    types, itas = [], []
    for row in rows[::10]:
        with Image.open(PHOTOS / row["path"]) as image:
            ita = image_ita(image)
        if ita is not None:
            types.append(int(row["fitzpatrick_scale"]))
            itas.append(ita)
    assert len(itas) > 0.8 * len(rows[::10])  # the rule finds skin in most photos
    skin_type, ita = np.array(types), np.array(itas)
    # on 2026-12-07: 384 photos, Spearman -0.38, medians by type 44, 27, 21, 9, 1, -22 (ITA is
    # a noisy per-photo estimate: Groh et al. also found it agrees with the labels only roughly)
    assert spearman(skin_type, ita) < -0.25
    light, middle, dark = (np.median(ita[np.isin(skin_type, group)]) for group in GROUPS)
    assert light > middle > dark
