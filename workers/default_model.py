"""`make default-model`: train the project's own generator (issue 24) from the Fitzpatrick17k
photos' `train` split with models/scratch.py, resumably, and write it where the embedded
default serves it from (models/synthderm-fitz64/). The same code a `method: scratch` fine-tune
runs, called directly: no database, no broker.

    python -m workers.default_model [--data DIR] [--out DIR] [--work DIR] [--set NAME=VALUE]

Checkpoints go to WORK/checkpoint.pt every checkpoint_every_steps steps; a run started again
with the same settings continues from there. Validation grids go to WORK/samples/.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import platform
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.config import Settings
from app.vocabulary import SETTINGS_FILE, condition_name

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "fitzpatrick17k_ajl21"
DEFAULT_OUT = ROOT / "models" / "synthderm-fitz64"
DEFAULT_WORK = ROOT / "var" / "default-model"
SKIN_TONES = range(1, 7)
# Fixed validation prompts: four conditions, light and dark skin
VALIDATION = [
    ("acne-vulgaris", 2),
    ("acne-vulgaris", 5),
    ("squamous-cell-carcinoma", 1),
    ("squamous-cell-carcinoma", 4),
    ("melanoma", 2),
    ("eczema", 6),
    ("folliculitis", 3),
    ("kaposi-sarcoma", 5),
]

# The model's own sampler defaults (synthderm.json beside model_index.json), which a job on it
# takes when it sets none. Guidance 12, not the paper's 3: at 3 a seed gives nearly the same
# image whatever the condition (classification accuracy score 11.2%, chance 11.1%); at 12 it is
# 26.6% and the median ITA falls with the requested type (`scripts/guidance_probe.py`).
SAMPLING = {"guidance_scale": 12.0}

log = logging.getLogger("default_model")


@dataclass(frozen=True)
class Photo:
    path: Path
    label: str
    skin_tone: int | None  # Fitzpatrick 1..6, None when unknown
    md5: str


def read_split(data_dir: Path, split: str = "train") -> list[Photo]:
    """The photos of one split of the Fitzpatrick17k folder (metadata.csv), sorted by path."""
    photos = []
    with (data_dir / "metadata.csv").open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row["split"] != split:
                continue
            tone = int(row["fitzpatrick_scale"])
            photos.append(
                Photo(
                    path=data_dir / row["path"],
                    label=row["label"],
                    skin_tone=tone if tone in SKIN_TONES else None,
                    md5=row["md5hash"],
                )
            )
    if not photos:
        raise ValueError(f"data: no {split!r} rows in {data_dir / 'metadata.csv'}")
    return sorted(photos, key=lambda photo: str(photo.path))


def prompt(settings: Settings, label: str, skin_tone: int | None) -> str:
    """The service's prompt for a condition and skin type (workers/sampling.py builds the same)."""
    from models.strategies import build_prompt

    return build_prompt(
        condition_name=condition_name(label),
        skin_tone=skin_tone,
        template=settings.prompt_template,
        suffix=settings.skin_tone_prompt_suffix,
    )


def all_prompts(settings: Settings, labels: Sequence[str]) -> list[str]:
    """Every prompt a job may send this model: each condition, with and without a skin type."""
    return [prompt(settings, label, tone) for label in labels for tone in (None, *SKIN_TONES)]


