"""Parent images prepared as the paper does (PAPER.md section 2): RGB, short side to 512
(bilinear), centre crop; unreadable bytes are a ValueError."""

from __future__ import annotations

import io
from glob import glob
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.parents import load_parent, prepare_parent

REAL_PHOTOS = Path("/work/shared/data/fitzpatrick17k_ajl21")
RED = (255, 0, 0)
BLUE = (0, 0, 255)


def encode(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


def red_box(image: Image.Image) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the strongly red pixels, right/bottom exclusive."""
    rgb = np.asarray(image).astype(int)  # (H, W, 3)
    red = (rgb[..., 0] > 200) & (rgb[..., 1] < 60) & (rgb[..., 2] < 60)
    rows, cols = np.nonzero(red)
    assert rows.size, "the marker is gone"
    return int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1


def test_300x200_becomes_512x512_rgb() -> None:
    out = prepare_parent(Image.new("RGB", (300, 200), (10, 20, 30)))
    assert out.size == (512, 512)
    assert out.mode == "RGB"
    assert (np.asarray(out) == (10, 20, 30)).all()


@pytest.mark.parametrize("size", [(1024, 256), (256, 1024)])
def test_long_image_keeps_its_centre_and_aspect(size: tuple[int, int]) -> None:
    width, height = size
    image = Image.new("RGB", size, (128, 128, 128))
    # a 16x16 marker at the centre; blue bars at both ends of the long side, cropped away
    image.paste(RED, (width // 2 - 8, height // 2 - 8, width // 2 + 8, height // 2 + 8))
    if width > height:
        image.paste(BLUE, (0, 0, 32, height))
        image.paste(BLUE, (width - 32, 0, width, height))
    else:
        image.paste(BLUE, (0, 0, width, 32))
        image.paste(BLUE, (0, height - 32, width, height))
    out = prepare_parent(image, size=512)
    assert out.size == (512, 512)
    left, top, right, bottom = red_box(out)
    # 512/256 = x2: the marker is about 32x32 (square: aspect kept) and centred
    assert abs((left + right) / 2 - 256) <= 1
    assert abs((top + bottom) / 2 - 256) <= 1
    assert 30 <= right - left <= 34
    assert 30 <= bottom - top <= 34
    rgb = np.asarray(out).astype(int)
    assert not ((rgb[..., 2] > 200) & (rgb[..., 0] < 60)).any(), "the ends were not cropped"


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "1"])
def test_other_modes_become_rgb(mode: str) -> None:
    image = Image.new("RGB", (200, 300), (200, 200, 200)).convert(mode)
    out = prepare_parent(image, size=64)
    assert out.mode == "RGB"
    assert out.size == (64, 64)


def test_small_sizes_work() -> None:
    out = prepare_parent(Image.new("RGB", (37, 91)), size=64)
    assert out.size == (64, 64)


def test_invalid_size_raises() -> None:
    with pytest.raises(ValueError, match="size"):
        prepare_parent(Image.new("RGB", (10, 10)), size=0)


@pytest.mark.parametrize("image_format", ["PNG", "JPEG"])
def test_load_parent_decodes_png_and_jpeg(image_format: str) -> None:
    image = Image.new("RGB", (300, 200), (200, 40, 40))
    image.paste((0, 0, 0), (0, 0, 30, 200))  # a dark left edge, cropped away
    out = load_parent(encode(image, image_format), size=512)
    assert out.size == (512, 512)
    assert out.mode == "RGB"
    assert np.asarray(out)[..., 0].min() > 100  # the dark edge is cropped away, red remains


@pytest.mark.parametrize(
    "data",
    [b"", b"not an image at all", encode(Image.new("RGB", (64, 64), (1, 2, 3)), "PNG")[:60]],
    ids=["empty", "garbage", "truncated-png"],
)
def test_unreadable_bytes_raise_value_error(data: bytes) -> None:
    with pytest.raises(ValueError, match="cannot decode"):
        load_parent(data, size=512)


def test_real_photo() -> None:
    photos = sorted(glob(str(REAL_PHOTOS / "**" / "*.jpg"), recursive=True))
    if not photos:
        pytest.skip(f"no real photos under {REAL_PHOTOS}")
    data = Path(photos[0]).read_bytes()
    out = load_parent(data, size=512)
    assert out.size == (512, 512)
    assert out.mode == "RGB"
    # the centre of the crop is the centre of the bilinear-resized original (within a pixel)
    original = Image.open(io.BytesIO(data)).convert("RGB")
    scale = 512 / min(original.size)
    resized = original.resize(
        (round(original.width * scale), round(original.height * scale)),
        Image.Resampling.BILINEAR,
    )
    expected = np.asarray(resized.getpixel((resized.width // 2, resized.height // 2)))
    got = np.asarray(out.getpixel((256, 256)))
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 12
