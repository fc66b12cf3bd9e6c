"""What a fine-tuning step sees: the paper's DreamBooth augmentation and inpainting masks in
plain torch (PAPER.md section 3), every draw from an explicit generator so that a run resumes
bit-identically. No diffusers, no database, no torchvision (it does not import beside our torch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# PAPER.md section 3: RandomResizedCrop(scale 0.9-1.1, ratio 0.9-1.1), ColorJitter(0.05 each),
# horizontal flip.
CROP_SCALE = (0.9, 1.1)
CROP_RATIO = (0.9, 1.1)
JITTER = 0.05
FLIP_P = 0.5
# Uniforms drawn per image, in this order: scale, log-ratio, centre x, centre y, flip,
# brightness, contrast, saturation, hue. One (B, 9) block per batch keeps image i's draw
# independent of how the others are used.
_UNIFORMS_PER_IMAGE = 9
# Mask draws per sample: kind, width, height, centre x, centre y.
_UNIFORMS_PER_MASK = 5
# ITU-R BT.601 luma, as torchvision's rgb_to_grayscale.
_LUMA = (0.299, 0.587, 0.114)
# The YIQ transform the hue shift rotates in (its first row is the luma).
_TO_YIQ = torch.tensor([_LUMA, (0.596, -0.274, -0.322), (0.211, -0.523, 0.312)])
_FROM_YIQ = torch.linalg.inv(_TO_YIQ)


def prepare_source(image: Image.Image, *, resolution: int) -> torch.Tensor:
    """RGB image of any size -> (3, H, W) uint8 with short side = resolution, aspect kept.

    Done once per image: every crop is then a ~1x resample (no aliasing), and a 3000-px photo
    is not resampled on every step."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    resized = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    array = np.asarray(resized, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()  # (3, H, W)


@dataclass(frozen=True)
class AugmentDraw:
    """Per-image augmentation parameters (neutral values: scale 1, ratio 1, centre 0.5, no flip,
    factors 1, hue 0)."""

    scale: torch.Tensor  # (B,) crop area / short side squared, in CROP_SCALE
    ratio: torch.Tensor  # (B,) crop width / height, log-uniform in CROP_RATIO
    center: torch.Tensor  # (B, 2) in [0, 1]: where the window sits along x and y
    flip: torch.Tensor  # (B,) bool
    brightness: torch.Tensor  # (B,) in [1 - JITTER, 1 + JITTER]
    contrast: torch.Tensor  # (B,)
    saturation: torch.Tensor  # (B,)
    hue: torch.Tensor  # (B,) in [-JITTER, JITTER] of a full turn

    @classmethod
    def neutral(cls, batch_size: int) -> AugmentDraw:
        ones = torch.ones(batch_size)
        return cls(
            scale=ones,
            ratio=ones,
            center=torch.full((batch_size, 2), 0.5),
            flip=torch.zeros(batch_size, dtype=torch.bool),
            brightness=ones,
            contrast=ones,
            saturation=ones,
            hue=torch.zeros(batch_size),
        )


