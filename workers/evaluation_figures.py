"""An evaluation's figures (issue 23), drawn by the worker (it holds the thumbnails and the
features; the API only serves the stored bytes): contact sheets (condition x skin type: an
overview, and one per condition), the closest pairs, ITA by requested type, a 2-D PCA of the
features and the PRDC bars per group. matplotlib's object API (a Figure with its own Agg
canvas): no pyplot state.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from app.fitzpatrick import FITZPATRICK_GROUPS
from app.schemas.evaluations import CONDITION_SHEET_PREFIX
from app.vocabulary import slugify

THUMBS_PER_SIDE = 4
MAX_SHEET_ROWS = 12  # the overview's; a condition's own sheet has all its types
MAX_PAIRS = 8
CELL = 64  # a thumbnail's pixels in a contact sheet
GAP = 4  # white pixels between thumbnails
CELL_INCHES = 0.9  # CELL + GAP drawn this wide (at 100 dpi: 64 px thumbnails shown at ~85 px)


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


def condition_sheet_names(conditions: Iterable[str]) -> dict[str, str]:
    """Each condition's own contact sheet's figure name: contact-sheet-<slug of the condition>
    (a URL path segment and a file name), -2, -3 ... after a slug two conditions share."""
    names: dict[str, str] = {}
    for condition in conditions:
        stem = CONDITION_SHEET_PREFIX + (slugify(condition) or "condition")
        name, n = stem, 1
        while name in names.values():
            n += 1
            name = f"{stem}-{n}"
        names[condition] = name
    return names


def _first_thumbs(
    items: list[tuple[str, int | None, Image.Image]], condition: str | None
) -> tuple[dict[tuple[str, int | None], list[Image.Image]], dict[str, list[Image.Image]]]:
    """The first THUMBS_PER_SIDE images of each (condition, type), and of each condition."""
    by_key: dict[tuple[str, int | None], list[Image.Image]] = {}
    by_condition: dict[str, list[Image.Image]] = {}
    for c, t, image in items:
        if condition is not None and c != condition:
            continue
        for cell in (by_key.setdefault((c, t), []), by_condition.setdefault(c, [])):
            if len(cell) < THUMBS_PER_SIDE:
                cell.append(image)
    return by_key, by_condition


def _sheet_raster(rows: list[tuple[list[Image.Image], list[Image.Image]]]) -> np.ndarray:
    """The rows' thumbnails pasted into one RGB array, white between them: THUMBS_PER_SIDE
    synthetic cells, an empty one, THUMBS_PER_SIDE real cells; (height, width, 3) uint8."""
    step = CELL + GAP
    columns = 2 * THUMBS_PER_SIDE + 1
    raster = np.full((max(len(rows), 1) * step + GAP, columns * step + GAP, 3), 255, np.uint8)
    for row, (fakes, reals) in enumerate(rows):
        placed = [*enumerate(fakes), *enumerate(reals, start=THUMBS_PER_SIDE + 1)]
        for column, image in placed:
            top, left = GAP + row * step, GAP + column * step
            pixels = image.convert("RGB").resize((CELL, CELL), Image.Resampling.BILINEAR)
            raster[top : top + CELL, left : left + CELL] = np.asarray(pixels)
    return raster


def contact_sheet(
    synthetic: list[tuple[str, int | None, Image.Image]],
    real: list[tuple[str, int | None, Image.Image]],
    *,
    condition: str | None = None,
) -> Figure:
    """A row per (condition, requested type), of one `condition` or the first MAX_SHEET_ROWS
    of all: synthetic thumbnails, then real ones of that condition and type (of the condition,
    said in the row's label, when the reference has none of the type). The thumbnails are
    pasted into one raster on one axes: cheap to draw for each of twenty conditions, and the
    SVG holds one image, not a hundred."""
    fakes, _ = _first_thumbs(synthetic, condition)
    reals, reals_any_type = _first_thumbs(real, condition)
    keys = sorted(fakes, key=lambda k: (k[0], k[1] or 0))
    shown = keys if condition is not None else keys[:MAX_SHEET_ROWS]
    rows, labels = [], []
    for key in shown:
        beside = reals.get(key) or reals_any_type.get(key[0], [])
        rows.append((fakes[key], beside))
        label = _tone(key[1]) if condition is not None else f"{key[0]}, {_tone(key[1])}"
        if key not in reals:
            label += "\n(real: any type)" if beside else "\n(no real image)"
        labels.append(label)
    raster = _sheet_raster(rows)

    # the raster at CELL_INCHES a cell, the row labels to its left, the title above (inches)
    step = CELL + GAP
    longest = max((len(line) for label in labels for line in label.split("\n")), default=8)
    left, right, bottom, top = 0.3 + 0.06 * longest, 0.2, 0.1, 0.8
    image_w, image_h = raster.shape[1] / step * CELL_INCHES, raster.shape[0] / step * CELL_INCHES
    width, height = left + image_w + right, bottom + image_h + top
    figure = _figure(width, height)
    ax = figure.add_axes((left / width, bottom / height, image_w / width, image_h / height))
    ax.imshow(raster, interpolation="bilinear")
    ax.set_yticks([GAP + row * step + CELL / 2 for row in range(len(shown))], labels, fontsize=8)
    middle = (THUMBS_PER_SIDE * step + GAP) / 2
    ax.set_xticks([middle, raster.shape[1] - middle], ["synthetic", "real"], fontsize=9)
    ax.xaxis.set_ticks_position("top")
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if not shown:
        ax.text(raster.shape[1] / 2, raster.shape[0] / 2, "no synthetic images", ha="center",
                va="center")  # fmt: skip
    if condition is not None:
        title = f"{condition}: synthetic beside real, by requested skin type"
    else:
        title = "Synthetic beside real, per condition and skin type"
        if len(keys) > len(shown):
            title += f"\n(the first {len(shown)} of {len(keys)} rows; each condition has a sheet)"
    figure.suptitle(title, fontsize=10, y=1 - 0.1 / height, va="top")
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
