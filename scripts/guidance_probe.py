"""Quick probes of synthderm-fitz64 by guidance scale (issue 24); not the model card's protocol
(the card: `make default-model-card`).

`python scripts/guidance_probe.py cas 3 7 12`: the classification accuracy score. For each
scale, 48 text-to-image images per class of the 9 commonest conditions (types 1..6 cycled in
the prompt, 25 steps, seed 0); the evaluation's head (workers.evaluation_measures.utility)
trained on their EfficientNet-Lite0 features alone, beside the same head on 48 real train
photos per class, both tested on the Fitzpatrick17k test photos at the generator's 64 px.
About 2 minutes a scale on the 2-core CPU.

`python scripts/guidance_probe.py ita 3 12`: the median ITA by requested Fitzpatrick type. For
each scale, 36 images per type (the 9 conditions cycled, seed = the type), ITA by models/ita.py's
rule (the evaluation's), then the medians, their order and the per-image Spearman correlation.
About a minute a scale.

`python scripts/guidance_probe.py fd 3 7 12`: fd_lite0 against a random half of the full-size
train photos (1,430, seed 0), of 864 text-to-image images (the 21 conditions cycled, types 1..6
cycled, 25 steps, seed 0) per scale, beside tiny-random's 864 (its own pipeline, guidance 7.5),
and the ratio the card's target reads (<= 0.5). Near the card's fidelity row, not equal to it:
the card's reference half and images differ. About 3 minutes a scale.

PROBE_MODEL=DIR probes another text-to-image pipeline directory than the committed one.
PROBE_SCHEDULER=NAME[:JSON] samples with another diffusers scheduler, made from the model's
scheduler config with JSON's overrides, e.g. `DPMSolverMultistepScheduler:{"algorithm_type":
"sde-dpmsolver++"}` or `EulerAncestralDiscreteScheduler`.
PROBE_GUIDANCE_INTERVAL=START,END guides only those steps (the service's guidance_interval;
tiny-random's reference run keeps every step). PROBE_STEPS=N samples with N steps, not 25.
PROBE_FLOOR=VALUE takes tiny-random's fd_lite0 from an earlier run (it costs 5-8 minutes).
"""

import csv
import json
import os
import sys
import time

import diffusers
import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from app.config import get_settings
from models.backbones import load_backbone
from models.ita import image_ita, spearman
from models.quality import frechet_distance
from models.strategies import SampleParams
from models.tiny_random import build_pipeline as tiny_random_pipeline
from models.transforms import resize_crop
from workers.default_model import prompt
from workers.evaluation_measures import utility

TOP9 = [
    "acne",
    "acne-vulgaris",
    "actinic-keratosis",
    "basal-cell-carcinoma",
    "eczema",
    "folliculitis",
    "melanoma",
    "mycosis-fungoides",
    "squamous-cell-carcinoma",
]
DATA = "../shared/data/fitzpatrick17k_ajl21"
PER_CLASS = 48
PER_TYPE = 36


STEPS = int(os.environ.get("PROBE_STEPS", "25"))
INTERVAL = [float(x) for x in os.environ.get("PROBE_GUIDANCE_INTERVAL", "0,1").split(",")]


def sample(
    pipeline, prompts: list[str], guidance: float, seed: int, interval: list[float] = INTERVAL
) -> list[Image.Image]:
    generator = torch.Generator().manual_seed(seed)
    # the service's rule for a step's scale (models/strategies.py), on a plain pipeline call
    params = SampleParams(
        strategy="text-to-image", prompt="", negative_prompt=None, num_inference_steps=STEPS,
        guidance_scale=guidance, width=64, height=64,
        guidance_interval=None if interval == [0, 1] else (interval[0], interval[1]),
    )  # fmt: skip

    def switch(pipe, step, _timestep, kwargs):
        pipe._guidance_scale = params.guidance_at(step + 1)
        return kwargs

    return pipeline(
        prompts, num_inference_steps=STEPS, height=64, width=64,
        guidance_scale=params.guidance_at(0), generator=generator,
        callback_on_step_end=None if params.guidance_interval is None else switch,
    ).images  # fmt: skip


