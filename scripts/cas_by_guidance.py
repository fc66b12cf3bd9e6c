"""The classification accuracy score of synthderm-fitz64 by guidance scale (issue 24).

`python scripts/cas_by_guidance.py 3 7 12`: for each guidance scale, 48 text-to-image images per
class of the 9 commonest conditions (types 1..6 cycled in the prompt, 25 steps, seed 0), the
evaluation's head (workers.evaluation_measures.utility) trained on their EfficientNet-Lite0
features alone, beside the same head on 48 real train photos per class, both tested on the
Fitzpatrick17k test photos at the generator's 64 px. A quick probe, not the model card's
protocol (the card: `make default-model-card`). About 2 minutes a scale on the 2-core CPU.
"""

import csv
import json
import sys
import time

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from app.config import get_settings
from models.backbones import load_backbone
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
D = "../shared/data/fitzpatrick17k_ajl21"
settings = get_settings()
bb = load_backbone("efficientnet-lite0")


def feats(images):
    out = []
    for i in range(0, len(images), 64):
        batch = [
            np.asarray(
                im.convert("RGB").resize((64, 64), Image.BICUBIC).resize((224, 224), Image.BICUBIC),
                dtype=np.float32,
            )
            / 255
            for im in images[i : i + 64]
        ]
        out.append(bb.features(torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)).numpy())
    return np.concatenate(out)


with open(f"{D}/metadata.csv", newline="") as handle:
    rows = [r for r in csv.DictReader(handle) if r["label"] in TOP9]
test = [r for r in rows if r["split"] == "test"]
train = [r for r in rows if r["split"] == "train"]
t = time.time()
test_f = feats([Image.open(f"{D}/{r['path']}") for r in test])
rng = np.random.default_rng(0)
real_pick = [
    r for c in TOP9 for r in rng.permutation([x for x in train if x["label"] == c])[:48].tolist()
]
real_f = feats([Image.open(f"{D}/{r['path']}") for r in real_pick])
print("features", time.time() - t, flush=True)
p = StableDiffusionPipeline.from_pretrained(
    "models/synthderm-fitz64/text-to-image", dtype=torch.float32, local_files_only=True
)
p.set_progress_bar_config(disable=True)
for g in [float(x) for x in sys.argv[1:]]:
    t = time.time()
    images, labels = [], []
    for c in TOP9:
        prompts = [prompt(settings, c, 1 + i % 6) for i in range(48)]
        gen = torch.Generator().manual_seed(0)
        images += p(
            prompts, num_inference_steps=25, height=64, width=64, guidance_scale=g, generator=gen
        ).images
        labels += [c] * 48
    syn_f = feats(images)
    u = utility(
        synthetic=syn_f,
        synthetic_conditions=labels,
        real=real_f,
        real_conditions=[r["label"] for r in real_pick],
        test=test_f,
        test_conditions=[r["label"] for r in test],
        test_groups=["unknown"] * len(test),
        seed=0,
        device=torch.device("cpu"),
    )

    brief = {
        k: {m: v for m, v in u[k].items() if not isinstance(v, dict)} for k in ("synthetic", "real")
    }
    print(f"guidance {g}: {time.time() - t:.0f}s", json.dumps(brief), flush=True)
