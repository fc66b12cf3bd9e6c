"""The classifier of a run: fastai's head on a frozen backbone, trained as the paper did
(PAPER.md section 4: cross-entropy, Adam lr 1e-3 wd 0.01, early stopping on validation loss
with patience 3 up to 50 epochs, best checkpoint restored).

The backbone stays frozen and in eval mode (its BatchNorm statistics too, unlike fastai,
which trains them): that is what makes its features cacheable. Features arrive through
callables, so the same loop trains on cached vectors or on images run through the body.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

# (epoch, row indices) -> (B, in_features): one training batch's features
TrainFeatures = Callable[[int, torch.Tensor], torch.Tensor]
# () -> (N, in_features): every validation row's features
EvalFeatures = Callable[[], torch.Tensor]


@dataclass
class HeadConfig:
    in_features: int  # concat pool: 2 x the backbone's channels
    n_classes: int
    hidden: int = 512
    dropout: float = 0.5  # fastai's ps: half of it before the first linear layer


class SeededDropout(nn.Module):
    """Inverted dropout (zero each element with probability p, scale the rest by 1/(1-p)) with
    masks drawn from its own generator. The same distribution as nn.Dropout, but torch's CPU
    dropout draws one Bernoulli per element (1.3 ms for a 32x2560 batch on this project's CPU,
    more than the linear layer after it); a uniform draw compared with p takes a quarter of
    that. Its own generator also keeps a run's masks independent of the global RNG."""

    def __init__(self, p: float, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.generator = generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        uniform = torch.rand(x.shape, generator=self.generator, device=x.device, dtype=x.dtype)
        return x * (uniform >= self.p) * (1 / (1 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


class ClassifierHead(nn.Module):
    """fastai's default head after its concat pool: BN, dropout, linear, ReLU, BN, dropout,
    linear."""

    def __init__(self, config: HeadConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.BatchNorm1d(config.in_features),
            SeededDropout(config.dropout / 2, generator),
            nn.Linear(config.in_features, config.hidden, bias=False),
            nn.ReLU(inplace=True),
            nn.BatchNorm1d(config.hidden),
            SeededDropout(config.dropout, generator),
            nn.Linear(config.hidden, config.n_classes, bias=False),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)  # (B, in_features) -> (B, n_classes)


@dataclass
class TrainOptions:
    max_epochs: int = 50
    patience: int = 3
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 32
    seed: int = 0


@dataclass
class TrainResult:
    head: ClassifierHead
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    best_val_loss: float = math.inf


def _batches(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """fastai's training loader drops the last incomplete batch; a single short batch is kept
    (a tiny training set), but never a batch of one, which BatchNorm cannot train on."""
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()
    return [b for b in batches if len(b) > 1]


def train_head(
    *,
    train_features: TrainFeatures,
    train_labels: torch.Tensor,
    val_features: EvalFeatures,
    val_labels: torch.Tensor,
    config: HeadConfig,
    options: TrainOptions,
    on_epoch: Callable[[int, list[dict[str, Any]]], None] | None = None,
    device: str | torch.device = "cpu",
) -> TrainResult:
    """Train a head on `device` with early stopping on validation loss; returns it with the
    best epoch's weights restored, and the per-epoch curve. Features may arrive on any device;
    they are moved to the head's."""
    # 1. seeded init (on the CPU, so a seed gives the same head everywhere), order and dropout
    device = torch.device(device)
    torch.manual_seed(options.seed)
    order_generator = torch.Generator().manual_seed(options.seed)
    dropout_generator = torch.Generator(device=device).manual_seed(options.seed)
    head = ClassifierHead(config, generator=dropout_generator).to(device)
    train_labels, val_labels = train_labels.to(device), val_labels.to(device)
    # fastai's Adam: decoupled weight decay (true_wd), betas (0.9, 0.99), eps 1e-5
    optimizer = torch.optim.AdamW(
        head.parameters(),
        lr=options.learning_rate,
        betas=(0.9, 0.99),
        eps=1e-5,
        weight_decay=options.weight_decay,
        fused=True,  # one fused kernel per step (CPU and CUDA): the head's steps are tiny
    )
    result = TrainResult(head=head)
    best_state = copy.deepcopy(head.state_dict())
    waited = 0
    n = len(train_labels)
    if n < 2:
        raise ValueError(f"a run needs at least 2 training images; it has {n}")

    for epoch in range(1, options.max_epochs + 1):
        # 2. one pass over the training rows
        head.train()
        total, seen = torch.zeros((), device=device), 0  # summed on the device: no sync a step
        for rows in _batches(torch.randperm(n, generator=order_generator), options.batch_size):
            features = train_features(epoch, rows).to(device)  # (B, in_features)
            loss = F.cross_entropy(head(features), train_labels[rows.to(device)])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach() * len(rows)
            seen += len(rows)

        # 3. validation loss and accuracy
        head.eval()
        with torch.inference_mode():
            logits = head(val_features().to(device))
            val_loss = float(F.cross_entropy(logits, val_labels))
            val_accuracy = float((logits.argmax(1) == val_labels).float().mean())
        result.history.append(
            {
                "epoch": epoch,
                "train_loss": float(total) / max(seen, 1),
                "val_loss": val_loss,
                "val_accuracy": val_accuracy,
            }
        )

        # 4. early stopping (fastai's EarlyStoppingCallback and SaveModelCallback)
        if val_loss < result.best_val_loss:
            result.best_val_loss, result.best_epoch, waited = val_loss, epoch, 0
            best_state = copy.deepcopy(head.state_dict())
        else:
            waited += 1
        if on_epoch is not None:
            on_epoch(epoch, result.history)
        if waited >= options.patience:
            break

    head.load_state_dict(best_state)
    head.eval()
    return result


def predict(head: ClassifierHead, features: torch.Tensor) -> torch.Tensor:
    """(N, in_features) -> (N, n_classes) probabilities, on the CPU."""
    head.eval()
    device = next(head.parameters()).device
    with torch.inference_mode():
        return F.softmax(head(features.to(device)), dim=1).cpu()
