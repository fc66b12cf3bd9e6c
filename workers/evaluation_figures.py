"""An evaluation's figures (issue 23), drawn by the worker (it holds the thumbnails and the
features; the API only serves the stored bytes): a contact sheet per condition x skin type,
the closest pairs, ITA by requested type, a 2-D PCA of the features and the PRDC bars per
group. matplotlib's object API (a Figure with its own Agg canvas): no pyplot state.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from app.fitzpatrick import FITZPATRICK_GROUPS

THUMBS_PER_SIDE = 4
MAX_SHEET_ROWS = 12
MAX_PAIRS = 8


def render(figure: Figure) -> dict[str, bytes]:
    """The figure as PNG and SVG bytes."""
    out = {}
    for fmt in ("png", "svg"):
        buffer = io.BytesIO()
        figure.savefig(buffer, format=fmt, dpi=100)
        out[fmt] = buffer.getvalue()
    return out


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def _tone(value: int | None) -> str:
    return f"type {value}" if value is not None else "no type"


def contact_sheet(
    synthetic: list[tuple[str, int | None, Image.Image]],
    real: list[tuple[str, int | None, Image.Image]],
) -> Figure:
    """A row per (condition, requested type): synthetic thumbnails, then real ones of that
    condition and type (of the condition when the reference has none of the type)."""
    keys = sorted({(c, t) for c, t, _ in synthetic}, key=lambda k: (k[0], k[1] or 0))
    keys = keys[:MAX_SHEET_ROWS]
    columns = 2 * THUMBS_PER_SIDE + 1
    figure = _figure(columns * 1.1, max(len(keys), 1) * 1.2 + 0.6)
    axes = figure.subplots(max(len(keys), 1), columns, squeeze=False)
    for row, (condition, tone) in enumerate(keys):
        fakes = [im for c, t, im in synthetic if (c, t) == (condition, tone)][:THUMBS_PER_SIDE]
        reals = [im for c, t, im in real if (c, t) == (condition, tone)]
        reals = (reals or [im for c, _t, im in real if c == condition])[:THUMBS_PER_SIDE]
        cells: list[Image.Image | None] = [*fakes, *[None] * (THUMBS_PER_SIDE - len(fakes)), None]
        cells += [*reals, *[None] * (THUMBS_PER_SIDE - len(reals))]
        for col, image in enumerate(cells):
            ax = axes[row][col]
            ax.axis("off")
            if image is not None:
                ax.imshow(np.asarray(image))
        axes[row][0].set_title(f"{condition}, {_tone(tone)}", fontsize=7, loc="left")
    figure.suptitle("Synthetic (left) beside real (right), per condition and skin type")
    return figure


def closest_pairs(pairs: list[tuple[Image.Image, Image.Image, str]]) -> Figure:
    """The most similar (synthetic, nearest real) pairs side by side, most similar first."""
    pairs = pairs[:MAX_PAIRS]
    rows = max((len(pairs) + 1) // 2, 1)
    figure = _figure(8, rows * 2.1 + 0.5)
    axes = figure.subplots(rows, 4, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (fake, real, label) in enumerate(pairs):
        row, col = divmod(i, 2)
        axes[row][2 * col].imshow(np.asarray(fake))
        axes[row][2 * col].set_title(label, fontsize=7, loc="left")
        axes[row][2 * col + 1].imshow(np.asarray(real))
    figure.suptitle("Closest pairs: synthetic (left) and its nearest real training image")
    return figure


def ita_boxes(synthetic: dict[int, list[float]], real: dict[int, list[float]]) -> Figure:
    """ITA per requested Fitzpatrick type: synthetic and real boxes side by side."""
    figure = _figure(8, 4.5)
    ax = figure.add_subplot()
    for offset, values, colour, name in ((-0.18, synthetic, "tab:orange", "synthetic"),
                                         (0.18, real, "tab:blue", "real")):  # fmt: skip
        types = [t for t in range(1, 7) if values.get(t)]
        if types:
            parts = ax.boxplot([values[t] for t in types], positions=[t + offset for t in types],
                               widths=0.3, patch_artist=True, manage_ticks=False)  # fmt: skip
            for box in parts["boxes"]:
                box.set_facecolor(colour)
            ax.plot([], [], color=colour, linewidth=8, label=name)
    for lower in (40, 23, 12, 0, -25):
        ax.axhline(lower, color="grey", linewidth=0.6, linestyle=":")
    ax.set_xticks(range(1, 7))
    ax.set_xlabel("requested (synthetic) or labelled (real) Fitzpatrick type")
    ax.set_ylabel("ITA (degrees); dotted: Groh et al. 2021 bands")
    ax.legend(fontsize=8)
    ax.set_title("Skin-tone fidelity: ITA of skin pixels")
    figure.tight_layout()
    return figure


def pca_scatter(real: np.ndarray, fake: np.ndarray, ratios: list[float], space: str) -> Figure:
    figure = _figure(6, 5)
    ax = figure.add_subplot()
    if len(real):
        ax.scatter(real[:, 0], real[:, 1], s=8, alpha=0.6, label=f"real ({len(real)})")
    if len(fake):
        ax.scatter(fake[:, 0], fake[:, 1], s=8, alpha=0.6, label=f"synthetic ({len(fake)})")
    ax.set_xlabel(f"PC1 ({ratios[0]:.0%})" if ratios else "PC1")
    ax.set_ylabel(f"PC2 ({ratios[1]:.0%})" if len(ratios) > 1 else "PC2")
    ax.set_title(f"Features ({space}): first two principal components")
    ax.legend(fontsize=8)
    figure.tight_layout()
    return figure


def prdc_bars(fidelity: dict[str, Any], space: str) -> Figure:
    """Precision, recall, density, coverage overall and per Fitzpatrick group."""
    scopes = [("overall", fidelity["overall"])] + [
        (g, fidelity["by_skin_tone"][g])
        for g in FITZPATRICK_GROUPS
        if g in fidelity["by_skin_tone"]
    ]
    names = ("precision", "recall", "density", "coverage")
    figure = _figure(8, 4.5)
    ax = figure.add_subplot()
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [scope.get(f"{name}_{space}") for _label, scope in scopes]
        xs = [j + (i - 1.5) * width for j in range(len(scopes))]
        ax.bar(xs, [v if v is not None else 0 for v in values], width=width, label=name)
    ax.set_xticks(range(len(scopes)), [f"{label}\n(n={s['n_synthetic']})" for label, s in scopes])
    ax.set_ylabel(f"value ({space} features, k=5)")
    ax.set_title("Precision / recall / density / coverage by Fitzpatrick group")
    ax.legend(fontsize=8)
    figure.tight_layout()
    return figure


def draw_all(drawers: dict[str, Callable[[], Figure]]) -> dict[str, dict[str, bytes]]:
    """name -> {png, svg} bytes for every drawer."""
    return {name: render(draw()) for name, draw in drawers.items()}
