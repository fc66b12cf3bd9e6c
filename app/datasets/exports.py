"""Dataset exports: the request, its rows, and the release layout (PAPER.md section 5).

An export writes WebDataset tar shards of at most 5,000 samples (`__key__`, the image, its
provenance JSON), a dataset card and Croissant metadata. The layout functions here are pure
(no store, no torch): workers/export.py reads the images and writes the files.
"""

from __future__ import annotations

import json
import random
import re
import secrets
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app import engine
from app.datasets.repository import ManifestFilter, _filtered, get_dataset
from app.db.tables import ApiKey, Dataset, Image, Job, utcnow
from app.errors import InvalidField, NotFound
from app.fitzpatrick import UNKNOWN_GROUP, fitzpatrick_group
from app.schemas import Strategy

# The paper's public release holds at most 5,000 samples per shard (PAPER.md section 5).
MAX_SHARD_SIZE = 5000
CROISSANT_1_0 = "http://mlcommons.org/croissant/1.0"
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
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


class ExportCreate(BaseModel):
    """An export of a dataset (or of the images the filters select) as WebDataset shards."""

    model_config = ConfigDict(extra="forbid")

    shard_size: int = Field(
        MAX_SHARD_SIZE,
        ge=1,
        le=MAX_SHARD_SIZE,
        description="Samples per shard (the paper's release: at most 5,000).",
    )
    shuffle: bool = Field(False, description="Shuffle the samples (else image-id order).")
    seed: int | None = Field(
        None, ge=0, le=2**63 - 1, description="Shuffle seed; drawn and recorded when unset."
    )
    condition: str | None = Field(None, min_length=1, max_length=120)
    skin_tone: int | None = Field(None, ge=1, le=6, description="Fitzpatrick type 1..6.")
    strategy: Strategy | None = None
    source: Literal["real", "synthetic"] | None = None


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


# --- rows -----------------------------------------------------------------------------------


def _selection(query: Any, *, dataset_id: str, filters: ManifestFilter, as_of: datetime) -> Any:
    # Images written after the request are not part of it: a dataset that a running job
    # still fills exports as it was when asked, and a rerun writes the same bytes.
    return _filtered(query, dataset_id, filters).where(Image.created_at <= as_of)


def count_export_images(
    *, session: Session, dataset_id: str, filters: ManifestFilter, as_of: datetime
) -> int:
    """How many images an export selects."""
    query = select(func.count()).select_from(Image)
    query = _selection(query, dataset_id=dataset_id, filters=filters, as_of=as_of)
    return int(session.scalar(query) or 0)


def export_image_ids(*, session: Session, dataset_id: str, params: ExportParams) -> list[str]:
    """The ids of an export's images in shard order: by id, or shuffled by the seed."""
    query = _selection(
        select(Image.id), dataset_id=dataset_id, filters=params.filters, as_of=params.as_of
    )
    ids = list(session.scalars(query.order_by(Image.id)))
    if params.shuffle:
        random.Random(params.seed).shuffle(ids)
    return ids


def images_by_ids(*, session: Session, ids: list[str]) -> list[Image]:
    """Image rows in the order of `ids` (detached); LookupError if one is gone."""
    rows = {row.id: row for row in session.scalars(select(Image).where(Image.id.in_(ids)))}
    session.expunge_all()
    missing = [i for i in ids if i not in rows]
    if missing:
        raise LookupError(f"image {missing[0]} was deleted during the export")
    return [rows[i] for i in ids]


def export_source(*, session: Session, dataset_id: str) -> Dataset:
    """The dataset an export job reads (the worker's side: no owner check)."""
    dataset = session.get(Dataset, dataset_id)
    if dataset is None:
        raise LookupError(f"dataset {dataset_id} is gone")
    return dataset


