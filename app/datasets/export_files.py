"""The release layout of an export (PAPER.md section 5): its parameters as stored, its keys,
and what its files hold: WebDataset samples (`__key__`, the image, its provenance JSON) and the
dataset card (Croissant: export_croissant.py). Pure: no store, no session, no torch.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from app.datasets.manifest import ManifestFilter
from app.db.tables import Dataset, Image
from app.fitzpatrick import UNKNOWN_GROUP, fitzpatrick_group

PAPER = (
    "Sagers et al., Augmenting medical image classifiers with synthetic data from latent "
    "diffusion models (arXiv 2308.12453)"
)
FILTER_NAMES = ("condition", "skin_tone", "strategy", "source")
# The magic bytes of the formats an ingest accepts, and WebDataset's extension for each.
_FORMATS = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpg"),
    (b"BM", "bmp"),
    (b"II*\x00", "tif"),
    (b"MM\x00*", "tif"),
)
UNSAFE_IN_NAMES = re.compile(r"[^A-Za-z0-9_-]+")  # replaced in sample keys and dataset names


@dataclass(frozen=True)
class ExportParams:
    """An export job's parameters, as stored in job.params."""

    shard_size: int
    shuffle: bool
    seed: int | None
    filters: ManifestFilter
    as_of: datetime

    @classmethod
    def from_job(cls, params: dict[str, Any]) -> ExportParams:
        return cls(
            shard_size=int(params["shard_size"]),
            shuffle=bool(params["shuffle"]),
            seed=params.get("seed"),
            filters=ManifestFilter(**{k: params.get(k) for k in FILTER_NAMES}),
            as_of=datetime.fromisoformat(params["as_of"]),
        )


def export_prefix(*, dataset_id: str, job_id: str) -> str:
    """The folder of an export's files in the store."""
    return f"exports/{dataset_id}/{job_id}/"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.tar"


def image_extension(data: bytes, storage_key: str) -> str:
    """WebDataset's extension for the stored bytes: a real JPEG stays a .jpg."""
    for magic, extension in _FORMATS:
        if data.startswith(magic):
            return extension
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    suffix = storage_key.rsplit(".", 1)[-1].lower() if "." in storage_key else ""
    return suffix if suffix.isalnum() else "bin"


def sample_key(image: Image) -> str:
    """The sample's `__key__`: `{condition}_{strategy or source}_{image_id}`, without dots
    (WebDataset splits a member name on its first dot)."""
    parts = (image.condition, image.strategy or image.source, image.id)
    return "_".join(UNSAFE_IN_NAMES.sub("-", p).strip("-") or "x" for p in parts)


def skin_tone_group(image: Image) -> str | None:
    """The sample's Fitzpatrick group (app.fitzpatrick's rule); None when unknown."""
    group = fitzpatrick_group(skin_tone=image.skin_tone, skin_tone_group=image.skin_tone_group)
    return None if group == UNKNOWN_GROUP else group


def sample_metadata(image: Image, *, extension: str) -> dict[str, Any]:
    """The provenance JSON of one sample (the paper's release fields where they apply)."""
    labels = dict(image.labels or {})
    return {
        "image_id": image.id,
        "dataset_id": image.dataset_id,
        "name": image.original_name or f"{image.id}.{extension}",
        "md5hash": labels.get("md5hash"),
        "label": image.condition,
        "condition": image.condition,
        "skin_tone": image.skin_tone,
        "skin_tone_group": skin_tone_group(image),
        "source": image.source,
        "method": image.strategy or image.source,
        "strategy": image.strategy,
        "model": image.model_id,
        "seed": image.seed,
        "steps": image.steps,
        "guidance_scale": image.guidance_scale,
        "prompt": image.prompt,
        "negative_prompt": image.negative_prompt,
        "parent_image_id": image.parent_image_id,
        "width": image.width,
        "height": image.height,
        "sha256": image.sha256,
        "size_bytes": image.size_bytes,
        "job_id": image.job_id,
        "split": image.split,
        "labels": labels or None,
        "created_at": image.created_at.isoformat() if image.created_at else None,
    }


