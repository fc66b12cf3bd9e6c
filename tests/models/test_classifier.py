"""The classifier head and its training loop (models/classifier.py), on synthetic features."""

from __future__ import annotations

import pytest
import torch

from models.classifier import (
    ClassifierHead,
    HeadConfig,
    SeededDropout,
    TrainOptions,
    predict,
    train_head,
)
from tests.models.helpers import DIM, blobs


def fit(train, val, *, seed: int = 0, max_epochs: int = 50, patience: int = 3):
    (x, y), (vx, vy) = train, val
    return train_head(
        train_features=lambda epoch, rows: x[rows],
        train_labels=y,
        val_features=lambda: vx,
        val_labels=vy,
        config=HeadConfig(in_features=DIM, n_classes=int(y.max()) + 1, hidden=32),
        options=TrainOptions(max_epochs=max_epochs, patience=patience, batch_size=8, seed=seed),
    )


def test_dropout_zeroes_about_p_and_keeps_the_expectation() -> None:
    dropout = SeededDropout(0.25, torch.Generator().manual_seed(1))
    x = torch.ones(200, 500)
    y = dropout(x)
    zeroed = float((y == 0).float().mean())
    assert 0.24 < zeroed < 0.26
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.75))
    assert abs(float(y.mean()) - 1.0) < 0.01  # inverted dropout: the mean is unchanged
    dropout.eval()
    assert torch.equal(dropout(x), x)


def test_dropout_masks_follow_their_generator() -> None:
    x = torch.ones(4, 100)
    first = SeededDropout(0.5, torch.Generator().manual_seed(7))(x)
    again = SeededDropout(0.5, torch.Generator().manual_seed(7))(x)
    other = SeededDropout(0.5, torch.Generator().manual_seed(8))(x)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("p", [-0.1, 1.0])
def test_dropout_rejects_a_probability_outside_0_1(p: float) -> None:
    with pytest.raises(ValueError, match="dropout probability"):
        SeededDropout(p)


def test_head_has_fastais_layers() -> None:
    head = ClassifierHead(HeadConfig(in_features=2560, n_classes=9))
    kinds = [type(layer).__name__ for layer in head.layers]
    assert kinds == [
        "BatchNorm1d", "SeededDropout", "Linear", "ReLU", "BatchNorm1d", "SeededDropout", "Linear"
    ]  # fmt: skip
    assert [layer.p for layer in head.layers if isinstance(layer, SeededDropout)] == [0.25, 0.5]
    assert head(torch.randn(4, 2560)).shape == (4, 9)


def test_separable_features_train_to_high_accuracy() -> None:
    result = fit(blobs(80), blobs(10, seed=1))
    test_x, test_y = blobs(30, seed=2)
    probs = predict(result.head, test_x)
    assert probs.shape == (90, 3)
    assert torch.allclose(probs.sum(1), torch.ones(90), atol=1e-5)
    assert float((probs.argmax(1) == test_y).float().mean()) >= 0.95
    assert result.history[-1]["val_accuracy"] >= 0.9
    assert result.history[0]["train_loss"] > result.history[result.best_epoch - 1]["train_loss"]


def test_same_seed_same_head_and_curve() -> None:
    train, val = blobs(20), blobs(10, seed=1)
    first, again, other = fit(train, val, seed=3), fit(train, val, seed=3), fit(train, val, seed=4)
    assert first.history == again.history
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            first.head.state_dict().values(), again.head.state_dict().values(), strict=True
        )
    )
    assert first.history != other.history


def test_early_stopping_restores_the_best_epoch() -> None:
    # noisy labels: validation loss turns up soon and training stops `patience` epochs later
    x, y = blobs(10, spread=3.0)
    vx, vy = blobs(10, spread=3.0, seed=1)
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    result = fit((x, shuffled), (vx, vy))
    epochs = len(result.history)
    assert epochs < 50
    assert result.best_epoch == epochs - 3
    best = min(h["val_loss"] for h in result.history)
    assert result.best_val_loss == best == result.history[result.best_epoch - 1]["val_loss"]
    # the head returned is the best epoch's: its validation loss is the best one
    probs = predict(result.head, vx)
    restored = float(torch.nn.functional.nll_loss(probs.log(), vy))
    assert restored == pytest.approx(best, rel=1e-4)


def test_too_few_training_rows_is_an_error() -> None:
    x, y = blobs(1, classes=1)
    with pytest.raises(ValueError, match="at least 2 training images"):
        fit((x, y), (x, y))
