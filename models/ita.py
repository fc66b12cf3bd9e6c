"""Skin-tone fidelity (issue 23): CIE L*a*b* of sRGB pixels, the individual typology angle
(ITA), a documented rule for which pixels count as skin, Groh et al. 2021's ITA bands for the
Fitzpatrick types, and Spearman's rank correlation. numpy and PIL only: no database, web,
app/ or diffusers imports here.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# sRGB (IEC 61966-2-1) linear RGB -> CIE XYZ, D65. The white point is the matrix's own image of
# RGB (1, 1, 1) (X 0.9505, Y 1, Z 1.0890, D65 to four places), so sRGB white is exactly
# L* 100, a* = b* = 0.
SRGB_TO_XYZ = np.array(
    [
        [0.4124, 0.3576, 0.1805],
        [0.2126, 0.7152, 0.0722],
        [0.0193, 0.1192, 0.9505],
    ]
)
WHITE_D65 = SRGB_TO_XYZ.sum(axis=1)
_EPSILON = (6 / 29) ** 3  # CIE's linear-segment switch for f(t)

# Groh et al. 2021's ITA bands on Fitzpatrick17k, lightest first: (type, lower bound). A type
# holds ITA > its lower bound and <= the next lighter type's lower bound, so every boundary
# belongs to the darker type: 40 is II, 23 III, 12 IV, 0 V and -25 VI.
ITA_BANDS: tuple[tuple[int, float], ...] = (
    (1, 40.0),
    (2, 23.0),
    (3, 12.0),
    (4, 0.0),
    (5, -25.0),
    (6, float("-inf")),
)

# The SKIN PIXEL RULE. Dermatology photos centre the lesion, so skin is sought in the border
# ring: pixels within BORDER_FRACTION of the side on any edge (the outer 20% on each side:
# 64% of the area). Of those, a pixel counts as skin when its colour is skin-like in L*a*b*:
# SKIN_L (drops black backgrounds and glare), hue angle atan2(b*, a*) in SKIN_HUE_DEGREES (the
# red-to-yellow quadrant every skin tone falls in) and chroma sqrt(a*^2 + b*^2) in SKIN_CHROMA
# (drops grey, white and saturated cloth). Limits: beige walls, wood, skin-coloured cloth and
# a lesion that reaches the border pass; a photo that is all lesion has no skin to find; very
# dark skin with low chroma or strong colour casts can fail. Below MIN_SKIN_PIXELS skin pixels
# (about 3% of the 128 x 128 image) `image_ita` says None rather than guess.
BORDER_FRACTION = 0.2
SKIN_L = (20.0, 92.0)
SKIN_HUE_DEGREES = (10.0, 85.0)
SKIN_CHROMA = (6.0, 60.0)
MIN_SKIN_PIXELS = 500
# |b*| below this is treated as 0 in the ITA (see ita_degrees)
B_STAR_ZERO = 1e-6


def srgb_to_lab(pixels: np.ndarray) -> np.ndarray:
    """8-bit sRGB (..., 3) -> CIE L*a*b* (..., 3) float64: sRGB companding undone, XYZ under
    D65, then CIE 1976 L*a*b*."""
    pixels = np.asarray(pixels)
    if pixels.shape[-1:] != (3,):
        raise ValueError(f"expected (..., 3) RGB pixels, got shape {pixels.shape}")
    c = pixels.astype(np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = (linear @ SRGB_TO_XYZ.T) / WHITE_D65
    f = np.where(xyz > _EPSILON, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    lab = np.empty_like(f)
    lab[..., 0] = 116 * f[..., 1] - 16
    lab[..., 1] = 500 * (f[..., 0] - f[..., 1])
    lab[..., 2] = 200 * (f[..., 1] - f[..., 2])
    return lab


def ita_degrees(lab: np.ndarray) -> np.ndarray:
    """ITA = atan((L* - 50) / b*) in degrees, of L*a*b* (..., 3).

    Written as atan of the ratio (not atan2), as the dermatology literature defines it, so it
    lies in (-90, 90]. Skin has b* > 0; where |b*| < B_STAR_ZERO the ratio's limit as b* -> 0+
    is used: +90 when L* > 50, -90 when L* < 50, NaN when L* is also 50 (no angle). A negative
    b* (bluish, not skin) flips the sign: the skin mask keeps such pixels out."""
    lab = np.asarray(lab, dtype=np.float64)
    lightness, b_star = lab[..., 0] - 50.0, lab[..., 2]
    near_zero = np.abs(b_star) < B_STAR_ZERO
    ratio = np.divide(lightness, b_star, out=np.zeros_like(b_star), where=~near_zero)
    ita = np.degrees(np.arctan(ratio))
    limit = np.where(lightness == 0, np.nan, 90.0 * np.sign(lightness))
    return np.where(near_zero, limit, ita)


def skin_mask(pixels: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 sRGB -> (H, W) bool: the SKIN PIXEL RULE above (border ring and colour)."""
    pixels = np.asarray(pixels)
    if pixels.ndim != 3:
        raise ValueError(f"expected (H, W, 3) pixels, got shape {pixels.shape}")
    height, width = pixels.shape[:2]
    rows, cols = np.arange(height)[:, None], np.arange(width)[None, :]
    edge_h, edge_w = BORDER_FRACTION * height, BORDER_FRACTION * width
    ring = (rows < edge_h) | (rows >= height - edge_h) | (cols < edge_w) | (cols >= width - edge_w)
    lab = srgb_to_lab(pixels)
    lightness, a_star, b_star = lab[..., 0], lab[..., 1], lab[..., 2]
    hue = np.degrees(np.arctan2(b_star, a_star))
    chroma = np.hypot(a_star, b_star)
    colour = (
        (SKIN_L[0] <= lightness)
        & (lightness <= SKIN_L[1])
        & (SKIN_HUE_DEGREES[0] <= hue)
        & (hue <= SKIN_HUE_DEGREES[1])
        & (SKIN_CHROMA[0] <= chroma)
        & (chroma <= SKIN_CHROMA[1])
    )
    return ring & colour


