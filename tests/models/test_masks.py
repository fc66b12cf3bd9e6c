"""The paper's masks (PAPER.md section 2b): exact pixels, the latent-grid construction, the
frame mask, and ValueErrors that name the bad parameter."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from models.masks import central_mask, central_mask_params, frame_mask, frame_mask_params


def pixels(mask: Image.Image) -> np.ndarray:
    assert mask.mode == "L"
    return np.asarray(mask)  # (H, W) uint8


def test_default_central_mask_is_the_central_256px_square() -> None:
    mask = pixels(central_mask())
    assert mask.shape == (512, 512)
    expected = np.zeros((512, 512), dtype=np.uint8)
    expected[128:384, 128:384] = 255
    np.testing.assert_array_equal(mask, expected)
    assert set(np.unique(mask)) == {0, 255}


def test_default_central_mask_is_the_upsampled_latent_grid() -> None:
    grid = np.zeros((64, 64), dtype=np.uint8)
    grid[16:48, 16:48] = 255  # rows and columns 16..47 inclusive
    upsampled = np.kron(grid, np.ones((8, 8), dtype=np.uint8))  # nearest, by hand
    np.testing.assert_array_equal(pixels(central_mask()), upsampled)


def test_small_central_mask() -> None:
    mask = pixels(central_mask(size=64, latent_size=8, mask_fraction=0.25))
    expected = np.zeros((64, 64), dtype=np.uint8)
    expected[16:48, 16:48] = 255
    np.testing.assert_array_equal(mask, expected)


def test_default_frame_mask_keeps_a_16px_frame() -> None:
    mask = pixels(frame_mask())
    assert mask.shape == (512, 512)
    expected = np.zeros((512, 512), dtype=np.uint8)
    expected[16:496, 16:496] = 255
    np.testing.assert_array_equal(mask, expected)


def test_small_frame_mask() -> None:
    mask = pixels(frame_mask(size=64, frame_px=2))
    expected = np.zeros((64, 64), dtype=np.uint8)
    expected[2:62, 2:62] = 255
    np.testing.assert_array_equal(mask, expected)


def test_frame_mask_without_frame_regenerates_everything() -> None:
    assert (pixels(frame_mask(size=64, frame_px=0)) == 255).all()


def test_params_record_the_geometry() -> None:
    assert central_mask_params() == {
        "mask": "central",
        "mask_fraction": 0.25,
        "latent_size": 64,
        "size": 512,
    }
    assert frame_mask_params(size=64, frame_px=2) == {"mask": "frame", "frame_px": 2, "size": 64}


@pytest.mark.parametrize(
    ("kwargs", "parameter"),
    [
        ({"mask_fraction": 0.0}, "mask_fraction"),
        ({"mask_fraction": 0.5}, "mask_fraction"),
        ({"mask_fraction": -0.1}, "mask_fraction"),
        ({"size": 500}, "size"),
        ({"size": 64, "latent_size": 0}, "latent_size"),
        ({"size": 8, "latent_size": 8, "mask_fraction": 0.49}, "mask_fraction"),
    ],
)
def test_invalid_central_mask(kwargs: dict, parameter: str) -> None:
    with pytest.raises(ValueError, match=parameter):
        central_mask(**kwargs)
    with pytest.raises(ValueError, match=parameter):
        central_mask_params(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "parameter"),
    [
        ({"frame_px": -1}, "frame_px"),
        ({"frame_px": 256}, "frame_px"),
        ({"size": 64, "frame_px": 32}, "frame_px"),
        ({"size": 0, "frame_px": 0}, "size"),
    ],
)
def test_invalid_frame_mask(kwargs: dict, parameter: str) -> None:
    with pytest.raises(ValueError, match=parameter):
        frame_mask(**kwargs)
    with pytest.raises(ValueError, match=parameter):
        frame_mask_params(**kwargs)