def draw_augment(batch_size: int, *, generator: torch.Generator) -> AugmentDraw:
    """The paper's augmentation parameters for `batch_size` images, from `generator`."""
    u = torch.rand(batch_size, _UNIFORMS_PER_IMAGE, generator=generator)  # (B, 9) in [0, 1)

    def uniform(column: int, low: float, high: float) -> torch.Tensor:
        return low + (high - low) * u[:, column]

    log_ratio = uniform(1, math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    return AugmentDraw(
        scale=uniform(0, *CROP_SCALE),
        ratio=log_ratio.exp(),  # log-uniform, as torchvision's RandomResizedCrop
        center=u[:, 2:4].clone(),
        flip=u[:, 4] < FLIP_P,
        brightness=uniform(5, 1 - JITTER, 1 + JITTER),
        contrast=uniform(6, 1 - JITTER, 1 + JITTER),
        saturation=uniform(7, 1 - JITTER, 1 + JITTER),
        hue=uniform(8, -JITTER, JITTER),
    )


def _crop_grid(
    draw: AugmentDraw, index: int, *, height: int, width: int, resolution: int
) -> torch.Tensor:
    """(1, R, R, 2) grid_sample coordinates of image `index`'s crop window, flip included."""
    # The window's area is scale * short side^2 and its width/height is ratio (torchvision's
    # definition relative to the short side rather than the whole image). Where the window is
    # larger than the image along an axis (scale > 1), it is centred on that axis and the
    # overflow is filled by reflecting the image (a slight zoom-out); otherwise its centre is
    # uniform over the positions that keep it inside the image.
    short = min(height, width)
    area = float(draw.scale[index]) * short * short
    ratio = float(draw.ratio[index])
    window_w, window_h = math.sqrt(area * ratio), math.sqrt(area / ratio)

    def centre(window: float, extent: int, u: float) -> float:
        free = extent - window
        return extent / 2 if free <= 0 else window / 2 + u * free

    cx = centre(window_w, width, float(draw.center[index, 0]))
    cy = centre(window_h, height, float(draw.center[index, 1]))
    steps = (torch.arange(resolution, dtype=torch.float64) + 0.5) / resolution - 0.5  # (R,)
    xs = cx + steps * window_w  # pixel coordinates of each output pixel centre
    ys = cy + steps * window_h
    if bool(draw.flip[index]):
        xs = xs.flip(0)
    # align_corners=False: -1 and 1 are the outer edges of the border pixels.
    xs, ys = 2 * xs / width - 1, 2 * ys / height - 1
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")  # (R, R) each
    return torch.stack([grid_x, grid_y], dim=-1)[None].float()  # (1, R, R, 2)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(dim=1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b)[:, None]  # (B, 1, H, W)


def _rotate_hue(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Rotate the chroma of (B, 3, H, W) by `turns` of a full circle in YIQ space (a linear
    stand-in for torchvision's HSV hue shift: same luma, same chroma magnitude)."""
    to_yiq, from_yiq = _TO_YIQ.to(x), _FROM_YIQ.to(x)
    angle = 2 * math.pi * turns.to(x)
    cos, sin = angle.cos(), angle.sin()
    rotation = torch.zeros(x.shape[0], 3, 3, dtype=x.dtype, device=x.device)
    rotation[:, 0, 0] = 1
    rotation[:, 1, 1], rotation[:, 1, 2], rotation[:, 2, 1], rotation[:, 2, 2] = cos, -sin, sin, cos
    matrix = from_yiq @ rotation @ to_yiq  # (B, 3, 3)
    return torch.einsum("bij,bjhw->bihw", matrix, x)


def color_jitter(x: torch.Tensor, draw: AugmentDraw) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> jittered, clamped to [0, 1] after each op as torchvision does;
    fixed order brightness, contrast, saturation, hue (torchvision shuffles it per call)."""
    view = (-1, 1, 1, 1)
    x = (x * draw.brightness.to(x).view(view)).clamp(0, 1)
    mean = _grayscale(x).mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    x = (mean + draw.contrast.to(x).view(view) * (x - mean)).clamp(0, 1)
    gray = _grayscale(x)
    x = (gray + draw.saturation.to(x).view(view) * (x - gray)).clamp(0, 1)
    return _rotate_hue(x, draw.hue).clamp(0, 1)


def augment(
    sources: list[torch.Tensor], draw: AugmentDraw, *, resolution: int, device: torch.device
) -> torch.Tensor:
    """uint8 sources (3, H_i, W_i) -> (B, 3, R, R) float in [-1, 1]: crop, flip, jitter."""
    views = []
    for index, source in enumerate(sources):
        _, height, width = source.shape
        grid = _crop_grid(draw, index, height=height, width=width, resolution=resolution)
        image = source.to(device, non_blocking=True)[None].float().div_(255.0)  # (1, 3, H, W)
        views.append(
            F.grid_sample(
                image,
                grid.to(device),
                mode="bilinear",
                padding_mode="reflection",
                align_corners=False,
            )
        )
    x = color_jitter(torch.cat(views).clamp_(0, 1), draw)  # (B, 3, R, R) in [0, 1]
    return x * 2 - 1


def center_view(source: torch.Tensor, *, resolution: int, device: torch.device) -> torch.Tensor:
    """The un-augmented view (centre square of the short side) -> (1, 3, R, R) in [-1, 1]."""
    return augment([source], AugmentDraw.neutral(1), resolution=resolution, device=device)


@dataclass(frozen=True)
class MaskDraw:
    """Per-sample inpainting masks (PAPER.md section 3) and how each was drawn."""

    masks: torch.Tensor  # (B, 1, R, R) float, 1 = regenerate
    ellipse: torch.Tensor  # (B,) bool: ellipse (True) or rectangle
    size: torch.Tensor  # (B, 2) width, height as fractions of the image, in (0, 1]


def draw_masks(batch_size: int, *, resolution: int, generator: torch.Generator) -> MaskDraw:
    """A rectangle or an ellipse (50/50) per sample, of random size up to the whole image and a
    random centre anywhere in it (the shape may run off the edge and is cut there)."""
    u = torch.rand(batch_size, _UNIFORMS_PER_MASK, generator=generator)  # (B, 5)
    ellipse = u[:, 0] < 0.5
    # width/height in (0, 1]: 1 - U[0, 1) never gives an empty shape.
    size = 1 - u[:, 1:3]  # (B, 2)
    centre = u[:, 3:5]  # (B, 2)
    coords = (torch.arange(resolution, dtype=torch.float32) + 0.5) / resolution  # (R,)
    dx = (coords[None, None, :] - centre[:, 0, None, None]) / (size[:, 0, None, None] / 2)
    dy = (coords[None, :, None] - centre[:, 1, None, None]) / (size[:, 1, None, None] / 2)
    inside_rect = (dx.abs() <= 1) & (dy.abs() <= 1)  # (B, R, R)
    inside_ellipse = dx.square() + dy.square() <= 1
    masks = torch.where(ellipse[:, None, None], inside_ellipse, inside_rect)
    return MaskDraw(masks=masks[:, None].float(), ellipse=ellipse, size=size)


def masked_images(pixels: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The inpainting UNet's conditioning image: pixels * (mask < 0.5) (PAPER.md section 3)."""
    return pixels * (masks < 0.5).to(pixels)


def mask_at_latent_size(masks: torch.Tensor, latent_size: int) -> torch.Tensor:
    """(B, 1, R, R) -> (B, 1, r, r): the mask channel the 9-channel UNet takes (nearest)."""
    return F.interpolate(masks, size=(latent_size, latent_size), mode="nearest")


def view_generator(seed: int, image_index: int, view: int) -> torch.Generator:
    """The generator of one cached view: a pure function of (seed, image, view), so a resumed
    run rebuilds the same cache in any order."""
    mixed = (seed * 1_000_003 + image_index) * 1_009 + view
    return torch.Generator().manual_seed(mixed % (2**63 - 1))


def epoch_order(n: int, *, seed: int, epoch: int) -> list[int]:
    """The data order of one epoch: a permutation that depends on (seed, epoch) only."""
    generator = torch.Generator().manual_seed((seed * 7_919 + epoch * 104_729 + 1) % (2**63 - 1))
    return torch.randperm(n, generator=generator).tolist()
