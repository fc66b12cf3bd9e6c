"""An export's Croissant 1.0 metadata (MLCommons JSON-LD): the shards, the images and JSON
files inside them, and a record set with a field per provenance key. Pure, like export_files.
"""

from __future__ import annotations

from typing import Any

from app.datasets.export_files import (
    UNSAFE_IN_NAMES,
    ExportParams,
    ExportSummary,
    ShardInfo,
    sorted_counts,
    tone_text,
)
from app.db.tables import Dataset

CROISSANT_1_0 = "http://mlcommons.org/croissant/1.0"
_MEDIA_TYPES = {
    "png": "image/png",
    "jpg": "image/jpeg",
    "webp": "image/webp",
    "bmp": "image/bmp",
    "tif": "image/tiff",
}


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
        f"{c} / {tone_text(t)} / {s or 'real'}: {n}" for c, t, s, n in sorted_counts(summary.counts)
    )
    return {
        "@context": CROISSANT_CONTEXT,
        "@type": "sc:Dataset",
        "conformsTo": CROISSANT_1_0,
        "name": UNSAFE_IN_NAMES.sub("-", dataset.name).strip("-") or dataset.id,
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
