"""Image preprocessing for the classifier: fastai's pipeline of the paper in plain torch + PIL.

Eval: `Resize(224)` in crop mode. Training views: `aug_transforms()` defaults, seeded per image and
view so augmented features can be cached. No torchvision (its PyPI build breaks beside our torch).
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

# fastai aug_transforms() defaults (fastai/vision/augment.py).
FLIP_P = 0.5
AFFINE_P = 0.75  # p_affine: rotation, zoom and each warp axis are drawn independently with it
MAX_ROTATE_DEGREES = 10.0
MAX_ZOOM = 1.1
MAX_WARP = 0.2
LIGHTING_P = 0.75  # p_lighting: brightness and contrast are drawn independently with it
MAX_LIGHTING = 0.2
# fastai clamps before its logit so that 0 and 1 stay finite.
LOGIT_EPS = 1e-7
# Uniforms drawn per image, in this order: flip, rotate (apply, angle), zoom (apply, scale,
# centre x, centre y), warp (apply x, x, apply y, y), brightness (apply, value), contrast (apply,
# value). Drawing one (B, 15) block keeps image i's parameters independent of the batch size.
_UNIFORMS_PER_IMAGE = 15


def eval_transform_id(*, size: int = 224) -> str:
    """The feature-cache key of the un-augmented eval view at this size."""
    return f"resize-crop-{size}"


# The id of the evaluation transform at 224 px (a test seam: tests check cache keys by it).
EVAL_TRANSFORM_ID = eval_transform_id(size=224)


def decode_image(data: bytes) -> Image.Image:
    """Bytes of any PIL-readable image -> RGB image, upright (EXIF orientation applied)."""
    try:
        image: Image.Image = Image.open(io.BytesIO(data))
        image.load()
    # PIL raises all of these on bad or hostile data (the bomb: a header claiming huge pixels).
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"cannot decode image ({len(data)} bytes): {error}") from error
    # Phone photos are stored sideways with an Orientation tag; the model must see them upright.
    image = ImageOps.exif_transpose(image)
    return image.convert("RGB")


def resize_crop(image: Image.Image, *, size: int = 224) -> torch.Tensor:
    """Centre square of the short side, resized to size (bilinear) -> (3, size, size) in [0, 1]."""
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    if image.mode != "RGB":
        image = image.convert("RGB")
    # fastai Resize(method='crop'): crop the largest centred square, then resize it, so pixels
    # outside the square never bleed into the border. PIL's bilinear widens its filter when it
    # shrinks (antialiasing). fastai picks a random crop position on the training set; we always
    # centre and leave the randomness to `augment`.
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    resized = square.resize((size, size), Image.Resampling.BILINEAR)
    array = np.asarray(resized, dtype=np.uint8)  # (size, size, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)  # (3, S, S)


@dataclass(frozen=True)
class AugmentParams:
    """Per-image augmentation parameters; the neutral value of each means "not applied"."""

    flip: torch.Tensor  # (B,) bool: mirror left-right
    rotate_degrees: torch.Tensor  # (B,) float, 0 = none
    zoom: torch.Tensor  # (B,) float >= 1, 1 = none
    zoom_center: torch.Tensor  # (B, 2) float in [0, 1]: where the zoomed window sits (x, y)
    warp: torch.Tensor  # (B, 2) float in [-MAX_WARP, MAX_WARP], 0 = none
    brightness: torch.Tensor  # (B,) float in (0, 1), 0.5 = none
    contrast: torch.Tensor  # (B,) float > 0, 1 = none

    @classmethod
    def neutral(cls, batch_size: int) -> AugmentParams:
        """Parameters that leave every image unchanged (tests start from these)."""
        return cls(
            flip=torch.zeros(batch_size, dtype=torch.bool),
            rotate_degrees=torch.zeros(batch_size),
            zoom=torch.ones(batch_size),
            zoom_center=torch.full((batch_size, 2), 0.5),
            warp=torch.zeros(batch_size, 2),
            brightness=torch.full((batch_size,), 0.5),
            contrast=torch.ones(batch_size),
        )


def draw_augment_params(batch_size: int, *, generator: torch.Generator) -> AugmentParams:
    """fastai aug_transforms() defaults, drawn per image from `generator`."""
    u = torch.rand(
        batch_size, _UNIFORMS_PER_IMAGE, generator=generator, device=generator.device
    ).cpu()  # (B, 15) in [0, 1)

    def uniform(column: int, low: float, high: float) -> torch.Tensor:
        return low + (high - low) * u[:, column]

    def masked(apply_column: int, p: float, value: torch.Tensor, neutral: float) -> torch.Tensor:
        return torch.where(u[:, apply_column] < p, value, torch.full_like(value, neutral))

    max_log_contrast = -math.log(1 - MAX_LIGHTING)
    return AugmentParams(
        flip=u[:, 0] < FLIP_P,
        rotate_degrees=masked(1, AFFINE_P, uniform(2, -MAX_ROTATE_DEGREES, MAX_ROTATE_DEGREES), 0),
        zoom=masked(3, AFFINE_P, uniform(4, 1.0, MAX_ZOOM), 1.0),
        zoom_center=u[:, 5:7].clone(),
        warp=torch.stack(
            [
                masked(7, AFFINE_P, uniform(8, -MAX_WARP, MAX_WARP), 0.0),
                masked(9, AFFINE_P, uniform(10, -MAX_WARP, MAX_WARP), 0.0),
            ],
            dim=1,
        ),
        # Brightness adds logit(b) to the pixel logits, b ~ U(0.4, 0.6); contrast multiplies the
        # logits by exp(U(log 0.8, -log 0.8)) (fastai's _BrightnessLogit and _ContrastLogit).
        brightness=masked(
            11, LIGHTING_P, uniform(12, 0.5 * (1 - MAX_LIGHTING), 0.5 * (1 + MAX_LIGHTING)), 0.5
        ),
        contrast=masked(
            13, LIGHTING_P, uniform(14, -max_log_contrast, max_log_contrast).exp(), 1.0
        ),
    )


def _warp_homography(warp: torch.Tensor) -> torch.Tensor:
    """(B, 2) warp magnitudes -> (B, 3, 3) perspective map from output to input coordinates."""
    # fastai's Warp moves the corners of the [-1, 1] square in a keystone pattern and samples
    # through the homography that takes the moved corners back to the original ones.
    wx, wy = warp[:, 0].double(), warp[:, 1].double()
    corners = torch.tensor(
        [[-1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [1.0, 1.0]], dtype=torch.float64
    )
    corners = corners.expand(warp.shape[0], 4, 2)  # (B, 4, 2) (x, y)
    moved = torch.stack(
        [
            torch.stack([-1 - wy, -1 - wx], dim=1),
            torch.stack([-1 + wy, 1 + wx], dim=1),
            torch.stack([1 + wy, -1 + wx], dim=1),
            torch.stack([1 - wy, 1 - wx], dim=1),
        ],
        dim=1,
    )  # (B, 4, 2)
    # Solve H @ [moved, 1] ~ [corner, 1] for the 8 unknowns of H (h33 = 1): two rows per corner.
    zeros, ones = torch.zeros_like(wx), torch.ones_like(wx)
    rows, targets = [], []
    for i in range(4):
        mx, my = moved[:, i, 0], moved[:, i, 1]
        cx, cy = corners[:, i, 0], corners[:, i, 1]
        rows.append(torch.stack([mx, my, ones, zeros, zeros, zeros, -cx * mx, -cx * my], dim=1))
        rows.append(torch.stack([zeros, zeros, zeros, mx, my, ones, -cy * mx, -cy * my], dim=1))
        targets += [cx, cy]
    a = torch.stack(rows, dim=1)  # (B, 8, 8)
    b = torch.stack(targets, dim=1)  # (B, 8)
    h = torch.linalg.solve(a, b)  # (B, 8)
    return torch.cat([h, ones[:, None]], dim=1).view(-1, 3, 3).float()  # (B, 3, 3)


def _sampling_map(params: AugmentParams, *, height: int, width: int) -> torch.Tensor:
    """(B, 3, 3) map from output to input coordinates in [-1, 1]: warp after flip/rotate/zoom."""
    batch_size = params.flip.shape[0]
    theta = torch.deg2rad(params.rotate_degrees)
    cos, sin = theta.cos(), theta.sin()
    eye = torch.eye(3).repeat(batch_size, 1, 1)  # (B, 3, 3)
    flip = eye.clone()
    flip[:, 0, 0] = 1 - 2 * params.flip.float()
    rotate = eye.clone()
    rotate[:, 0, 0], rotate[:, 0, 1], rotate[:, 1, 0], rotate[:, 1, 1] = cos, sin, -sin, cos
    # fastai's zoom: scale the sampling grid by 1/zoom and slide the window anywhere inside.
    scale = 1 / params.zoom
    zoom = eye.clone()
    zoom[:, 0, 0], zoom[:, 1, 1] = scale, scale
    zoom[:, 0, 2] = (1 - scale) * (2 * params.zoom_center[:, 0] - 1)
    zoom[:, 1, 2] = (1 - scale) * (2 * params.zoom_center[:, 1] - 1)
    affine = flip @ rotate @ zoom  # (B, 3, 3)
    # Rotation in normalised coordinates would shear a non-square image: correct for aspect.
    affine[:, 0, 1] *= height / width
    affine[:, 1, 0] *= width / height
    return _warp_homography(params.warp) @ affine


def apply_augment(batch: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 3, H, W) in [0, 1] with the given per-image parameters."""
    _check_batch(batch)
    batch_size, _, height, width = batch.shape
    if params.flip.shape[0] != batch_size:
        raise ValueError(f"params are for {params.flip.shape[0]} images, batch has {batch_size}")
    x = batch.float()
    # 1. geometry: flip, rotation, zoom and warp as one resampling (one interpolation, like
    # fastai's AffineCoordTfm); reflection padding fills what the rotation uncovers.
    geometric = (
        params.flip
        | (params.rotate_degrees != 0)
        | (params.zoom != 1)
        | (params.warp != 0).any(dim=1)
    ).to(x.device)
    if bool(geometric.any()):
        sampling = _sampling_map(params, height=height, width=width).to(x.device)  # (B, 3, 3)
        ys = torch.linspace(-1, 1, height, device=x.device)
        xs = torch.linspace(-1, 1, width, device=x.device)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        base = torch.stack([grid_x, grid_y, torch.ones_like(grid_x)], dim=-1)  # (H, W, 3)
        coords = torch.einsum("bij,hwj->bhwi", sampling, base)  # (B, H, W, 3) homogeneous
        grid = coords[..., :2] / coords[..., 2:]  # (B, H, W, 2) (x, y) in [-1, 1]
        # align_corners=True as in aug_transforms, so the identity grid hits pixel centres.
        warped = F.grid_sample(
            x, grid, mode="bilinear", padding_mode="reflection", align_corners=True
        )
        # Untouched images skip resampling and stay bit-identical.
        x = torch.where(geometric[:, None, None, None], warped, x)
    # 2. lighting in logit space: sigmoid((logit(x) + logit(brightness)) * contrast).
    lighting = ((params.brightness != 0.5) | (params.contrast != 1)).to(x.device)
    if bool(lighting.any()):
        brightness = params.brightness.to(x.device)[:, None, None, None]
        contrast = params.contrast.to(x.device)[:, None, None, None]
        logits = torch.logit(x.clamp(LOGIT_EPS, 1 - LOGIT_EPS))
        lit = torch.sigmoid((logits + torch.logit(brightness)) * contrast)
        x = torch.where(lighting[:, None, None, None], lit, x)
    return x.clamp_(0.0, 1.0)