def image_ita(image: Image.Image, *, size: int = 128) -> float | None:
    """The median ITA (degrees) of an image's skin pixels after a resize to size x size, or
    None when fewer than MIN_SKIN_PIXELS (scaled to `size`) pass the skin rule."""
    pixels = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
    mask = skin_mask(pixels)
    if mask.sum() < MIN_SKIN_PIXELS * (size / 128) ** 2:
        return None
    ita = ita_degrees(srgb_to_lab(pixels[mask]))
    ita = ita[~np.isnan(ita)]
    return float(np.median(ita)) if len(ita) else None


def fitzpatrick_from_ita(ita: float) -> int:
    """The Fitzpatrick type (1..6) whose Groh et al. 2021 band holds this ITA (ITA_BANDS)."""
    if np.isnan(ita):
        raise ValueError("ITA is NaN: no skin type")
    for skin_type, lower in ITA_BANDS:
        if ita > lower:
            return skin_type
    return ITA_BANDS[-1][0]  # -inf itself


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, tied values sharing the mean of the ranks they span."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    # start of each run of equal values, and each value's run
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], len(values)]
    run_rank = (starts + ends + 1) / 2  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(values))
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation (ties get average ranks): the Pearson correlation of the
    ranks. NaN when either side is constant or has fewer than 2 values."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"expected two 1-d arrays of equal length, got {x.shape}, {y.shape}")
    if len(x) < 2:
        return float("nan")
    rx, ry = _average_ranks(x) - (len(x) + 1) / 2, _average_ranks(y) - (len(y) + 1) / 2
    denominator = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float((rx * ry).sum() / denominator) if denominator > 0 else float("nan")
