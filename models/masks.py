"""The paper's inpainting masks (PAPER.md section 2b) as PIL "L" images: 255 = regenerate, 0 = keep.

PIL only: no numpy, torch or pipeline here, so masks are cheap to build and to check anywhere.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

REGENERATE = 255  # diffusers convention: white is repainted
KEEP = 0


def check_central_inputs(*, size: int, latent_size: int, mask_fraction: float) -> None:
    """Raise a ValueError naming the parameter when the central mask cannot be built."""
    if not 0 < mask_fraction < 0.5:
        raise ValueError(f"mask_fraction must be in (0, 0.5), got {mask_fraction}")
    if latent_size < 1:
        raise ValueError(f"latent_size must be a positive integer, got {latent_size}")
    if size < 1 or size % latent_size:
        raise ValueError(
            f"size must be a positive multiple of latent_size ({latent_size}), got {size}"
        )
    border = round(latent_size * mask_fraction)
    if latent_size - 2 * border < 1:
        raise ValueError(
            f"mask_fraction {mask_fraction} leaves no masked rows at latent_size {latent_size}"
        )


def check_frame_inputs(*, size: int, frame_px: int) -> None:
    """Raise a ValueError naming the parameter when the frame mask cannot be built."""
    if size < 1:
        raise ValueError(f"size must be a positive integer, got {size}")
    if not 0 <= frame_px < size / 2:
        raise ValueError(f"frame_px must be in [0, size/2) = [0, {size / 2}), got {frame_px}")


def central_mask(
    *, size: int = 512, latent_size: int = 64, mask_fraction: float = 0.25
) -> Image.Image:
    """The step-1 inpaint mask: a central square set at latent resolution, upsampled nearest."""
    check_central_inputs(size=size, latent_size=latent_size, mask_fraction=mask_fraction)
    # Built on the latent grid then upsampled, as the paper does (PAPER.md section 2b): for the
    # defaults rows/cols 16..47 of 64, i.e. pixels 128..383 of 512.
    border = round(latent_size * mask_fraction)
    grid = Image.new("L", (latent_size, latent_size), KEEP)  # (h, w) latent grid
    # box right/bottom are exclusive: rows and columns border..latent_size-border-1 inclusive
    grid.paste(REGENERATE, (border, border, latent_size - border, latent_size - border))
    return grid.resize((size, size), Image.Resampling.NEAREST)  # (size, size)


def frame_mask(*, size: int = 512, frame_px: int = 16) -> Image.Image:
    """The step-2 (inpaint-outpaint) mask: regenerate everything but an outer frame of frame_px."""
    check_frame_inputs(size=size, frame_px=frame_px)
    # PAPER.md section 2b: only the original's 16-px frame survives both steps.
    mask = Image.new("L", (size, size), KEEP)  # (size, size)
    mask.paste(REGENERATE, (frame_px, frame_px, size - frame_px, size - frame_px))
    return mask


def central_mask_params(
    *, size: int = 512, latent_size: int = 64, mask_fraction: float = 0.25
) -> dict[str, Any]:
    """The central mask's geometry, to record as provenance next to each image."""
    check_central_inputs(size=size, latent_size=latent_size, mask_fraction=mask_fraction)
    return {
        "mask": "central",
        "mask_fraction": mask_fraction,
        "latent_size": latent_size,
        "size": size,
    }


def frame_mask_params(*, size: int = 512, frame_px: int = 16) -> dict[str, Any]:
    """The frame mask's geometry, to record as provenance next to each image."""
    check_frame_inputs(size=size, frame_px=frame_px)
    return {"mask": "frame", "frame_px": frame_px, "size": size}