def cas(pipeline, settings, scales: list[float]) -> None:
    backbone = load_backbone("efficientnet-lite0")

    def features(images: list[Image.Image]) -> np.ndarray:
        out = []
        for i in range(0, len(images), 64):
            small = [im.convert("RGB").resize((64, 64), Image.BICUBIC) for im in images[i : i + 64]]
            batch = [
                np.asarray(im.resize((224, 224), Image.BICUBIC), dtype=np.float32) / 255
                for im in small
            ]
            pixels = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)
            out.append(backbone.features(pixels).numpy())
        return np.concatenate(out)

    with open(f"{DATA}/metadata.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["label"] in TOP9]
    test = [r for r in rows if r["split"] == "test"]
    train = [r for r in rows if r["split"] == "train"]
    start = time.time()
    test_f = features([Image.open(f"{DATA}/{r['path']}") for r in test])
    rng = np.random.default_rng(0)
    real_pick = [
        r
        for c in TOP9
        for r in rng.permutation([x for x in train if x["label"] == c])[:PER_CLASS].tolist()
    ]
    real_f = features([Image.open(f"{DATA}/{r['path']}") for r in real_pick])
    print("features", time.time() - start, flush=True)
    for g in scales:
        start = time.time()
        images, labels = [], []
        for c in TOP9:
            prompts = [prompt(settings, c, 1 + i % 6) for i in range(PER_CLASS)]
            images += sample(pipeline, prompts, g, seed=0)
            labels += [c] * PER_CLASS
        u = utility(
            synthetic=features(images), synthetic_conditions=labels,
            real=real_f, real_conditions=[r["label"] for r in real_pick],
            test=test_f, test_conditions=[r["label"] for r in test],
            test_groups=["unknown"] * len(test), seed=0, device=torch.device("cpu"),
        )  # fmt: skip
        brief = {
            k: {m: v for m, v in u[k].items() if not isinstance(v, dict)}
            for k in ("synthetic", "real")
        }
        print(f"guidance {g}: {time.time() - start:.0f}s", json.dumps(brief), flush=True)


def ita(pipeline, settings, scales: list[float]) -> None:
    for g in scales:
        types, itas = [], []
        for t in range(1, 7):
            prompts = [prompt(settings, TOP9[i % 9], t) for i in range(PER_TYPE)]
            for im in sample(pipeline, prompts, g, seed=t):
                value = image_ita(im)
                if value is not None:
                    types.append(t)
                    itas.append(value)
        types_a, itas_a = np.array(types), np.array(itas)
        med = [float(np.median(itas_a[types_a == t])) for t in range(1, 7)]
        print(
            f"guidance {g}: medians", [round(m, 1) for m in med],
            "order", [int(i) + 1 for i in np.argsort(-np.array(med))],
            "spearman", round(spearman(types_a, itas_a), 3), flush=True,
        )  # fmt: skip


def fd(pipeline, settings, scales: list[float]) -> None:
    backbone = load_backbone("efficientnet-lite0")

    def features(images: list[Image.Image]) -> np.ndarray:
        out = []
        for i in range(0, len(images), 64):
            pixels = torch.stack([resize_crop(im) for im in images[i : i + 64]])
            out.append(backbone.features(pixels).numpy())
        return np.concatenate(out)

    with open(f"{DATA}/metadata.csv", newline="") as handle:
        train = [r for r in csv.DictReader(handle) if r["split"] == "train"]
    conditions = sorted({r["label"] for r in train})
    pick = np.random.default_rng(0).permutation(len(train))[: len(train) // 2]
    reference = features([Image.open(f"{DATA}/{train[i]['path']}") for i in pick])

    def made(pipe, g: float, interval: list[float] = INTERVAL) -> np.ndarray:
        images = []
        for start in range(0, 864, 48):
            prompts = [
                prompt(settings, conditions[i % len(conditions)], 1 + i % 6)
                for i in range(start, start + 48)
            ]
            images += sample(pipe, prompts, g, seed=start, interval=interval)
        return features(images)

    if known := os.environ.get("PROBE_FLOOR"):  # a value an earlier run printed
        floor = float(known)
    else:
        tiny = tiny_random_pipeline()
        tiny.set_progress_bar_config(disable=True)
        floor = frechet_distance(made(tiny, 7.5, [0, 1]), reference)
    print(f"tiny-random: fd_lite0 {floor:.0f} ({len(reference)} reference photos)", flush=True)
    for g in scales:
        start = time.time()
        value = frechet_distance(made(pipeline, g), reference)
        print(
            f"guidance {g}: fd_lite0 {value:.0f}, ratio to tiny-random {value / floor:.3f}"
            f" ({time.time() - start:.0f}s)",
            flush=True,
        )


if __name__ == "__main__":
    mode, scales = sys.argv[1], [float(x) for x in sys.argv[2:]]
    if mode not in ("cas", "ita", "fd") or not scales:
        sys.exit("usage: python scripts/guidance_probe.py cas|ita|fd SCALE [SCALE ...]")
    generator_pipeline = StableDiffusionPipeline.from_pretrained(
        os.environ.get("PROBE_MODEL", "models/synthderm-fitz64/text-to-image"),
        dtype=torch.float32,
        local_files_only=True,
    )
    generator_pipeline.set_progress_bar_config(disable=True)
    if choice := os.environ.get("PROBE_SCHEDULER"):
        name, _, overrides = choice.partition(":")
        generator_pipeline.scheduler = getattr(diffusers, name).from_config(
            generator_pipeline.scheduler.config, **json.loads(overrides or "{}")
        )
        print("scheduler", generator_pipeline.scheduler.__class__.__name__, overrides, flush=True)
    {"cas": cas, "ita": ita, "fd": fd}[mode](generator_pipeline, get_settings(), scales)