def create_export_job(
    *, session: Session, dataset_id: str, params: ExportCreate, owner: ApiKey
) -> Job:
    """Validate an export and insert its job (kind `export`, one chunk). Not committed."""
    dataset = get_dataset(session=session, dataset_id=dataset_id, owner=owner)
    as_of = utcnow()
    filters = ManifestFilter(
        condition=params.condition,
        skin_tone=params.skin_tone,
        strategy=params.strategy.value if params.strategy else None,
        source=params.source,
    )
    count = count_export_images(
        session=session, dataset_id=dataset.id, filters=filters, as_of=as_of
    )
    if count == 0:
        chosen = {k: getattr(filters, k) for k in FILTER_NAMES if getattr(filters, k) is not None}
        which = ", ".join(f"{k}={v}" for k, v in chosen.items())
        raise InvalidField(
            f"dataset {dataset.id} has no images{' matching ' + which if which else ''}; "
            "nothing to export",
            field=next(iter(chosen), None),
        )
    seed = params.seed
    if params.shuffle and seed is None:
        seed = secrets.randbits(62)
    stored: dict[str, Any] = {
        "shard_size": params.shard_size,
        "shuffle": params.shuffle,
        "seed": seed,
        "as_of": as_of.isoformat(),
        **{k: getattr(filters, k) for k in FILTER_NAMES if getattr(filters, k) is not None},
    }
    return engine.insert_job(
        session=session,
        owner=owner,
        kind="export",
        dataset_id=dataset.id,
        count=count,
        chunk_size=max(count, 1),
        seed=seed if params.shuffle and seed is not None else 0,
        params=stored,
        created_at=as_of,
    )


def get_export(*, session: Session, dataset_id: str, job_id: str, owner: ApiKey) -> Job:
    """One export of the caller's dataset; NotFound otherwise."""
    dataset = get_dataset(session=session, dataset_id=dataset_id, owner=owner)
    job = session.get(Job, job_id)
    if job is None or job.kind != "export" or job.dataset_id != dataset.id:
        raise NotFound(f"no export {job_id!r} of dataset {dataset.id}")
    return job


def list_exports(*, session: Session, dataset_id: str, owner: ApiKey, limit: int) -> list[Job]:
    """The exports of the caller's dataset, newest first."""
    dataset = get_dataset(session=session, dataset_id=dataset_id, owner=owner)
    return list(
        session.scalars(
            select(Job)
            .where(Job.dataset_id == dataset.id, Job.kind == "export")
            .order_by(Job.created_at.desc(), Job.id.desc())
            .limit(limit)
        )
    )


def with_fresh_urls(
    *, result: dict[str, Any] | None, url: Callable[[str], str]
) -> dict[str, Any] | None:
    """An export's result with its download URLs signed again (they expire)."""
    if not result:
        return result
    fresh = dict(result)
    fresh["shards"] = [{**s, "url": url(s["key"])} for s in result.get("shards", [])]
    for name in ("card", "croissant"):
        if isinstance(result.get(name), dict):
            fresh[name] = {**result[name], "url": url(result[name]["key"])}
    return fresh


# --- the release layout ---------------------------------------------------------------------


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
    return "_".join(_UNSAFE.sub("-", p).strip("-") or "x" for p in parts)


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


def _tone(value: int | None) -> str:
    return str(value) if value is not None else "unknown"


def _sorted_counts(
    counts: Counter[tuple[str, int | None, str | None]],
) -> list[tuple[str, int | None, str | None, int]]:
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
    for condition, tone, strategy, n in _sorted_counts(summary.counts):
        lines.append(f"| {condition} | {_tone(tone)} | {strategy or 'real'} | {n} |")
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


