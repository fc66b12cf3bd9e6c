"""Real "parent" images prepared for inpainting as the paper does (PAPER.md section 2): RGB,
short side resized to `size` (bilinear), centre-cropped to size x size.

PIL only: no torch and no pipeline here; scaling to [-1, 1] is the pipeline's own job.
"""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError


def check_inputs(image: Image.Image, *, size: int) -> None:
    """Raise an actionable ValueError when the image cannot be prepared."""
    if size < 1:
        raise ValueError(f"size must be a positive integer, got {size}")
    if image.width < 1 or image.height < 1:
        raise ValueError(f"image is empty ({image.width}x{image.height})")


def prepare_parent(image: Image.Image, *, size: int = 512) -> Image.Image:
    """RGB, short side resized to `size` (bilinear, aspect kept), centre-cropped to a square."""
    # 1. check inputs
    check_inputs(image, size=size)
    # 2. RGB: grayscale, palette and RGBA (alpha dropped) inputs all become 3 channels
    image = image.convert("RGB")
    # 3. resize the short side to `size`, the long side in proportion (PAPER.md section 2)
    width, height = image.size
    if width <= height:
        new_width, new_height = size, max(size, round(height * size / width))
    else:
        new_width, new_height = max(size, round(width * size / height)), size
    if (new_width, new_height) != (width, height):
        image = image.resize((new_width, new_height), Image.Resampling.BILINEAR)
    # 4. centre-crop to (size, size); offsets rounded as torchvision's CenterCrop does
    left = round((new_width - size) / 2)
    top = round((new_height - size) / 2)
    return image.crop((left, top, left + size, top + size))


def load_parent(data: bytes, *, size: int = 512) -> Image.Image:
    """Decode PNG/JPEG bytes and prepare them as a parent image."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # decode now, so truncated files fail here and not later
        # EXIF orientation is not applied: the paper's loader (PIL, torchvision) ignores it too.
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise ValueError(
            f"parent image: cannot decode {len(data)} bytes as an image (PNG or JPEG expected): "
            f"{error}"
        ) from error
    return prepare_parent(image, size=size)
