"""The memorisation audit (issue 23): each synthetic image's nearest real training image by
cosine similarity of features, SSIM of a pair's pixels, a copy threshold calibrated on the
real set itself, and the copy fraction with its interval. Pure torch/numpy/PIL: no database,
web, app/ or diffusers imports here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from models.quality import proportion_ci

CPU = torch.device("cpu")
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03  # Wang et al. 2004's constants, for pixels in [0, 1]


def _unit_rows(x: np.ndarray, *, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Rows L2-normalised in float32, then cast (a zero row stays zero: similarity 0)."""
    rows = torch.as_tensor(np.asarray(x), device=device).float()
    return torch.nn.functional.normalize(rows, dim=1).to(dtype)


def nearest_neighbours(
    queries: np.ndarray,
    references: np.ndarray,
    *,
    device: torch.device = CPU,
    chunk: int = 8192,
    half: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """For each query row, the index of its most cosine-similar reference row and that
    similarity (float32). Rows are normalised once; each chunk of queries is one matrix product
    against all references and keeps only its top 1, so at most chunk x n similarities exist at
    once. `half` (None: on CUDA only) multiplies in float16, which the CPU does slowly.
    Ties go to whichever index torch's max returns."""
    queries, references = np.asarray(queries), np.asarray(references)
    if queries.ndim != 2 or references.ndim != 2 or queries.shape[1] != references.shape[1]:
        raise ValueError(
            f"expected (m, d) and (n, d) with equal d, got {queries.shape}, {references.shape}"
        )
    if not len(references):
        raise ValueError("no references to search")
    use_half = device.type == "cuda" if half is None else half
    dtype = torch.float16 if use_half else torch.float32
    refs = _unit_rows(references, device=device, dtype=dtype)  # (n, d)
    indices = np.empty(len(queries), dtype=np.int64)
    similarities = np.empty(len(queries), dtype=np.float32)
    for start in range(0, len(queries), chunk):
        block = _unit_rows(queries[start : start + chunk], device=device, dtype=dtype) @ refs.T
        best, where = block.max(dim=1)  # (chunk,)
        indices[start : start + len(best)] = where.cpu().numpy()
        similarities[start : start + len(best)] = best.float().cpu().numpy()
    return indices, similarities


def naive_nearest_neighbours(
    queries: np.ndarray, references: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The baseline: one query at a time in numpy float64, its cosine similarity to every
    reference, then argmax (the first index on a tie)."""
    refs = np.asarray(references, dtype=np.float64)
    refs = refs / np.maximum(np.linalg.norm(refs, axis=1, keepdims=True), 1e-12)
    indices = np.empty(len(queries), dtype=np.int64)
    similarities = np.empty(len(queries), dtype=np.float64)
    for i, query in enumerate(np.asarray(queries, dtype=np.float64)):
        scores = refs @ (query / max(float(np.linalg.norm(query)), 1e-12))
        indices[i] = int(np.argmax(scores))
        similarities[i] = scores[indices[i]]
    return indices, similarities


def _gaussian_window() -> torch.Tensor:
    offsets = torch.arange(SSIM_WINDOW, dtype=torch.float64) - (SSIM_WINDOW - 1) / 2
    weights = torch.exp(-(offsets**2) / (2 * SSIM_SIGMA**2))
    return weights / weights.sum()  # (11,)


def _blur(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter over (C, 1, H, W), 'valid' (no padding)."""
    x = torch.nn.functional.conv2d(x, window.view(1, 1, 1, -1))
    return torch.nn.functional.conv2d(x, window.view(1, 1, -1, 1))


def pixel_similarity(a: Image.Image, b: Image.Image, *, size: int = 64) -> float:
    """Mean SSIM (Wang et al. 2004) over the R, G and B channels of the two images resized to
    size x size: Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, pixels in [0, 1], valid
    region only. 1 for identical images; noise, shifts and flips lower it."""
    if size < SSIM_WINDOW:
        raise ValueError(f"size must be at least the window ({SSIM_WINDOW}), got {size}")

    def pixels(image: Image.Image) -> torch.Tensor:
        resized = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
        array = torch.from_numpy(np.asarray(resized, dtype=np.float64) / 255.0)
        return array.permute(2, 0, 1).unsqueeze(1)  # (3, 1, size, size)

    x, y = pixels(a), pixels(b)
    window = _gaussian_window()
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    mu_x, mu_y = _blur(x, window), _blur(y, window)
    var_x = _blur(x * x, window) - mu_x**2
    var_y = _blur(y * y, window) - mu_y**2
    cov = _blur(x * y, window) - mu_x * mu_y
    ssim = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    return float(ssim.mean())


@dataclass(frozen=True)
class Threshold:
    """A copy threshold and how it separated the calibration sets: copy_rate is the share of
    augmented copies at or above it (true positives), other_rate the share of nearest other
    real images at or above it (false positives)."""

    value: float
    copy_rate: float
    other_rate: float
    n_copies: int
    n_others: int


def calibrate_threshold(copies: np.ndarray, others: np.ndarray) -> Threshold:
    """The similarity threshold (flag at or above) that best separates `copies` (real images
    against augmented copies of themselves) from `others` (real images against their nearest
    OTHER real image): the highest of those that maximise balanced accuracy. Only the copies'
    values need trying: moving a threshold up to the next copy value keeps every copy it flags
    and flags no more others."""
    copies = np.sort(np.asarray(copies, dtype=np.float64))
    others = np.sort(np.asarray(others, dtype=np.float64))
    if not len(copies) or not len(others):
        raise ValueError(f"need both sets, got {len(copies)} copies and {len(others)} others")
    if np.isnan(copies).any() or np.isnan(others).any():
        raise ValueError("similarities must not be NaN")
    candidates = np.unique(copies)
    copies_flagged = len(copies) - np.searchsorted(copies, candidates, side="left")
    others_flagged = len(others) - np.searchsorted(others, candidates, side="left")
    # balanced accuracy times 2 n_copies n_others, in integers so that ties are exact
    score = copies_flagged * len(others) + (len(others) - others_flagged) * len(copies)
    best = np.flatnonzero(score == score.max())[-1]  # ties: the highest threshold
    return Threshold(
        value=float(candidates[best]),
        copy_rate=float(copies_flagged[best] / len(copies)),
        other_rate=float(others_flagged[best] / len(others)),
        n_copies=len(copies),
        n_others=len(others),
    )


def copy_fraction(
    similarities: np.ndarray, threshold: float
) -> tuple[float, tuple[float, float], np.ndarray]:
    """The share of similarities at or above `threshold`, its Wilson 95% interval, and the
    flagged positions (ascending). No similarities: 0.0 and (0, 1)."""
    similarities = np.asarray(similarities)
    flagged = np.flatnonzero(similarities >= threshold)
    n = len(similarities)
    fraction = len(flagged) / n if n else 0.0
    return fraction, proportion_ci(len(flagged), n), flagged