def _grid(images: list[Any], columns: int = 4) -> Any:
    from PIL import Image

    width, height = images[0].size
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * width, rows * height), "white")
    for k, image in enumerate(images):
        sheet.paste(image, ((k % columns) * width, (k // columns) * height))
    return sheet


def _atomic_write(path: Path, data: bytes) -> None:
    partial = path.with_suffix(path.suffix + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)


def train(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from PIL import Image

    from models.devices import resolve_device
    from models.finetune_config import TrainingImage
    from models.scratch import STAGES, save_generator, train_generator
    from models.scratch_parts import config_dict, config_from_dict, parameter_count

    settings = Settings()
    overrides: dict[str, Any] = {}
    for item in args.set:
        name, _, value = item.partition("=")
        overrides[name] = json.loads(value)
    config = config_from_dict({**config_dict(config_from_dict({})), **overrides})
    photos = read_split(args.data, "train")
    if args.limit:
        photos = photos[: args.limit]
    labels = sorted({photo.label for photo in photos})
    images = [
        TrainingImage(
            image_id=photo.md5,
            pixels=Image.open(photo.path).convert("RGB"),
            caption=prompt(settings, photo.label, photo.skin_tone),
        )
        for photo in photos
    ]
    device = resolve_device(args.device)
    # the cores this process may run on (taskset), not the machine's: a training pinned to
    # one core while other work runs beside it is not slowed by its threads waiting on each other
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "samples").mkdir(exist_ok=True)
    checkpoint = args.work / "checkpoint.pt"
    resume = checkpoint.read_bytes() if checkpoint.is_file() else None
    started = time.perf_counter()
    last_log = [0.0]

    def on_step(stage: str, report: Any) -> None:
        now = time.perf_counter()
        if report.step == report.total_steps or now - last_log[0] >= 30:
            last_log[0] = now
            log.info(
                "%s step %d/%d loss %.4f %.1f img/s %.0f s",
                stage,
                report.step,
                report.total_steps,
                report.loss,
                report.images_per_s,
                report.elapsed_s,
            )

    def on_checkpoint(stage: str, data: bytes) -> None:
        _atomic_write(checkpoint, data)

    def on_validation(stage: str, step: int, images: list[Any]) -> None:
        _grid([v.image for v in images]).save(args.work / "samples" / f"{stage}-{step:05d}.png")

    validation_prompts = [prompt(settings, label, tone) for label, tone in VALIDATION]
    result = train_generator(
        images,
        config,
        device=device,
        prompts=validation_prompts + all_prompts(settings, labels),
        resume=resume,
        on_step=on_step,
        on_checkpoint=on_checkpoint,
        on_validation=on_validation,
    )
    # the validation prompts first: train_generator samples the first eight of `prompts`
    written = save_generator(result, args.out, dtype=torch.float16)
    for folder in written.values():  # the sampler defaults the service reads on registration
        (folder / SETTINGS_FILE).write_text(json.dumps({"sampling": SAMPLING}, indent=1) + "\n")
    wall_s = time.perf_counter() - started
    pipeline = result.text_to_image
    record = {
        "config": config_dict(config),
        "data": {
            "dataset": "fitzpatrick17k_ajl21",
            "split": "train",
            "images": len(photos),
            "per_condition": dict(sorted(Counter(p.label for p in photos).items())),
            "per_skin_tone": {
                str(tone or "unknown"): count
                for tone, count in sorted(
                    Counter(p.skin_tone for p in photos).items(), key=lambda kv: kv[0] or 99
                )
            },
            "conditions_left_out": [],
        },
        "parameters": {
            "vae": parameter_count(pipeline.vae),
            "text_encoder": parameter_count(pipeline.text_encoder),
            "unet": parameter_count(pipeline.unet),
            "inpaint_unet": parameter_count(result.inpaint.unet),
        },
        "training": {
            stage: {
                "steps": len(result.losses.get(stage, [])),
                "seconds": round(result.elapsed_s.get(stage, 0.0), 1),
                "first_loss": result.losses[stage][0] if result.losses.get(stage) else None,
                "final_loss_mean_of_last_50": (
                    sum(result.losses[stage][-50:]) / len(result.losses[stage][-50:])
                    if result.losses.get(stage)
                    else None
                ),
            }
            for stage in STAGES
        },
        "losses": result.losses,
        "reconstruction_psnr_db": round(result.reconstruction_psnr_db, 2),
        "latent_scaling_factor": result.scaling_factor,
        "wall_seconds_this_session": round(wall_s, 1),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "device": str(device)},
        "torch": torch.__version__,
        "pipelines": {name: str(path.relative_to(args.out)) for name, path in written.items()},
    }
    (args.out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--limit", type=int, default=0, help="Train on the first N photos only.")
    parser.add_argument(
        "--threads", type=int, default=0, help="Torch threads; 0: the usable cores."
    )
    parser.add_argument(
        "--set", action="append", default=[], help="A ScratchConfig field, NAME=JSON."
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    from models.pipelines import quiet_loading

    quiet_loading()
    record = train(args)
    log.info("done: %s", json.dumps(record["training"]))


if __name__ == "__main__":
    main()