def encode_json_ld(document: dict[str, Any]) -> bytes:
    return (json.dumps(document, indent=2, ensure_ascii=False) + "\n").encode()


def encode_metadata(metadata: dict[str, Any]) -> bytes:
    """Canonical JSON: the same sample always gives the same bytes."""
    return json.dumps(metadata, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass
class ExportSummary:
    """What the card and the Croissant file say about the exported samples."""

    counts: Counter[tuple[str, int | None, str | None]]
    sources: Counter[str]
    groups: Counter[str]
    # (strategy, model) -> samples, steps seen, guidance scales seen
    made_with: dict[tuple[str, str | None], tuple[int, set[int], set[float]]]
    extensions: set[str]

    @classmethod
    def empty(cls) -> ExportSummary:
        return cls(Counter(), Counter(), Counter(), {}, set())

    def add(self, image: Image, extension: str) -> None:
        self.counts[(image.condition, image.skin_tone, image.strategy)] += 1
        self.sources[image.source] += 1
        self.groups[skin_tone_group(image) or "unknown"] += 1
        self.extensions.add(extension)
        if image.strategy:
            made = (image.strategy, image.model_id)
            n, steps, scales = self.made_with.get(made, (0, set(), set()))
            if image.steps is not None:
                steps.add(image.steps)
            if image.guidance_scale is not None:
                scales.add(image.guidance_scale)
            self.made_with[made] = (n + 1, steps, scales)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass(frozen=True)
class ShardInfo:
    name: str
    samples: int
    sha256: str
    size_bytes: int


STRATEGY_TEXT = {
    "text-to-image": "sampled from the text prompt alone",
    "inpaint": "a real parent image with its central square regenerated",
    "inpaint-outpaint": "inpaint, then everything but a thin outer frame of the parent regenerated",
    "image-to-image": "an SDEdit-style variation of a real parent image (beyond the paper)",
}


def tone_text(value: int | None) -> str:
    """A skin tone as the card writes it: 1..6, or unknown."""
    return str(value) if value is not None else "unknown"


def sorted_counts(
    counts: Counter[tuple[str, int | None, str | None]],
) -> list[tuple[str, int | None, str | None, int]]:
    """(condition, skin tone, strategy, count) rows in the card's order, unknowns last."""

    def order(item: tuple[tuple[str, int | None, str | None], int]) -> tuple[Any, ...]:
        (condition, tone, strategy), _n = item
        return (condition, tone is None, tone or 0, strategy is None, strategy or "")

    return [(c, t, s, n) for (c, t, s), n in sorted(counts.items(), key=order)]


def _filters_text(params: ExportParams) -> str:
    chosen = [
        f"{k}={getattr(params.filters, k)}"
        for k in FILTER_NAMES
        if getattr(params.filters, k) is not None
    ]
    return ", ".join(chosen) if chosen else "none (every image of the dataset)"


def dataset_card(
    *,
    dataset: Dataset,
    job_id: str,
    params: ExportParams,
    summary: ExportSummary,
    shards: list[ShardInfo],
    condition_names: dict[str, str],
) -> str:
    """The README.md of an export: what it holds, how it was made, how to load it."""
    order = f"shuffled with seed {params.seed}" if params.shuffle else "in image-id order"
    lines = [
        f"# {dataset.name}",
        "",
        f"A synthderm export of dataset `{dataset.id}` ({dataset.kind}), as it was at "
        f"{params.as_of.isoformat()}: **{summary.total} samples** in {len(shards)} WebDataset "
        f"shard{'s' if len(shards) != 1 else ''} of at most {params.shard_size} samples, "
        f"{order}. Export job `{job_id}`. Filters: {_filters_text(params)}.",
        "",
    ]
    if dataset.description:
        lines += [dataset.description, ""]
    lines += [
        "## Counts",
        "",
        "Samples by condition x Fitzpatrick skin type x strategy (`real` for real images).",
        "",
        "| condition | skin tone | strategy | count |",
        "|---|---|---|---:|",
    ]
    for condition, tone, strategy, n in sorted_counts(summary.counts):
        lines.append(f"| {condition} | {tone_text(tone)} | {strategy or 'real'} | {n} |")
    lines += [f"| **total** | | | **{summary.total}** |", ""]
    lines.append(
        "By source: " + ", ".join(f"{s} {n}" for s, n in sorted(summary.sources.items())) + "."
    )
    lines.append(
        "By Fitzpatrick group: "
        + ", ".join(f"{g} {n}" for g, n in sorted(summary.groups.items()))
        + "."
    )
    names = [f"{slug} ({condition_names.get(slug, slug)})" for slug in sorted(
        {c for c, _t, _s in summary.counts}
    )]  # fmt: skip
    lines += ["", "Conditions (label slug and name): " + ", ".join(names) + ".", ""]

    lines += ["## How it was made", ""]
    if summary.sources.get("real"):
        lines.append(
            f"- {summary.sources['real']} real images, stored as uploaded (their bytes are "
            "unchanged; JPEGs stay `.jpg`)."
        )
    for (strategy, model), (n, steps, scales) in sorted(
        summary.made_with.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")
    ):
        detail = STRATEGY_TEXT.get(strategy, strategy)
        steps_text = ", ".join(str(s) for s in sorted(steps)) or "unrecorded"
        scale_text = ", ".join(f"{g:g}" for g in sorted(scales)) or "unrecorded"
        lines.append(
            f"- {n} synthetic images, `{strategy}` ({detail}) with generator `{model}`: "
            f"{steps_text} sampling steps, guidance scale {scale_text}."
        )
    if summary.made_with:
        lines += [
            "",
            f"Synthetic images follow {PAPER}: latent diffusion pipelines prompted with "
            '"An image of {condition}, a skin disease" (with the Fitzpatrick type when set). '
            "Each sample's JSON records its seed, model, steps, guidance, prompt and parent "
            "image, so it can be regenerated.",
        ]
    lines += [
        "",
        "## Licence",
        "",
        "Real images keep the licence and terms of use of their source dataset (for "
        "example Fitzpatrick17k, DDI or ISIC: research use only); the export grants no "
        "further rights to them. Synthetic images derived from a real parent "
        "(`parent_image_id`) may be subject to the parent's terms as well. Synthetic images "
        "are released under the terms their owner chooses.",
        "",
        "## Files",
        "",
        "| file | samples | bytes | sha256 |",
        "|---|---:|---:|---|",
    ]
    for shard in shards:
        lines.append(f"| {shard.name} | {shard.samples} | {shard.size_bytes} | {shard.sha256} |")
    lines += [
        "",
        "`croissant.json` describes the same files in the MLCommons Croissant 1.0 format.",
        "",
        "Each sample is `{key}.png` (or `.jpg` for a real JPEG) and `{key}.json` with its "
        "provenance: image_id, dataset_id, md5hash, label, condition, skin_tone, "
        "skin_tone_group, source, method, strategy, model, seed, steps, guidance_scale, "
        "prompt, parent_image_id, width, height, sha256, job_id, split, created_at. "
        "The key is `{condition}_{strategy or source}_{image_id}`.",
        "",
        "## Loading",
        "",
        "```python",
        "import webdataset as wds",
        "",
        f'shards = "shard-{{00000..{max(len(shards) - 1, 0):05d}}}.tar"',
        'dataset = wds.WebDataset(shards).decode("pil").to_tuple("png;jpg", "json")',
        "for image, meta in dataset:",
        '    print(meta["condition"], meta["skin_tone"], meta["strategy"], image.size)',
        "```",
        "",
    ]
    return "\n".join(lines)


def iter_batches(ids: list[str], size: int) -> Iterator[list[str]]:
    """`ids` in order, `size` at a time."""
    for start in range(0, len(ids), size):
        yield ids[start : start + size]
