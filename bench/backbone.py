"""Classifier backbone speed: EfficientNet-Lite0 features as the classifier computes them
(BatchNorm folded into each convolution, `models.efficientnet_lite.fold_for_inference`) against
the baseline measured in the same run, the strictly loaded network with its BatchNorm layers.
Both in eval mode, channels_last, under inference mode, on the same random pixels; prints
images/s for each batch size and the ratio, and checks that both compute the same features.

    python -m bench.backbone                     # batch sizes 8 and 32, 8 s each
    python -m bench.backbone --batch 1,8,64 --seconds 4 --device cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.efficientnet_lite import INPUT_SIZE, fold_for_inference, load_efficientnet_lite0


def images_per_second(
    net: nn.Module, pixels: torch.Tensor, *, seconds: float, device: torch.device
) -> float:
    """forward_features on one batch, repeated for `seconds` after a warm-up pass."""
    forward = net.forward_features  # type: ignore[operator]
    with torch.inference_mode():
        forward(pixels)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start, images = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            forward(pixels)
            images += len(pixels)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", default="8,32", help="Batch sizes, e.g. 1,8,32.")
    parser.add_argument("--seconds", type=float, default=8.0, help="Per arm and batch size.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None, help="Also write the numbers here.")
    args = parser.parse_args()
    device = torch.device(args.device)

    loaded = load_efficientnet_lite0().to(device, memory_format=torch.channels_last)
    folded = fold_for_inference(load_efficientnet_lite0()).to(
        device, memory_format=torch.channels_last
    )
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or 'CPU'}, {torch.get_num_threads()} threads"
    )
    print(f"device: {name}; EfficientNet-Lite0 features at {INPUT_SIZE} px, fp32")
    rows: list[dict[str, Any]] = []
    generator = torch.Generator().manual_seed(0)
    for batch in (int(value) for value in args.batch.split(",")):
        pixels = torch.randn(batch, 3, INPUT_SIZE, INPUT_SIZE, generator=generator)
        pixels = pixels.to(device).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            difference = float(
                (folded.forward_features(pixels) - loaded.forward_features(pixels)).abs().max()
            )
        baseline = images_per_second(loaded, pixels, seconds=args.seconds, device=device)
        candidate = images_per_second(folded, pixels, seconds=args.seconds, device=device)
        rows.append(
            {"batch": batch, "baseline_img_s": baseline, "folded_img_s": candidate,
             "ratio": candidate / baseline, "max_abs_difference": difference}
        )  # fmt: skip
        print(
            f"batch {batch:>3}: with BatchNorm layers {baseline:7.1f} img/s, folded "
            f"{candidate:7.1f} img/s, ratio {candidate / baseline:.2f}x "
            f"(features differ by at most {difference:.1e})",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps({"device": name, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