# The provenance fields of a sample's JSON and their Croissant data types.
CROISSANT_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("image_id", "sc:Text", "Id of the image in synthderm."),
    ("dataset_id", "sc:Text", "Id of the dataset the image belongs to."),
    ("name", "sc:Text", "Original file name (real images) or the image id."),
    ("md5hash", "sc:Text", "Fitzpatrick17k md5hash of the image, when it has one."),
    ("label", "sc:Text", "Condition slug (hyphenated), as in the paper's release."),
    ("condition", "sc:Text", "Condition slug."),
    ("skin_tone", "sc:Integer", "Fitzpatrick skin type 1..6, null when unknown."),
    ("skin_tone_group", "sc:Text", "Fitzpatrick group: I-II, III-IV or V-VI."),
    ("source", "sc:Text", "real or synthetic."),
    ("method", "sc:Text", "The strategy for synthetic images, `real` for real ones."),
    ("strategy", "sc:Text", "text-to-image, inpaint, inpaint-outpaint or image-to-image."),
    ("model", "sc:Text", "Generator model id."),
    ("seed", "sc:Integer", "The image's own sampling seed."),
    ("steps", "sc:Integer", "Sampling steps."),
    ("guidance_scale", "sc:Float", "Classifier-free guidance scale."),
    ("prompt", "sc:Text", "Text prompt."),
    ("parent_image_id", "sc:Text", "The real image it derives from."),
    ("width", "sc:Integer", "Width in pixels."),
    ("height", "sc:Integer", "Height in pixels."),
    ("sha256", "sc:Text", "SHA-256 of the image bytes."),
    ("job_id", "sc:Text", "The job that made the image."),
    ("split", "sc:Text", "train, validation or test, when the source says."),
    ("created_at", "sc:Date", "When the image was stored (ISO 8601)."),
)

CROISSANT_CONTEXT: dict[str, Any] = {
    "@language": "en",
    "@vocab": "https://schema.org/",
    "citeAs": "cr:citeAs",
    "column": "cr:column",
    "conformsTo": "dct:conformsTo",
    "cr": "http://mlcommons.org/croissant/",
    "rai": "http://mlcommons.org/croissant/RAI/",
    "data": {"@id": "cr:data", "@type": "@json"},
    "dataType": {"@id": "cr:dataType", "@type": "@vocab"},
    "dct": "http://purl.org/dc/terms/",
    "examples": {"@id": "cr:examples", "@type": "@json"},
    "extract": "cr:extract",
    "field": "cr:field",
    "fileProperty": "cr:fileProperty",
    "fileObject": "cr:fileObject",
    "fileSet": "cr:fileSet",
    "format": "cr:format",
    "includes": "cr:includes",
    "isLiveDataset": "cr:isLiveDataset",
    "jsonPath": "cr:jsonPath",
    "key": "cr:key",
    "md5": "cr:md5",
    "parentField": "cr:parentField",
    "path": "cr:path",
    "recordSet": "cr:recordSet",
    "references": "cr:references",
    "regex": "cr:regex",
    "repeated": "cr:repeated",
    "replace": "cr:replace",
    "sc": "https://schema.org/",
    "separator": "cr:separator",
    "source": "cr:source",
    "subField": "cr:subField",
    "transform": "cr:transform",
}


