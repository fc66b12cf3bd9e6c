"""How long `make default-model` takes (issue 24's target: at most 90 minutes on this 2-core
CPU, faster on a GPU): each stage of models/scratch.py with the committed model's settings
runs a few steps on real Fitzpatrick17k photos (or .benchdata/ photos, or generated ones), and
the full run's time is projected from the measured seconds per step, against the 90-minute
budget measured in the same run's terms.

    python -m bench.scratch [--device cpu|cuda] [--steps 20] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.finetune_config import TrainingImage
from models.scratch import STAGES, train_generator
from models.scratch_parts import ScratchConfig

BUDGET_S = 90 * 60
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "fitzpatrick17k_ajl21"


def photos(count: int) -> list[TrainingImage]:
    """Real photos when ../shared/data is here, else coloured noise of photo size."""
    files = sorted(DATA.glob("*/*.jpg"))[:count]
    rng = np.random.default_rng(0)
    images = []
    for k in range(count):
        if files:
            pixels = Image.open(files[k % len(files)]).convert("RGB")
        else:
            pixels = Image.fromarray(rng.integers(0, 255, (137, 150, 3), dtype=np.uint8))
        images.append(TrainingImage(f"p{k}", pixels, f"An image of eczema, type {k % 6 + 1}"))
    return images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=20, help="Steps timed per stage.")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    full = ScratchConfig()
    # the committed settings, fewer steps; the first two steps of a stage are its warm-up
    config = replace(
        full,
        vae_steps=args.steps,
        unet_steps=args.steps,
        inpaint_steps=args.steps,
        checkpoint_every_steps=10**6,
        validation_every_steps=10**6,
        latent_views=1,
    )
    stamps: dict[str, list[float]] = {stage: [] for stage in STAGES}
    started = time.perf_counter()
    train_generator(
        photos(args.images),
        config,
        device=torch.device(args.device),
        on_step=lambda stage, report: stamps[stage].append(time.perf_counter()),
    )
    wall = time.perf_counter() - started
    totals = {"autoencoder": full.vae_steps, "text-to-image": full.unet_steps,
              "inpaint": full.inpaint_steps}  # fmt: skip
    per_step = {stage: float(np.median(np.diff(stamps[stage][2:]))) for stage in STAGES}
    projected = sum(per_step[stage] * totals[stage] for stage in STAGES)
    result = {
        "device": args.device,
        "threads": torch.get_num_threads(),
        "seconds_per_step": per_step,
        "full_run_steps": totals,
        "projected_full_run_s": round(projected, 1),
        "budget_s": BUDGET_S,
        "ratio_to_budget": round(projected / BUDGET_S, 3),
        "bench_wall_s": round(wall, 1),
    }
    for stage in STAGES:
        print(f"{stage:14s} {per_step[stage]:.3f} s/step x {totals[stage]} steps")
    print(
        f"projected full run {projected / 60:.1f} min on {args.device} "
        f"({torch.get_num_threads()} threads): {result['ratio_to_budget']:.2f}x the 90-min budget"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
