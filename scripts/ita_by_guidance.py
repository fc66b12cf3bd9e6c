"""Median ITA by requested Fitzpatrick type of synthderm-fitz64's images, by guidance scale.

`python scripts/ita_by_guidance.py 3 12`: 36 text-to-image images per type (the 9 commonest
conditions cycled, 25 steps, seed = the type), ITA by models/ita.py's rule (the evaluation's),
then the medians, their order and the per-image Spearman correlation. A quick probe beside
scripts/cas_by_guidance.py, not the model card's protocol. About a minute a scale here.
"""

import sys

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from app.config import get_settings
from models.ita import image_ita, spearman
from workers.default_model import prompt

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
p = StableDiffusionPipeline.from_pretrained(
    "models/synthderm-fitz64/text-to-image", dtype=torch.float32, local_files_only=True
)
p.set_progress_bar_config(disable=True)
s = get_settings()
for g in [float(x) for x in sys.argv[1:]]:
    types, itas = [], []
    for t in range(1, 7):
        prompts = [prompt(s, TOP9[i % 9], t) for i in range(36)]
        ims = p(
            prompts,
            num_inference_steps=25,
            height=64,
            width=64,
            guidance_scale=g,
            generator=torch.Generator().manual_seed(t),
        ).images
        for im in ims:
            v = image_ita(im)
            if v is not None:
                types.append(t)
                itas.append(v)
    types, itas = np.array(types), np.array(itas)
    med = [float(np.median(itas[types == t])) for t in range(1, 7)]
    print(
        f"guidance {g}: medians",
        [round(m, 1) for m in med],
        "order",
        [int(i) + 1 for i in np.argsort(-np.array(med))],
        "spearman",
        round(spearman(types, itas), 3),
        flush=True,
    )