# What `augment` does to each image, all drawn from the one generator (fastai aug_transforms()):
# flip p=0.5; rotation U(-10, 10) degrees, zoom U(1, 1.1) with a random window, and a perspective
# warp U(-0.2, 0.2) per axis, each p=0.75, resampled once (bilinear, reflection padding); then
# brightness b ~ U(0.4, 0.6) and contrast c ~ exp(U(log 0.8, -log 0.8)), each p=0.75, applied as
# sigmoid((logit(x) + logit(b)) * c). Differences from fastai: its own RNG streams (Python's
# `random` and torch's global one), so the same seed gives other draws, and the training-set
# random crop position of Resize is not reproduced (`resize_crop` always centres).
def augment(batch: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
    """fastai aug_transforms() defaults on a (B, 3, S, S) batch in [0, 1], seeded by `generator`."""
    return apply_augment(batch, draw_augment_params(batch.shape[0], generator=generator))


def augmented_view_id(view: int, *, size: int = 224) -> str:
    """The feature-cache key of the view-th augmented copy of an image."""
    # Change this prefix whenever `augment` changes: cached features would no longer match.
    if view < 0:
        raise ValueError(f"view must be >= 0, got {view}")
    return f"fastai-aug-{size}-v{view}"


def view_seed(*, image_sha256: str, view: int) -> int:
    """The generator seed of one augmented view: a 63-bit hash of (image sha256, view)."""
    if len(image_sha256) != 64 or any(c not in "0123456789abcdef" for c in image_sha256.lower()):
        raise ValueError(f"image_sha256 must be 64 hex digits, got {image_sha256!r}")
    if view < 0:
        raise ValueError(f"view must be >= 0, got {view}")
    digest = hashlib.sha256(f"{image_sha256.lower()}:{view}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # manual_seed takes any int below 2**64


def augmented_view(pixels: torch.Tensor, *, image_sha256: str, view: int) -> torch.Tensor:
    """(3, S, S) in [0, 1] -> its view-th augmented copy: same image and view, same pixels."""
    if pixels.ndim != 3:
        raise ValueError(f"pixels must be (3, S, S), got shape {tuple(pixels.shape)}")
    generator = torch.Generator(device="cpu")
    generator.manual_seed(view_seed(image_sha256=image_sha256, view=view))
    return augment(pixels[None], generator=generator)[0]


def augmented_views(pixels: torch.Tensor, *, image_sha256s: list[str], view: int) -> torch.Tensor:
    """(B, 3, S, S) -> the view-th augmented copy of each image in one batched pass: each
    image's parameters drawn as `augmented_view` draws them (pixels agree to float rounding)."""
    if pixels.ndim != 4 or len(image_sha256s) != pixels.shape[0]:
        raise ValueError("pixels must be (B, 3, S, S) with one sha256 per image")
    drawn = []
    for sha in image_sha256s:
        generator = torch.Generator(device="cpu")
        generator.manual_seed(view_seed(image_sha256=sha, view=view))
        drawn.append(draw_augment_params(1, generator=generator))
    params = AugmentParams(
        **{
            name: torch.cat([getattr(p, name) for p in drawn])
            for name in AugmentParams.__dataclass_fields__
        }
    )
    return apply_augment(pixels, params)


def _check_batch(batch: torch.Tensor) -> None:
    """Raise an actionable ValueError unless batch is (B, 3, H, W) floating point."""
    if batch.ndim != 4 or batch.shape[1] != 3:
        raise ValueError(f"expected a (B, 3, H, W) batch, got shape {tuple(batch.shape)}")
    if not batch.is_floating_point():
        raise ValueError(f"expected float pixels in [0, 1], got {batch.dtype}")