def croissant(
    *,
    dataset: Dataset,
    job_id: str,
    params: ExportParams,
    summary: ExportSummary,
    shards: list[ShardInfo],
    url: str,
) -> dict[str, Any]:
    """Croissant 1.0 JSON-LD metadata of an export: the shards (FileObjects), the images and
    JSON files inside them (FileSets), and one record set with a field per JSON key."""
    archives = [{"@id": shard.name} for shard in shards]
    image_types = sorted(
        {_MEDIA_TYPES.get(e, "application/octet-stream") for e in summary.extensions}
    )
    distribution: list[dict[str, Any]] = [
        {
            "@type": "cr:FileObject",
            "@id": shard.name,
            "name": shard.name,
            "description": f"WebDataset shard of {shard.samples} samples.",
            "contentUrl": shard.name,
            "contentSize": f"{shard.size_bytes} B",
            "encodingFormat": "application/x-tar",
            "sha256": shard.sha256,
        }
        for shard in shards
    ]
    distribution += [
        {
            "@type": "cr:FileSet",
            "@id": "image-files",
            "name": "image-files",
            "description": "The image of each sample (`{key}.png`, or `.jpg` for a real JPEG).",
            "containedIn": archives,
            "encodingFormat": image_types[0] if len(image_types) == 1 else image_types,
            "includes": [f"*.{e}" for e in sorted(summary.extensions)],
        },
        {
            "@type": "cr:FileSet",
            "@id": "metadata-files",
            "name": "metadata-files",
            "description": "The provenance JSON of each sample (`{key}.json`).",
            "containedIn": archives,
            "encodingFormat": "application/json",
            "includes": "*.json",
        },
    ]
    # WebDataset's __key__: a member's name before its first dot. The images and the JSON
    # files are two file sets; records join them on it.
    key_regex = r"^(?:.*/)?([^/.]+)\..*$"

    def key_field(record_set: str, file_set: str) -> dict[str, Any]:
        return {
            "@type": "cr:Field",
            "@id": f"{record_set}/__key__",
            "name": "__key__",
            "description": "WebDataset sample key: {condition}_{strategy or source}_{image_id}.",
            "dataType": "sc:Text",
            "source": {
                "fileSet": {"@id": file_set},
                "extract": {"fileProperty": "filename"},
                "transform": {"regex": key_regex},
            },
        }

    images_record_set = {
        "@type": "cr:RecordSet",
        "@id": "images",
        "name": "images",
        "description": "The image file of each sample, by sample key.",
        "key": {"@id": "images/__key__"},
        "field": [
            key_field("images", "image-files"),
            {
                "@type": "cr:Field",
                "@id": "images/image",
                "name": "image",
                "description": "The image bytes, as stored.",
                "dataType": "sc:ImageObject",
                "source": {
                    "fileSet": {"@id": "image-files"},
                    "extract": {"fileProperty": "content"},
                },
            },
        ],
    }
    fields: list[dict[str, Any]] = [
        {
            **key_field("samples", "metadata-files"),
            "references": {"field": {"@id": "images/__key__"}},
        },
        {
            "@type": "cr:Field",
            "@id": "samples/image",
            "name": "image",
            "description": "The sample's image (joined on __key__).",
            "dataType": "sc:ImageObject",
            "source": {"field": {"@id": "images/image"}},
        },
    ]
    fields += [
        {
            "@type": "cr:Field",
            "@id": f"samples/{name}",
            "name": name,
            "description": description,
            "dataType": data_type,
            "source": {
                "fileSet": {"@id": "metadata-files"},
                "extract": {"jsonPath": f"$.{name}"},
            },
        }
        for name, data_type, description in CROISSANT_FIELDS
    ]
    tones = ", ".join(
        f"{c} / {_tone(t)} / {s or 'real'}: {n}" for c, t, s, n in _sorted_counts(summary.counts)
    )
    return {
        "@context": CROISSANT_CONTEXT,
        "@type": "sc:Dataset",
        "conformsTo": CROISSANT_1_0,
        "name": _UNSAFE.sub("-", dataset.name).strip("-") or dataset.id,
        "alternateName": dataset.name,
        "description": (
            f"synthderm export of dataset {dataset.id} ({dataset.kind}) as of "
            f"{params.as_of.isoformat()}: {summary.total} dermatology images with provenance, "
            f"as WebDataset shards (export job {job_id}). Counts by condition / Fitzpatrick "
            f"skin type / strategy: {tones}."
        ),
        "url": url,
        "identifier": dataset.id,
        "datePublished": params.as_of.date().isoformat(),
        "license": "Real images keep their source dataset's licence (e.g. Fitzpatrick17k: "
        "research use only); synthetic images are released under their owner's terms.",
        "citeAs": "@article{sagers2023augmenting, title={Augmenting medical image classifiers "
        "with synthetic data from latent diffusion models}, author={Sagers, Luke W. and Diao, "
        "James A. and Melas-Kyriazi, Luke and others}, journal={arXiv preprint "
        "arXiv:2308.12453}, year={2023}}",
        "keywords": ["dermatology", "synthetic data", "latent diffusion", "Fitzpatrick"],
        "isLiveDataset": False,
        "distribution": distribution,
        "recordSet": [
            images_record_set,
            {
                "@type": "cr:RecordSet",
                "@id": "samples",
                "name": "samples",
                "description": "One record per WebDataset sample: the image and its provenance.",
                "key": {"@id": "samples/image_id"},
                "field": fields,
            },
        ],
    }


_MEDIA_TYPES = {
    "png": "image/png",
    "jpg": "image/jpeg",
    "webp": "image/webp",
    "bmp": "image/bmp",
    "tif": "image/tiff",
}


def iter_batches(ids: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(ids), size):
        yield ids[start : start + size]
