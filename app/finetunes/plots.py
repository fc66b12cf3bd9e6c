"""A fine-tune's loss curves (a line per model, raw and smoothed) as PNG or SVG bytes.

Drawn with matplotlib's object API (a Figure with its own Agg canvas), not pyplot: no global
state, so no lock is shared with the experiments' figures.
"""

from __future__ import annotations

import io

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from app.schemas import FIGURE_FORMATS

FORMATS = FIGURE_FORMATS
PLOTS = ("loss",)


def _smoothed(values: list[float], window: int) -> list[float]:
    """A trailing moving average (the first points average what there is)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def loss_figure(curves: dict[str, list[tuple[int, float]]], *, title: str) -> Figure:
    figure = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    drawn = False
    for model_id, points in curves.items():
        if not points:
            continue
        steps = [s for s, _ in points]
        losses = [v for _, v in points]
        window = max(len(points) // 20, 1)
        (line,) = ax.plot(steps, _smoothed(losses, window), label=model_id, linewidth=1.5)
        if window > 1:
            ax.plot(steps, losses, color=line.get_color(), alpha=0.25, linewidth=0.8)
        drawn = True
    if not drawn:
        ax.text(0.5, 0.5, "no training steps yet", ha="center", va="center")
    else:
        ax.legend(fontsize=8, loc="upper right")
    ax.set_xlabel("training step")
    # the diffusion stages score MSE; a scratch fine-tune's autoencoder stage, L1
    ax.set_ylabel("training loss (moving average; raw faint)")
    ax.set_title(title)
    figure.tight_layout()
    return figure


def render(figure: Figure, fmt: str) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format=fmt, dpi=100)
    return buffer.getvalue()
