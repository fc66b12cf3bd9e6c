"""Helpers the model tests share (torch only: tests/gpu runs without conftest)."""

from __future__ import annotations

import torch

DIM = 64


def blobs(n_per_class: int, *, classes: int = 3, spread: float = 0.5, seed: int = 0):
    """Gaussian blobs around well separated class means: (features, labels)."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.eye(classes, DIM) * 4
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    features = means[labels] + spread * torch.randn(len(labels), DIM, generator=generator)
    return features, labels
