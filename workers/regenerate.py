"""Regenerate one stored image from its recorded provenance and compare the bytes.

`python -m workers.regenerate IMAGE_ID [--out FILE]` (or `synthderm images regenerate`):
exit 0 when the bytes are identical, 1 when they differ. Bit-identity holds on the same
device, dtype, batch and library versions, all of which the provenance records.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import sys
from pathlib import Path

from app.config import Settings, get_settings
from app.db.session import session_factory
from app.db.tables import Image, Job
from app.ids import image_seed
from app.vocabulary import get_model
from workers.generate import ParentImages, encode_png, pipeline_cache


@dataclasses.dataclass(frozen=True)
class Regenerated:
    image_id: str
    recorded_sha256: str
    sha256: str
    data: bytes
    notes: list[str]

    @property
    def identical(self) -> bool:
        return self.sha256 == self.recorded_sha256


def regenerate(settings: Settings, image_id: str) -> Regenerated:
    """Sample the image's batch again with its recorded parameters and seeds."""
    from models import strategies

    with session_factory(settings.database_url)() as session:
        row = session.get(Image, image_id)
        if row is None or row.job_id is None or row.index is None:
            raise LookupError(f"no generated image {image_id!r}")
        job = session.get(Job, row.job_id)
        model = get_model(session=session, model_id=row.model_id or "")
        if job is None or model is None:
            raise LookupError(f"the job or model of image {image_id} is gone")
        provenance = dict(row.provenance)
        index, recorded = row.index, row.sha256
    model_path = settings.resolved_models_dir / model.id
    if not (model_path / "model_index.json").is_file():
        model_path = Path(model.path)
    loaded = pipeline_cache(settings).get(model.id, model_path)

    notes = []
    for key, now in (
        ("device", str(loaded.device)),
        ("dtype", str(loaded.dtype).removeprefix("torch.")),
        ("weights_sha256", model.weights_sha256),
    ):
        if provenance.get(key) != now:
            notes.append(f"{key} was {provenance.get(key)}, is {now}: bytes may differ")

    fields = {f.name for f in dataclasses.fields(strategies.SampleParams)}
    params = strategies.SampleParams(
        **{name: provenance[name] for name in fields if name in provenance}
    )
    batch: list[int] = list(provenance.get("batch_indices") or [index])
    k = int(provenance.get("synthetic_per_real", 1))
    parents = ParentImages(settings, job_id=job.id, k=k, size=params.width)
    edits = params.strategy in strategies.EDITS_PARENT
    if edits:
        parents.load_rows(batch)
    img2img = (
        loaded.variant("img2img", strategies.image_to_image_pipeline)
        if params.strategy == strategies.IMAGE_TO_IMAGE
        else None
    )
    with loaded.lock:
        images = strategies.generate(
            loaded.pipeline,
            params=params,
            seeds=[image_seed(job.seed, i) for i in batch],
            device=loaded.device,
            parents=[parents.image(i) for i in batch] if edits else None,
            img2img=img2img,
        )
    data = encode_png(images[batch.index(index)])
    return Regenerated(image_id, recorded, hashlib.sha256(data).hexdigest(), data, notes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("image_id")
    parser.add_argument("--out", type=Path, help="Write the regenerated PNG here.")
    args = parser.parse_args(argv)
    from models.pipelines import quiet_loading

    quiet_loading()
    try:
        result = regenerate(get_settings(), args.image_id)
    except LookupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    if args.out:
        args.out.write_bytes(result.data)
    verdict = "identical" if result.identical else "differs"
    print(
        f"{result.image_id} recorded {result.recorded_sha256} regenerated {result.sha256} {verdict}"
    )
    return 0 if result.identical else 1


if __name__ == "__main__":
    sys.exit(main())
