"""Which torch device and dtype a worker computes on: no diffusers here, so a worker that only
trains classifiers never imports it."""

from __future__ import annotations

import torch


def resolve_device(setting: str) -> torch.device:
    """`auto` picks CUDA when present, else the CPU."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def dtype_for(device: torch.device) -> torch.dtype:
    """fp16 on CUDA (PAPER.md section 2), fp32 on the CPU."""
    return torch.float16 if device.type == "cuda" else torch.float32
